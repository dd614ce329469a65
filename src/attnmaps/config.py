"""Typed run configuration: dataclass defaults <- YAML file <- ``key=value`` overrides.

Example::

    cfg = load_config("configs/voc.yaml", ["train.lr=3e-4", "model.img_size=96,96"])
    save_config(cfg, Path(cfg.out_dir) / "config.yaml")
"""

import copy
import dataclasses
import difflib
import math
import re
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from .atomic import atomic_write
from .errors import ConfigError
from .pseudo.crf_params import CRFParams

# Field metadata checked by ``_coerce``: "choices" (allowed strings), "pattern" ((regex matching
# the whole value, description)), "length" (number of list items) and "range" (bounds of a number
# or of every item of a list, see :func:`_bounds`).
_PAIR = {"length": 2}


def _bounds(low: float | None = None, high: float | None = None, *, open_low: bool = False,
            open_high: bool = False) -> dict:
    """Field metadata bounding a number: ``low <= x <= high`` (``<`` where open)."""
    return {"range": (low, high, open_low, open_high)}


_COUNT = _bounds(1)
_NON_NEGATIVE = _bounds(0)
_POSITIVE = _bounds(0, open_low=True)
_FRACTION = _bounds(0, 1)


@dataclass
class ModelConfig:
    in_chans: int = field(default=3, metadata=_COUNT)
    img_size: list[int] = field(default_factory=lambda: [64, 64], metadata=_PAIR)
    patch_size: int = field(default=4, metadata=_COUNT)
    embed_dim: int = field(default=128, metadata=_COUNT)
    depth: int = field(default=6, metadata=_COUNT)
    num_heads: int = field(default=4, metadata=_COUNT)
    mlp_ratio: float = field(default=4.0, metadata=_POSITIVE)
    qkv_bias: bool = True
    drop_path: float = field(default=0.0, metadata=_bounds(0, 1, open_high=True))
    num_registers: int = field(default=1, metadata=_NON_NEGATIVE)
    head: str = field(default="joint", metadata={"choices": ("joint", "per_token")})
    stem: str = field(default="conv", metadata={"choices": ("conv", "linear")})
    # 3x3 convolutions per stride-2 stage of the conv stem (1: Xiao et al.'s stem, 0.3x the
    # multiply-adds but far slower to learn the digits; 3: deeper, better at 40 epochs, dearer)
    stem_convs_per_stage: int = field(default=2, metadata=_COUNT)
    gates: bool = True
    gate_temperature: float = field(default=0.33, metadata=_POSITIVE)
    mask_rate: float = field(default=0.5, metadata=_FRACTION)
    class_blocks: int = field(default=0, metadata=_NON_NEGATIVE)
    grad_checkpointing: bool = False
    gate_init: float | None = None
    attention_kernel: str = field(default="auto",
                                  metadata={"choices": ("auto", "fused", "explicit")})
    attn_blocks: str = field(
        default="last",
        metadata={"pattern": (r"all|last([1-9][0-9]*)?", "'last', 'last<n>' (n >= 1) or 'all'")},
    )
    # auxiliary max-pooled patch classifier, trained with weight train.patch_loss_weight
    patch_head: bool = False
    init_from: str | None = None
    adapt_channels: bool = False
    adapt_patch_size: bool = False


