"""Procedural shapes dataset: exact masks, class given by shape only, deterministic by seed.

Each image holds one to three objects drawn from ``SHAPE_NAMES`` on a textured background.
Colors and textures are drawn independently of the class, so only the shape tells the class
apart. Objects vary in scale, position and rotation, and later objects occlude earlier ones.

With ``colors=n`` (n >= 1) the set has ``4 n`` classes instead: an object's class is its shape
together with one of ``n`` hues spread evenly around the color wheel (its texture varies around
that hue), which gives a many-class set with the same exact masks.

Example:
    >>> image, mask = render_sample(seed=0, index=3, size=(64, 64))
    >>> image.shape, mask.shape, image.dtype
    ((64, 64, 3), (64, 64), dtype('uint8'))
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .image_io import write_image, write_mask

SHAPE_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
CLASS_NAMES: tuple[str, ...] = ("background", *SHAPE_NAMES)
HUE_JITTER = 0.02
MAX_COLORS = 24


def class_names(colors: int = 0) -> tuple[str, ...]:
    """Class names, background first: the shapes, or with ``colors=n`` every shape in every
    hue (``circle_h000``, ``circle_h030``, ... with the hue in degrees), shape-major."""
    if not 0 <= colors <= MAX_COLORS:
        raise ValueError(f"colors={colors} must lie in 0..{MAX_COLORS} (0: classes by shape "
                         f"only; more hues than {MAX_COLORS} would overlap within their "
                         f"±{HUE_JITTER} jitter)")
    if not colors:
        return CLASS_NAMES
    return ("background", *(f"{shape}_h{round(360 * j / colors):03d}"
                            for shape in SHAPE_NAMES for j in range(colors)))


def hue_color(hue: float, saturation: float = 0.85, value: float = 0.9) -> np.ndarray:
    """RGB in [0, 1] of an HSV color, ``hue`` in turns (0..1)."""
    channel = (np.array([5.0, 3.0, 1.0]) + hue * 6.0) % 6.0
    return value - value * saturation * np.clip(np.minimum(channel, 4.0 - channel), 0.0, 1.0)


def shape_mask(kind: str, yy: np.ndarray, xx: np.ndarray, radius: float,
               angle: float) -> np.ndarray:
    """Boolean mask of one shape centred at the origin of the (yy, xx) coordinate grids."""
    cos, sin = np.cos(angle), np.sin(angle)
    u = (xx * cos + yy * sin) / radius
    v = (-xx * sin + yy * cos) / radius
    if kind == "circle":
        return u**2 + v**2 <= 1.0
    if kind == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if kind == "triangle":
        # Equilateral triangle inscribed in the unit circle, pointing along -v.
        edges = [(np.cos(a), np.sin(a)) for a in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3,
                                                  np.pi / 2 + 4 * np.pi / 3)]
        return np.all([u * ex + v * ey <= 0.5 for ex, ey in edges], axis=0)
    if kind == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 1.0))
    raise ValueError(f"unknown shape {kind!r}; expected one of {SHAPE_NAMES}")


def texture(rng: np.random.Generator, height: int, width: int,
             contrast: float = 1.0) -> np.ndarray:
    """A random float texture [H,W,3] in [0,1]: flat, stripes or checker, in random colors.

    ``contrast`` scales the difference between the two colors of the pattern.
    """
    c1, c2 = rng.uniform(0.0, 1.0, size=(2, 3))
    c2 = c1 + contrast * (c2 - c1)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    kind = rng.integers(3)
    if kind == 0:
        weight = np.zeros((height, width), np.float32)
    elif kind == 1:
        angle, period = rng.uniform(0, np.pi), rng.uniform(4, 12)
        weight = (np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period) > 0)
    else:
        cell = int(rng.integers(3, 9))
        weight = ((yy // cell + xx // cell) % 2).astype(bool)
    weight = np.asarray(weight, np.float32)[..., None]
    return c1 * (1 - weight) + c2 * weight


def hue_texture(rng: np.random.Generator, height: int, width: int, hue: float) -> np.ndarray:
    """A :func:`texture` whose two colors lie within a few degrees of ``hue`` (turns)."""
    pattern = texture(rng, height, width, contrast=1.0)
    weight = pattern.mean(-1, keepdims=True)
    c1, c2 = (hue_color(hue + rng.uniform(-HUE_JITTER, HUE_JITTER), rng.uniform(0.65, 1.0),
                         rng.uniform(0.6, 1.0)) for _ in range(2))
    return c1 * (1 - weight) + c2 * weight


def render_sample(seed: int, index: int, size: tuple[int, int] = (64, 64),
                  max_objects: int = 3, colors: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Render image ``index`` of the set drawn with ``seed``: (uint8 [H,W,3], uint8 mask [H,W]).

    Mask value 0 is background and ``class_names(colors)[v]`` names mask value ``v``: shape
    ``SHAPE_NAMES[c]`` has value ``c + 1``, or with ``colors=n`` shape ``s`` in hue ``j`` has
    value ``s * n + j + 1``.
    """
    num_classes = len(class_names(colors)) - 1
    height, width = size
    rng = np.random.default_rng([seed, index])
    image = texture(rng, height, width, contrast=0.3)
    mask = np.zeros((height, width), np.uint8)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    short = min(height, width)
    for _ in range(int(rng.integers(1, max_objects + 1))):
        cls = int(rng.integers(num_classes))
        shape = SHAPE_NAMES[cls // colors if colors else cls]
        radius = rng.uniform(0.18, 0.30) * short
        cy = rng.uniform(radius * 0.6, height - radius * 0.6)
        cx = rng.uniform(radius * 0.6, width - radius * 0.6)
        inside = shape_mask(shape, yy - cy, xx - cx, radius, rng.uniform(0, 2 * np.pi))
        if inside.sum() < 0.002 * height * width:
            continue
        fill = (hue_texture(rng, height, width, (cls % colors) / colors) if colors
                else texture(rng, height, width, contrast=0.35))
        image[inside] = fill[inside]
        mask[inside] = cls + 1
    noise = rng.normal(0.0, 0.03, size=image.shape)
    return (np.clip(image + noise, 0, 1) * 255).round().astype(np.uint8), mask


def write_synthetic_voc(out_dir: str | Path, num_train: int = 4000, num_val: int = 200,
                        size: tuple[int, int] = (64, 64), seed: int = 0,
                        colors: int = 0) -> Path:
    """Write the synthetic set in the PASCAL VOC layout (PNG images, palette masks, split lists).

    Train and val images come from disjoint index ranges of the same generator; ``colors`` as
    in :func:`render_sample` (``classes.txt`` lists the classes).
    """
    names = class_names(colors)
    root = Path(out_dir)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(names) + "\n")
    splits = {"train": range(num_train), "val": range(num_train, num_train + num_val)}
    for split, indices in splits.items():
        ids = [f"synth_{i:06d}" for i in indices]
        for sample_id, i in zip(ids, indices):
            image, mask = render_sample(seed, i, size, colors=colors)
            write_image(root / "JPEGImages" / f"{sample_id}.png", image)
            write_mask(root / "SegmentationClass" / f"{sample_id}.png", mask)
        (root / "ImageSets/Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root
