"""Overlays: an image blended with its palette mask, and a class legend beside it.

Example:
    >>> image = np.zeros((4, 6, 3), dtype=np.uint8)
    >>> mask = np.array([[0, 1, 1, 0, 0, 0]] * 4, dtype=np.uint8)
    >>> blend(image, mask, alpha=0.5)[0, 1].tolist()  # half of class 1's color (128, 0, 0)
    [64, 0, 0]
    >>> with_legend(image, mask, ["background", "circle"]).shape[1] > 6
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from ..conventions import IGNORE_INDEX
from ..data.image_io import VOC_PALETTE

LINE_HEIGHT = 14
SWATCH = 10
LEGEND_WIDTH = 110


def blend(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5,
          background: int | None = 0) -> np.ndarray:
    """uint8 [H,W,3]: ``image`` with each labelled pixel blended with its VOC palette color
    (``alpha`` of the color); label ``background`` and ignore (255) pixels are left as they are."""
    if image.shape[:2] != mask.shape:
        raise ValueError(f"image {image.shape[:2]} and mask {mask.shape} differ in size")
    colors = VOC_PALETTE[mask.astype(np.uint8)].astype(np.float32)
    mixed = (1 - alpha) * image.astype(np.float32) + alpha * colors
    keep = mask == IGNORE_INDEX
    if background is not None:
        keep |= mask == background
    return np.where(keep[..., None], image, mixed.round()).astype(np.uint8)


def with_legend(image: np.ndarray, mask: np.ndarray, class_names: Sequence[str] | None,
                alpha: float = 0.5) -> np.ndarray:
    """:func:`blend` with a white panel on the right naming the labels present in ``mask``
    beside their colors (``class_<v>`` when ``class_names`` is None)."""
    present = [int(v) for v in np.unique(mask) if v != IGNORE_INDEX]
    height = max(image.shape[0], LINE_HEIGHT * len(present) + 4)
    canvas = Image.new("RGB", (image.shape[1] + LEGEND_WIDTH, height), "white")
    canvas.paste(Image.fromarray(blend(image, mask, alpha)), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for row, value in enumerate(present):
        top, left = 2 + row * LINE_HEIGHT, image.shape[1] + 4
        draw.rectangle([left, top, left + SWATCH, top + SWATCH],
                       fill=tuple(int(c) for c in VOC_PALETTE[value]), outline="black")
        name = class_names[value] if class_names and value < len(class_names) else f"class_{value}"
        draw.text((left + SWATCH + 4, top - 1), name, fill="black")
    return np.asarray(canvas)