@dataclass
class DataConfig:
    name: str = "synthetic"
    root: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    image_size: list[int] | None = field(default=None, metadata=_PAIR)
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.25, 0.25, 0.25])
    hflip: bool = True
    num_workers: int = field(default=0, metadata=_NON_NEGATIVE)
    # training batches each loader worker keeps ready (with data.num_workers > 0)
    prefetch_factor: int = field(default=2, metadata=_COUNT)
    # keep the training loader's workers between epochs: saves their start-up each epoch, but
    # each worker's augmentation stream then runs on across epochs, so --resume from an epoch
    # end no longer repeats the uninterrupted run's augmentations exactly (with workers)
    persistent_workers: bool = False
    # training images travel as uint8 and are scaled and normalised on the training device (a
    # quarter of the bytes through the loader and the copy; same values); needs color_jitter=0
    normalize_on_device: bool = False
    crop_scale: list[float] | None = field(default=None, metadata=_PAIR)
    rotate: float = field(default=0.0, metadata=_bounds(0, 180))
    # training epochs without the rotation before it starts (a curriculum: a small set's
    # classifier first learns upright objects; with workers, needs persistent_workers=false)
    rotate_start_epoch: int = field(default=0, metadata=_NON_NEGATIVE)
    # random zoom of image and mask about the centre by a factor in [low, high] (< 1: the scene
    # shrinks inside a void border; > 1: its centre enlarges), from epoch zoom_start_epoch on
    zoom: list[float] | None = field(default=None, metadata=_PAIR)
    zoom_start_epoch: int = field(default=0, metadata=_NON_NEGATIVE)
    # progressive resizing: training images are resized to early_size [H, W] (e.g. two thirds of
    # the full size) for the first early_size_epochs epochs (0: off), then trained at full size;
    # cheaper steps while the classifier takes off (position embeddings resampled to the grid)
    early_size: list[int] | None = field(default=None, metadata=_PAIR)
    early_size_epochs: int = field(default=0, metadata=_NON_NEGATIVE)
    color_jitter: float = field(default=0.0, metadata=_bounds(0, 1, open_high=True))
    has_background: bool | None = None
    label_map: list[int] | None = None
    label_min_fraction: float = field(default=0.0, metadata=_FRACTION)
    # manifest datasets: accept image / mask paths outside data.root (absolute or with '..')
    allow_outside_root: bool = False


@dataclass
class TrainConfig:
    epochs: int = field(default=10, metadata=_COUNT)
    # the global batch: under torchrun each process takes batch_size / N
    batch_size: int = field(default=64, metadata=_COUNT)
    lr: float = field(default=1e-3, metadata=_POSITIVE)
    min_lr: float = field(default=1e-5, metadata=_NON_NEGATIVE)
    warmup_epochs: float = field(default=1.0, metadata=_NON_NEGATIVE)
    weight_decay: float = field(default=0.05, metadata=_NON_NEGATIVE)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95],
                               metadata={**_PAIR, **_bounds(0, 1, open_high=True)})
    grad_clip: float | None = field(default=1.0, metadata=_POSITIVE)
    gate_lambda: float = field(default=0.01, metadata=_NON_NEGATIVE)
    seed: int = field(default=0, metadata=_NON_NEGATIVE)
    device: str = field(default="auto", metadata={"pattern": (
        r"auto|cpu|mps|cuda(:[0-9]+)?", "'auto', 'cpu', 'cuda', 'cuda:<index>' or 'mps'")})
    log_every: int = field(default=20, metadata=_COUNT)
    # epochs between evaluations on data.val_split (the last epoch is always evaluated)
    eval_every: int = field(default=1, metadata=_COUNT)
    # steps between checkpoints inside an epoch (0: only at epoch ends and on Ctrl-C / SIGTERM)
    checkpoint_every: int = field(default=200, metadata=_NON_NEGATIVE)
    precision: str = field(default="fp32", metadata={"choices": ("fp32", "bf16")})
    compile: bool = False
    mask_fraction: float = field(default=0.0, metadata=_FRACTION)
    guide_weight: float = field(default=1.0, metadata=_NON_NEGATIVE)
    guide_form: str = field(default="contrast", metadata={"choices": ("contrast", "energy")})
    prior_bias: bool = False
    ema_decay: float = 0.0
    mix: str = field(default="none", metadata={"choices": ("none", "mixup", "cutmix")})
    mix_alpha: float = 1.0
    mix_prob: float = 0.5
    gate_lr_scale: float = 1.0
    # epochs before the head gates start to move (their learning rate is 0 until then): prune
    # once the classifier has learned, not while it is still at chance
    gate_start_epoch: float = field(default=0.0, metadata=_NON_NEGATIVE)
    patch_loss_weight: float = field(default=1.0, metadata=_NON_NEGATIVE)
    attention_pool_weight: float = field(default=0.0, metadata=_NON_NEGATIVE)
    self_guide_weight: float = field(default=0.0, metadata=_NON_NEGATIVE)
    # weight of the mean cosine similarity between each present class's attention map and the
    # maps of the other classes (class-specific maps; 0 = off)
    map_decorrelation_weight: float = field(default=0.0, metadata=_NON_NEGATIVE)
    # which maps each present class's map is compared with: "all" other classes, or only the
    # other classes "present" in the same image (co-occurring objects kept apart)
    map_decorrelation_pairs: str = field(default="all", metadata={"choices": ("all", "present")})
    # share of patch tokens dropped at random in each training step (PatchDropout; 0 = off)
    patch_dropout: float = field(default=0.0, metadata=_bounds(0, 1, open_high=True))
    # self-training on the model's own refined maps (engine/self_training.py; 0 = off): weight of
    # the patch head's dense BCE and of the class tokens' attention cross-entropy against the
    # patch shares of the refined pseudo masks, from epoch self_train_start_epoch on, the maps
    # refined by self_train_refine_iterations of PAMR at self_train_cell x self_train_cell pixels
    # per patch; self_train_refresh_epochs > 0: the masks of all training images are made once
    # every that many epochs (by the weight average when there is one) and augmented with the
    # images, instead of every step from the batch itself; self_train_absent_weight: weight of the
    # KL divergence from even attention to the attention of the classes absent from the image
    self_train_weight: float = field(default=0.0, metadata=_NON_NEGATIVE)
    self_train_attention_weight: float = field(default=0.0, metadata=_NON_NEGATIVE)
    self_train_absent_weight: float = field(default=0.0, metadata=_NON_NEGATIVE)
    self_train_start_epoch: int = field(default=0, metadata=_NON_NEGATIVE)
    self_train_refine_iterations: int = field(default=10, metadata=_NON_NEGATIVE)
    self_train_cell: int = field(default=4, metadata=_COUNT)
    self_train_refresh_epochs: int = field(default=0, metadata=_NON_NEGATIVE)


