"""Typed run configuration: dataclass defaults <- YAML file <- ``key=value`` overrides.

Example::

    cfg = load_config("configs/voc.yaml", ["train.lr=3e-4", "model.img_size=96,96"])
    save_config(cfg, Path(cfg.out_dir) / "config.yaml")
"""

import copy
import dataclasses
import difflib
import re
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from .atomic import atomic_write

# Field metadata checked by ``_coerce``: "choices" (allowed strings), "pattern" ((regex matching
# the whole value, description)) and "length" (number of list items).
_PAIR = {"length": 2}


@dataclass
class ModelConfig:
    in_chans: int = 3
    img_size: list[int] = field(default_factory=lambda: [64, 64], metadata=_PAIR)
    patch_size: int = 4
    embed_dim: int = 128
    depth: int = 6
    num_heads: int = 4
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path: float = 0.0
    num_registers: int = 1
    head: str = field(default="joint", metadata={"choices": ("joint", "per_token")})
    stem: str = field(default="conv", metadata={"choices": ("conv", "linear")})
    gates: bool = True
    gate_temperature: float = 0.33
    mask_rate: float = 0.5
    class_blocks: int = 0
    grad_checkpointing: bool = False
    gate_init: float | None = None
    attention_kernel: str = field(default="auto",
                                  metadata={"choices": ("auto", "fused", "explicit")})
    attn_blocks: str = field(
        default="last",
        metadata={"pattern": (r"all|last([1-9][0-9]*)?", "'last', 'last<n>' (n >= 1) or 'all'")},
    )
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
    num_workers: int = 0
    crop_scale: list[float] | None = field(default=None, metadata=_PAIR)
    rotate: float = 0.0
    color_jitter: float = 0.0
    has_background: bool | None = None
    label_map: list[int] | None = None
    label_min_fraction: float = 0.0


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64  # the global batch: under torchrun each process takes batch_size / N
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_epochs: float = 1.0
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95], metadata=_PAIR)
    grad_clip: float | None = 1.0
    gate_lambda: float = 0.01
    seed: int = 0
    device: str = "auto"
    log_every: int = 20
    precision: str = field(default="fp32", metadata={"choices": ("fp32", "bf16")})
    compile: bool = False
    mask_fraction: float = 0.0
    guide_weight: float = 1.0
    guide_form: str = field(default="contrast", metadata={"choices": ("contrast", "energy")})
    prior_bias: bool = False
    ema_decay: float = 0.0
    mix: str = field(default="none", metadata={"choices": ("none", "mixup", "cutmix")})
    mix_alpha: float = 1.0
    mix_prob: float = 0.5
    gate_lr_scale: float = 1.0


@dataclass
class PseudoMaskConfig:
    threshold: float = 0.3
    prob_threshold: float = 0.5
    use_true_labels: bool = False
    refine_iterations: int = 0
    tta_scales: list[float] = field(default_factory=lambda: [1.0])
    tta_flip: bool = False
    crf: bool = False


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
            raise ValueError(f"Config file {path} is not valid YAML: {exc}") from None
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ValueError(f"Config file {path} must hold a YAML mapping, got {data!r}")
        try:
            _merge(cfg, data, "")
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
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
            raise ValueError(
                f"Malformed override {item!r}: expected 'key=value', e.g. 'train.lr=3e-4'"
            )
        key = key.strip()
        *parents, last = key.split(".")
        section, prefix = cfg, ""
        for part in parents:
            _lookup(section, part, prefix)
            if not is_dataclass(getattr(section, part)):
                raise ValueError(
                    f"Config key '{prefix}{part}' is not a section, so '{key}' does not exist"
                )
            section, prefix = getattr(section, part), f"{prefix}{part}."
        target, tp = _lookup(section, last, prefix)
        _assign(section, target, tp, _parse_override(raw, tp, key), key)
    _validate(cfg)
    return cfg


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
        raise ValueError(
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
            raise ValueError(f"Config key '{key}' is a section; expected a mapping, got {value!r}")
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
        raise ValueError(f"Override '{key}={raw}': value is not valid YAML ({exc})") from None
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
        raise ValueError(
            f"Config key '{key}': got {value!r} ({type(value).__name__}), "
            f"expected {_type_name(tp)}"
        ) from None
    if result is None:
        return None
    choices = metadata.get("choices")
    if choices and result not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"Config key '{key}': got {result!r}, expected one of {allowed}")
    pattern = metadata.get("pattern")
    if pattern and not re.fullmatch(pattern[0], result):
        raise ValueError(f"Config key '{key}': got {result!r}, expected {pattern[1]}")
    length = metadata.get("length")
    if length is not None and len(result) != length:
        raise ValueError(
            f"Config key '{key}': got {result!r}, expected a list of {length} values"
        )
    return result


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
            raise ValueError(
                f"Config key 'data.{name}' has {len(values)} values {values}, expected one per "
                f"input channel (model.in_chans={channels})"
            )
    if not 0.0 <= cfg.train.mask_fraction <= 1.0:
        raise ValueError(f"Config key 'train.mask_fraction' is {cfg.train.mask_fraction}; expected "
                         "a fraction of the training images in [0, 1]")
    if not 0 <= cfg.model.class_blocks <= cfg.model.depth:
        raise ValueError(f"Config key 'model.class_blocks' is {cfg.model.class_blocks}; expected 0 "
                         f"(class tokens in every block) up to model.depth={cfg.model.depth}")
    if not 0.0 <= cfg.train.ema_decay < 1.0:
        raise ValueError(f"Config key 'train.ema_decay' is {cfg.train.ema_decay}; expected 0 (off) "
                         "or a decay in (0, 1), e.g. 0.998")
    if not 0.0 < cfg.pretrain.mask_ratio < 1.0:
        raise ValueError(f"Config key 'pretrain.mask_ratio' is {cfg.pretrain.mask_ratio}; expected "
                         "a fraction of the patches in (0, 1), e.g. 0.6")
    if cfg.train.gate_lr_scale <= 0:
        raise ValueError(f"Config key 'train.gate_lr_scale' is {cfg.train.gate_lr_scale}; expected "
                         "a positive multiple of train.lr for the head gates")
    if cfg.train.mix_alpha <= 0 or not 0.0 <= cfg.train.mix_prob <= 1.0:
        raise ValueError(f"Config keys 'train.mix_alpha'={cfg.train.mix_alpha} (expected > 0) and "
                         f"'train.mix_prob'={cfg.train.mix_prob} (expected in [0, 1])")
    scales = cfg.pseudo.tta_scales
    if not scales or min(scales) <= 0:
        raise ValueError(f"Config key 'pseudo.tta_scales' is {scales}; expected one or more "
                         "positive scales, e.g. [0.75, 1.0, 1.25]")
