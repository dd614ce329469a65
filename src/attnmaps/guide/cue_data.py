"""Shapes with a spurious cue: one shape per image (the class) and a small mark in a corner.

In the training split the mark sits in the corner numbered by the class (with probability
``cue_agreement``), so it predicts the class perfectly by default; in the test split it sits in
a uniformly random corner, so a model that learnt the mark instead of the shape fails there.
The object mask marks the shape only, never the mark. Shapes avoid the corners.

Example:
    >>> split = make_cue_split(8, size=32, seed=0, cue_agreement=1.0)
    >>> bool((split.cue == split.labels).all()), tuple(split.images.shape)
    (True, (8, 3, 32, 32))
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..data.synthetic import SHAPE_NAMES, shape_mask, texture

CUE_COLOR = (1.0, 0.1, 0.7)
MEAN, STD = 0.5, 0.25


@dataclass
class CueSplit:
    """Normalized images [N,3,H,W], object masks bool [N,H,W], labels [N], cue corners [N]."""

    images: Tensor
    masks: Tensor
    labels: Tensor
    cue: Tensor

    def __len__(self) -> int:
        return len(self.labels)


def cue_box(corner: int, size: int, cue_size: int) -> tuple[slice, slice]:
    """Rows and columns of the mark in ``corner`` (0 top-left, 1 top-right, 2 bottom-left,
    3 bottom-right), one pixel in from the image border."""
    top = 1 if corner in (0, 1) else size - 1 - cue_size
    left = 1 if corner in (0, 2) else size - 1 - cue_size
    return slice(top, top + cue_size), slice(left, left + cue_size)


def render_cue_sample(rng: np.random.Generator, size: int, cls: int, corner: int,
                      cue_size: int) -> tuple[np.ndarray, np.ndarray]:
    """One float image [H,W,3] in [0, 1] with shape ``cls`` near the centre, the mark in
    ``corner``, and the shape's mask bool [H,W]."""
    image = texture(rng, size, size, contrast=0.15)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    radius = rng.uniform(0.22, 0.30) * size
    cy, cx = rng.uniform(0.42, 0.58, size=2) * size
    mask = shape_mask(SHAPE_NAMES[cls], yy - cy, xx - cx, radius, rng.uniform(0, 2 * np.pi))
    # A flat color at least 0.3 away from the background's mean color in every channel.
    image[mask] = np.mod(image.mean(axis=(0, 1)) + rng.uniform(0.3, 0.7, size=3), 1.0)
    rows, cols = cue_box(corner, size, cue_size)
    image[rows, cols] = CUE_COLOR
    mask[rows, cols] = False
    image = np.clip(image + rng.normal(0.0, 0.03, size=image.shape), 0.0, 1.0)
    return image.astype(np.float32), mask


def make_cue_split(num_images: int, size: int = 32, seed: int = 0, cue_agreement: float = 1.0,
                   cue_size: int = 4) -> CueSplit:
    """``num_images`` samples; the mark's corner equals the class with probability
    ``cue_agreement`` and is uniformly random otherwise (``cue_agreement=0`` for a test split)."""
    if not 0.0 <= cue_agreement <= 1.0:
        raise ValueError(f"cue_agreement={cue_agreement} must lie in [0, 1]")
    if size < 4 * (cue_size + 1):
        raise ValueError(f"image size {size} is too small for a {cue_size}-pixel mark; "
                         f"use size >= {4 * (cue_size + 1)}")
    rng = np.random.default_rng(seed)
    labels = rng.integers(len(SHAPE_NAMES), size=num_images)
    random_corner = rng.integers(4, size=num_images)
    cue = np.where(rng.random(num_images) < cue_agreement, labels, random_corner)
    images, masks = zip(*(render_cue_sample(np.random.default_rng([seed, i]), size, int(c),
                                            int(k), cue_size)
                          for i, (c, k) in enumerate(zip(labels, cue))))
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    return CueSplit(images=((pixels - MEAN) / STD).contiguous(),
                    masks=torch.from_numpy(np.stack(masks)), labels=torch.from_numpy(labels),
                    cue=torch.from_numpy(cue))