@dataclass
class PseudoMaskConfig:
    threshold: float = field(default=0.3, metadata=_FRACTION)
    prob_threshold: float = field(default=0.5, metadata=_FRACTION)
    # who wins a pixel several classes claim: "probability" (the paper: the most probable class),
    # "map" (the class whose normalised map is highest there) or "weighted" (map x probability)
    merge: str = field(default="probability",
                       metadata={"choices": ("probability", "map", "weighted")})
    use_true_labels: bool = False
    # the class maps: "attention" (the paper: class-to-patch attention) or "fused" (that
    # attention times the sigmoid of the patch head's class score of each patch, as MCTformer-V2
    # fuses attention with patch-token CAMs; needs model.patch_head=true)
    maps: str = field(default="attention", metadata={"choices": ("attention", "fused")})
    refine_iterations: int = field(default=0, metadata=_NON_NEGATIVE)
    tta_scales: list[float] = field(default_factory=lambda: [1.0], metadata=_POSITIVE)
    tta_flip: bool = False
    crf: bool = False
    crf_backend: str = field(default="torch", metadata={"choices": ("torch", "pydensecrf")})
    crf_iterations: int = CRFParams.iterations
    crf_gaussian_sxy: float = CRFParams.gaussian_sxy
    crf_gaussian_compat: float = CRFParams.gaussian_compat
    crf_bilateral_sxy: float = CRFParams.bilateral_sxy
    crf_bilateral_srgb: float = CRFParams.bilateral_srgb
    crf_bilateral_compat: float = CRFParams.bilateral_compat
    crf_bilateral_downsample: int = field(default=CRFParams.bilateral_downsample, metadata=_COUNT)


