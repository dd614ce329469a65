"""Image and label-mask file IO with the PASCAL VOC color map.

Masks are uint8 arrays of label indices (255 = ignore) stored as palette PNGs:

>>> write_mask("m.png", np.array([[0, 1], [15, 255]], dtype=np.uint8))  # doctest: +SKIP
>>> read_mask("m.png")[1, 0]  # doctest: +SKIP
15
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..atomic import atomic_write
from ..errors import DataError


def _voc_palette() -> np.ndarray:
    """The VOC color map: bit k of an index goes to bit 7-k//3 of channel k%3."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    for index in range(256):
        value = index
        for shift in range(7, -1, -1):
            for channel in range(3):
                palette[index, channel] |= ((value >> channel) & 1) << shift
            value >>= 3
    return palette


VOC_PALETTE: np.ndarray = _voc_palette()
_PALETTE_CODES = (VOC_PALETTE.astype(np.int64) << [16, 8, 0]).sum(axis=1)
_PALETTE_ORDER = np.argsort(_PALETTE_CODES)


def _open(path: str | Path, decode: bool = True) -> Image.Image:
    """The image at ``path``, its pixels decoded (or only its header read: ``decode=False``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            if decode:
                image.load()
    except Exception as err:  # noqa: BLE001 (any parser failure on untrusted bytes)
        raise DataError(f"cannot read image file {path}: {type(err).__name__}: {err}") from None
    return image


def read_image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of the image :func:`read_image` would return, from the file header only
    (the pixels are not decoded)."""
    width, height = _open(path, decode=False).size
    return height, width


def read_image(path: str | Path) -> np.ndarray:
    """Read a JPEG/PNG as uint8 RGB [H,W,3]; grayscale, palette and RGBA images are converted,
    16-bit grayscale is scaled to 8 bits (value / 257), never clipped."""
    image = _open(path)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        values = np.asarray(image, dtype=np.int64)
        if values.min() < 0 or values.max() > 65535:
            raise DataError(f"{path}: {image.mode} image with values {values.min()}.."
                             f"{values.max()}; expected 8- or 16-bit unsigned values")
        grey = np.round(values / 257).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode == "F":
        raise DataError(f"{path}: floating-point images are not supported; save it as 8- or "
                         "16-bit PNG, or as GeoTIFF (data.name=geotiff)")
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def read_mask(path: str | Path) -> np.ndarray:
    """Read a label mask as uint8 indices [H,W].

    Palette ("P") and single-channel PNGs hold indices directly; RGB(A) masks must use only
    VOC_PALETTE colors, which are mapped back to their indices.
    """
    image = _open(path)
    if image.mode in ("P", "L"):
        return np.asarray(image, dtype=np.uint8).copy()
    if image.mode in ("I", "I;16"):
        values = np.asarray(image)
        if values.min() < 0 or values.max() > 255:
            raise DataError(f"mask {path} has values outside 0..255 (max {values.max()})")
        return values.astype(np.uint8)
    if image.mode not in ("RGB", "RGBA"):
        raise DataError(f"mask {path} has unsupported image mode {image.mode!r}")
    rgb = np.asarray(image.convert("RGB"), dtype=np.int64)
    codes = (rgb << [16, 8, 0]).sum(axis=-1)
    pos = np.searchsorted(_PALETTE_CODES, codes, sorter=_PALETTE_ORDER).clip(max=255)
    indices = _PALETTE_ORDER[pos]
    bad = _PALETTE_CODES[indices] != codes
    if bad.any():
        color = tuple(int(c) for c in rgb[bad][0])
        raise DataError(f"mask {path} has color {color} that is not a VOC palette color")
    return indices.astype(np.uint8)


def _save_atomic(path: str | Path, image: Image.Image, **options: object) -> None:
    """Save ``image`` atomically (temporary sibling, then ``os.replace``)."""
    atomic_write({Path(path): lambda tmp: image.save(tmp, **options)}, durable=False)


def write_mask(path: str | Path, mask: np.ndarray) -> None:
    """Write a 2-D integer mask with values 0..255 as a palette PNG using VOC_PALETTE."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer):
        raise DataError(f"mask for {path} must be a 2-D integer array, got {mask.dtype} "
                         f"with shape {mask.shape}")
    if mask.size and (mask.min() < 0 or mask.max() > 255):
        raise DataError(f"mask for {path} must have values in 0..255, got "
                         f"{mask.min()}..{mask.max()}")
    image = Image.fromarray(mask.astype(np.uint8))
    image.putpalette(VOC_PALETTE.tobytes())
    _save_atomic(path, image, format="PNG")


def write_image(path: str | Path, image: np.ndarray) -> None:
    """Write a uint8 [H,W,3] RGB image as PNG or JPEG, chosen by the file suffix."""
    formats = {".png": {"format": "PNG"}, ".jpg": {"format": "JPEG", "quality": 95},
               ".jpeg": {"format": "JPEG", "quality": 95}}
    options = formats.get(Path(path).suffix.lower())
    if options is None:
        raise DataError(f"cannot write {path}: suffix must be one of {sorted(formats)}")
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise DataError(f"image for {path} must be uint8 [H,W,3], got {image.dtype} "
                         f"with shape {image.shape}")
    _save_atomic(path, Image.fromarray(image), **options)