@dataclass
class SegmentConfig:
    """The second stage (``attnmaps segment``): seeds, segmentation network, inference.

    ``epochs``, ``lr``, ``min_lr``, ``warmup_epochs`` and ``batch_size`` set the second stage's
    schedule; every other ``train.*`` key (optimiser, precision, seed, device) applies to both
    stages.
    """

    arch: str = field(default="vit_mlp", metadata={"choices": ("vit_mlp", "smp")})
    blocks: str = field(
        default="all",
        metadata={"pattern": (r"all|last([1-9][0-9]*)?", "'last', 'last<n>' (n >= 1) or 'all'")},
    )
    decoder_dim: int = 64
    low_level_dim: int = 32
    dropout: float = 0.1
    epochs: int = 4
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_epochs: float = 0.3
    batch_size: int = 32
    backbone_lr_scale: float = 0.1
    seed_split: str | None = None
    max_images: int = 0
    ignore_margin: float = 0.0
    class_margin: float = 0.0
    # class-balanced cross-entropy: label c weighted by (median / frequency of c in the seeds) **
    # power; 0 off, 1 median-frequency balancing, 0.5 its square root
    class_weight_power: float = 0.0
    inference: str = field(default="slide", metadata={"choices": ("slide", "whole", "resize")})
    window: list[int] | None = field(default=None, metadata=_PAIR)
    overlap: int = 16
    # PAMR iterations on the network's class probabilities at inference (evaluation, predict):
    # the stage-1 refinement applied to the second stage's output; None: pseudo.refine_iterations
    refine_iterations: int | None = None
    smp_arch: str = "DeepLabV3Plus"
    smp_encoder: str = "resnet18"
    smp_encoder_weights: str | None = None
    stage1_run: str | None = None


@dataclass
class PretrainConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    warmup_epochs: float = 1.0
    mask_ratio: float = 0.6


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pseudo: PseudoMaskConfig = field(default_factory=PseudoMaskConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    out_dir: str = "runs/default"


def load_config(path: str | Path | None, overrides: Iterable[str] = ()) -> Config:
    """Build a :class:`Config` from the defaults, an optional YAML file, then overrides."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"Config file {path} is not valid YAML: {exc}") from None
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"Config file {path} must hold a YAML mapping, got {data!r}")
        try:
            _merge(cfg, data, "")
        except ValueError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg: Config, overrides: Iterable[str]) -> Config:
    """Return a copy of ``cfg`` with ``key=value`` overrides applied (``cfg`` is untouched).

    Values are YAML (``train.lr=3e-4``, ``model.init_from=null``, ``model.gates=false``);
    list fields also accept ``96,96``; string fields keep the text as typed.
    """
    if isinstance(overrides, str):
        raise TypeError(f"overrides must be a list of 'key=value' strings, got {overrides!r}")
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(
                f"Malformed override {item!r}: expected 'key=value', e.g. 'train.lr=3e-4'"
            )
        key = key.strip()
        *parents, last = key.split(".")
        section, prefix = cfg, ""
        for part in parents:
            _lookup(section, part, prefix)
            if not is_dataclass(getattr(section, part)):
                raise ConfigError(
                    f"Config key '{prefix}{part}' is not a section, so '{key}' does not exist"
                )
            section, prefix = getattr(section, part), f"{prefix}{part}."
        target, tp = _lookup(section, last, prefix)
        _assign(section, target, tp, _parse_override(raw, tp, key), key)
    _validate(cfg)
    return cfg


def describe_keys(sections: Iterable[str] | None = None) -> str:
    """One line per config key, ``section.key = default`` (``key = default`` at the top level),
    for ``--help``: every section of :class:`Config`, or only those named in ``sections``."""
    cfg, lines = Config(), []
    for section in dataclasses.fields(Config):
        if sections is not None and section.name not in sections:
            continue
        values = getattr(cfg, section.name)
        if not is_dataclass(values):
            lines.append(f"  {section.name} = {values!r}")
            continue
        lines += [f"  {section.name}.{key.name} = {getattr(values, key.name)!r}"
                  for key in dataclasses.fields(values)]
    return "\n".join(lines)


def section_from_dict(cls: type, data: Mapping, prefix: str) -> Any:
    """A config section of dataclass type ``cls``: its defaults with ``data`` merged in, each
    value checked as a YAML file's would be (errors name ``prefix.key``)."""
    section = cls()
    _merge(section, data, f"{prefix}.")
    return section


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Nested plain dict of ``cfg`` (lists copied), suitable for YAML."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write ``cfg`` as YAML to ``path`` atomically (parent folders are created)."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write({path: lambda tmp: tmp.write_text(text)})


def _lookup(section: Any, key: str, prefix: str) -> tuple[dataclasses.Field, Any]:
    """The field ``key`` of dataclass ``section`` and its type; unknown keys raise ValueError."""
    by_name = {f.name: f for f in fields(section)}
    if key not in by_name:
        valid = list(by_name)
        close = difflib.get_close_matches(key, valid, n=1)
        hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
        where = f"section '{prefix[:-1]}'" if prefix else "the top level"
        raise ConfigError(
            f"Unknown config key '{prefix}{key}'.{hint} Valid keys in {where}: {', '.join(valid)}"
        )
    return by_name[key], get_type_hints(type(section))[key]


def _merge(section: Any, data: Mapping, prefix: str) -> None:
    """Set the keys of ``data`` (nested mappings for sub-sections) on dataclass ``section``."""
    for key, value in data.items():
        target, tp = _lookup(section, str(key), prefix)
        _assign(section, target, tp, value, f"{prefix}{key}")


def _assign(section: Any, target: dataclasses.Field, tp: Any, value: Any, key: str) -> None:
    if is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"Config key '{key}' is a section; expected a mapping, got {value!r}")
        _merge(getattr(section, target.name), value, f"{key}.")
    else:
        setattr(section, target.name, _coerce(value, tp, target.metadata, key))


def _parse_override(raw: str, tp: Any, key: str) -> Any:
    """Parse an override's text as YAML, guided by the type of the field it sets."""
    base = _strip_optional(tp)
    if get_origin(base) is list and "," in raw and not raw.lstrip().startswith("["):
        raw = f"[{raw}]"
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        if base is str:
            return raw
        raise ConfigError(f"Override '{key}={raw}': value is not valid YAML ({exc})") from None
    if base is str and value is not None and not isinstance(value, str):
        return raw
    return value


def _strip_optional(tp: Any) -> Any:
    """``X`` for ``X | None``, else ``tp`` unchanged."""
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _type_name(tp: Any) -> str:
    return tp.__name__ if get_origin(tp) is None and isinstance(tp, type) else str(tp)


def _coerce(value: Any, tp: Any, metadata: Mapping[str, Any], key: str) -> Any:
    """Check ``value`` against type ``tp`` and the field's metadata; return the typed value."""
    try:
        result = _convert(value, tp)
    except (TypeError, ValueError):
        raise ConfigError(
            f"Config key '{key}': got {value!r} ({type(value).__name__}), "
            f"expected {_type_name(tp)}"
        ) from None
    if result is None:
        return None
    choices = metadata.get("choices")
    if choices and result not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ConfigError(f"Config key '{key}': got {result!r}, expected one of {allowed}")
    pattern = metadata.get("pattern")
    if pattern and not re.fullmatch(pattern[0], result):
        raise ConfigError(f"Config key '{key}': got {result!r}, expected {pattern[1]}")
    length = metadata.get("length")
    if length is not None and len(result) != length:
        raise ConfigError(
            f"Config key '{key}': got {result!r}, expected a list of {length} values"
        )
    bounds = metadata.get("range")
    if bounds is not None:
        _check_range(result, bounds, key)
    return result


def _check_range(value: Any, bounds: tuple, key: str) -> None:
    """Raise naming ``key`` when ``value`` (or an item of a list) lies outside ``bounds``."""
    low, high, open_low, open_high = bounds
    for item in value if isinstance(value, list) else [value]:
        too_low = low is not None and (item <= low if open_low else item < low)
        too_high = high is not None and (item >= high if open_high else item > high)
        if too_low or too_high or math.isnan(item):
            parts = []
            if low is not None:
                parts.append(f"{'>' if open_low else '>='} {low:g}")
            if high is not None:
                parts.append(f"{'<' if open_high else '<='} {high:g}")
            raise ConfigError(f"Config key '{key}': got {value!r}, expected a value "
                             f"{' and '.join(parts)}")


def _convert(value: Any, tp: Any) -> Any:
    """``value`` as type ``tp``; raises TypeError/ValueError when it does not fit."""
    base = _strip_optional(tp)
    if base is not tp and value is None:
        return None
    if get_origin(base) is list:
        if not isinstance(value, (list, tuple)):
            raise TypeError
        (item_type,) = get_args(base)
        return [_convert(v, item_type) for v in value]
    if base is float and isinstance(value, str):
        return float(value)  # YAML 1.1 reads exponent floats like 1e-3 as strings
    accepted = (int, float) if base is float else (base,)
    if isinstance(value, bool) is not (base is bool) or not isinstance(value, accepted):
        raise TypeError
    return base(value)


def _validate(cfg: Config) -> None:
    """Checks that involve several keys."""
    channels = cfg.model.in_chans
    for name in ("mean", "std"):
        values = getattr(cfg.data, name)
        if len(values) != channels:
            raise ConfigError(
                f"Config key 'data.{name}' has {len(values)} values {values}, expected one per "
                f"input channel (model.in_chans={channels})"
            )
    if not 0 <= cfg.model.class_blocks <= cfg.model.depth:
        raise ConfigError(f"Config key 'model.class_blocks' is {cfg.model.class_blocks}; expected 0 "
                         f"(class tokens in every block) up to model.depth={cfg.model.depth}")
    if not 0.0 <= cfg.train.ema_decay < 1.0:
        raise ConfigError(f"Config key 'train.ema_decay' is {cfg.train.ema_decay}; expected 0 (off) "
                         "or a decay in (0, 1), e.g. 0.998")
    if not 0.0 < cfg.pretrain.mask_ratio < 1.0:
        raise ConfigError(f"Config key 'pretrain.mask_ratio' is {cfg.pretrain.mask_ratio}; expected "
                         "a fraction of the patches in (0, 1), e.g. 0.6")
    check_early_size(cfg)
    changing_per_epoch = {  # what the loader's dataset copy must see change between epochs
        "data.rotate_start_epoch": (cfg.data.rotate_start_epoch, "augmentation"),
        "data.zoom_start_epoch": (cfg.data.zoom_start_epoch, "augmentation"),
        "data.early_size_epochs": (cfg.data.early_size_epochs, "augmentation"),
        "train.self_train_refresh_epochs": (cfg.train.self_train_refresh_epochs,
                                            "self-training masks")}
    for key, (value, what) in changing_per_epoch.items():
        if value and cfg.data.persistent_workers:
            raise ConfigError(f"Config key '{key}' is {value}; persistent loader workers "
                              f"(data.persistent_workers=true) would keep the epoch-0 {what}: "
                              "set data.persistent_workers=false")
    if cfg.train.gate_lr_scale <= 0:
        raise ConfigError(f"Config key 'train.gate_lr_scale' is {cfg.train.gate_lr_scale}; expected "
                         "a positive multiple of train.lr for the head gates")
    if cfg.train.mix_alpha <= 0 or not 0.0 <= cfg.train.mix_prob <= 1.0:
        raise ConfigError(f"Config keys 'train.mix_alpha'={cfg.train.mix_alpha} (expected > 0) and "
                         f"'train.mix_prob'={cfg.train.mix_prob} (expected in [0, 1])")
    map_losses = {"train.mask_fraction": cfg.train.mask_fraction,
                  "train.attention_pool_weight": cfg.train.attention_pool_weight,
                  "train.self_guide_weight": cfg.train.self_guide_weight}
    used = [key for key, value in map_losses.items() if value > 0]
    if cfg.train.patch_dropout > 0 and used:
        raise ConfigError(f"Config key 'train.patch_dropout' is {cfg.train.patch_dropout}, but "
                         f"{', '.join(used)} train on attention maps over all patches; set "
                         "train.patch_dropout=0 or turn those off")
    if cfg.train.self_train_weight > 0 and not cfg.model.patch_head:
        raise ConfigError(f"Config key 'train.self_train_weight' is {cfg.train.self_train_weight}, "
                          "a loss on the patch head's scores, but model.patch_head is false; set "
                          "model.patch_head=true or train.self_train_weight=0")
    if cfg.train.self_train_refresh_epochs and cfg.train.mix == "mixup":
        raise ConfigError("Config key 'train.self_train_refresh_epochs' is "
                          f"{cfg.train.self_train_refresh_epochs}: its stored masks cannot "
                          "follow a Mixup blend; set train.mix=cutmix or none, or "
                          "train.self_train_refresh_epochs=0 (targets made every step)")
    if cfg.pseudo.maps == "fused" and not cfg.model.patch_head:
        raise ConfigError("Config key 'pseudo.maps' is 'fused', which weighs the attention by "
                          "the patch head's scores, but model.patch_head is false; set "
                          "model.patch_head=true or pseudo.maps=attention")
    scales = cfg.pseudo.tta_scales
    if not scales or min(scales) <= 0:
        raise ConfigError(f"Config key 'pseudo.tta_scales' is {scales}; expected one or more "
                         "positive scales, e.g. [0.75, 1.0, 1.25]")
    _validate_segment(cfg.segment)


def check_early_size(cfg: Config) -> None:
    """``data.early_size_epochs`` > 0 needs ``data.early_size`` (0 turns progressive resizing
    off), and the early size divides into patches."""
    size, epochs, patch = cfg.data.early_size, cfg.data.early_size_epochs, cfg.model.patch_size
    if epochs and size is None:
        raise ConfigError(f"Config key 'data.early_size_epochs' is {epochs} but 'data.early_size' "
                         "is not set: give the small training size, e.g. data.early_size=[64,64], "
                         "or set data.early_size_epochs=0")
    if epochs and (min(size) < patch or any(s % patch for s in size)):
        raise ConfigError(f"Config key 'data.early_size' is {size}; expected [H, W] that are "
                         f"multiples of model.patch_size={patch}")


def _validate_segment(seg: SegmentConfig) -> None:
    """Range checks of the ``segment`` section."""
    checks = [
        ("ignore_margin", 0.0 <= seg.ignore_margin < 1.0, "a score margin in [0, 1)"),
        ("class_margin", 0.0 <= seg.class_margin < 1.0, "a score margin in [0, 1)"),
        ("class_weight_power", seg.class_weight_power >= 0, "0 (unweighted) or more"),
        ("dropout", 0.0 <= seg.dropout < 1.0, "a probability in [0, 1)"),
        ("epochs", seg.epochs >= 1, "at least 1"),
        ("batch_size", seg.batch_size >= 1, "at least 1"),
        ("lr", seg.lr > 0, "positive"),
        ("backbone_lr_scale", seg.backbone_lr_scale >= 0, "0 (frozen backbone) or more"),
        ("decoder_dim", seg.decoder_dim >= 1, "at least 1"),
        ("low_level_dim", seg.low_level_dim >= 0, "0 (no image branch) or more"),
        ("overlap", seg.overlap >= 0, "0 or more pixels"),
        ("max_images", seg.max_images >= 0, "0 (the whole split) or a number of images"),
        ("refine_iterations", seg.refine_iterations is None or seg.refine_iterations >= 0,
         "0 (no refinement), a number of PAMR iterations, or null (pseudo.refine_iterations)"),
    ]
    for key, ok, expected in checks:
        if not ok:
            raise ConfigError(f"Config key 'segment.{key}' is {getattr(seg, key)!r}; expected "
                             f"{expected}")
    if seg.window is not None and seg.overlap >= min(seg.window):
        raise ConfigError(f"Config key 'segment.overlap' is {seg.overlap}; expected fewer pixels "
                         f"than the sliding window segment.window={seg.window}")
