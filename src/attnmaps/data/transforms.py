"""Resizing and augmentations that move an image [H,W,C] and its label mask [H,W] together.

Images keep their dtype through the geometric steps (uint8 stays uint8, anything else becomes
float32) and are resized bilinearly per channel, so any channel count works; masks always use
nearest neighbour, and pixels that a rotation or zoom brings in from outside the image become 255
(ignore) in the mask and 0 in the image. Randomness comes from ``torch``'s global generator, which
DataLoader seeds differently in each worker.

>>> augment = Augment(size=(224, 224), crop_scale=(0.5, 1.0), hflip=True)  # doctest: +SKIP
>>> image, mask = augment(image, mask)  # doctest: +SKIP
>>> image, mask, pseudo_mask = augment(image, mask, pseudo_mask)  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from ..conventions import IGNORE_INDEX

if TYPE_CHECKING:
    from ..config import DataConfig

CROP_RATIO = (3 / 4, 4 / 3)


def _per_channel(image: np.ndarray, op) -> np.ndarray:
    """Apply the PIL operation ``op`` to each channel (uint8 as "L", others as float32 "F"); a
    uint8 RGB image in one call, which PIL runs band by band with the same result."""
    if image.dtype == np.uint8 and image.shape[2] == 3:
        return np.array(op(Image.fromarray(np.ascontiguousarray(image))))
    dtype = np.uint8 if image.dtype == np.uint8 else np.float32
    planes = [np.asarray(op(Image.fromarray(np.ascontiguousarray(image[..., c], dtype=dtype))))
              for c in range(image.shape[2])]
    return np.stack(planes, axis=-1)


def resize_image(image: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """Bilinear resize of an [H,W,C] image to ``size`` = (H, W); ``None`` keeps it as it is."""
    if size is None or image.shape[:2] == tuple(size):
        return image
    height, width = size
    return _per_channel(image, lambda p: p.resize((width, height), Image.Resampling.BILINEAR))


def resize_mask(mask: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """Nearest-neighbour resize of a uint8 [H,W] mask to ``size`` = (H, W)."""
    if size is None or mask.shape == tuple(size):
        return mask
    height, width = size
    return np.asarray(Image.fromarray(mask).resize((width, height), Image.Resampling.NEAREST))


def affine_matrix(height: int, width: int, degrees: float,
                  scale: float) -> tuple[float, ...]:
    """PIL's inverse affine map for a counter-clockwise rotation by ``degrees`` and a scaling by
    ``scale`` (> 1 enlarges: a zoom in) about the centre of an image of ``height`` x ``width``:
    the map PIL's ``rotate`` builds, divided by ``scale``."""
    angle = -math.radians(degrees)
    a, b = round(math.cos(angle), 15) / scale, round(math.sin(angle), 15) / scale
    cx, cy = width / 2.0, height / 2.0
    return (a, b, cx - a * cx - b * cy, -b, a, cy + b * cx - a * cy)


def affine_image(image: np.ndarray, degrees: float = 0.0, scale: float = 1.0) -> np.ndarray:
    """``image`` [H,W,C] rotated and scaled (:func:`affine_matrix`; bilinear, fill 0), same size."""
    height, width = image.shape[:2]
    matrix = affine_matrix(height, width, degrees, scale)
    return _per_channel(image, lambda p: p.transform((width, height), Image.Transform.AFFINE,
                                                     matrix, Image.Resampling.BILINEAR,
                                                     fillcolor=0))


def affine_mask(mask: np.ndarray, degrees: float = 0.0, scale: float = 1.0) -> np.ndarray:
    """``mask`` [H,W] rotated and scaled like :func:`affine_image` (nearest, fill 255)."""
    height, width = mask.shape
    matrix = affine_matrix(height, width, degrees, scale)
    return np.asarray(Image.fromarray(mask).transform((width, height), Image.Transform.AFFINE,
                                                      matrix, Image.Resampling.NEAREST,
                                                      fillcolor=IGNORE_INDEX))


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * torch.rand(()).item()


def random_crop_box(height: int, width: int, scale: tuple[float, float],
                    ratio: tuple[float, float] = CROP_RATIO) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a crop covering a ``scale`` fraction of the area with aspect ratio
    w/h in ``ratio`` (log-uniform); after 10 failed draws, the whole image."""
    area = height * width
    for _ in range(10):
        target = area * _uniform(*scale)
        aspect = math.exp(_uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, ()).item())
            left = int(torch.randint(0, width - w + 1, ()).item())
            return top, left, h, w
    return 0, 0, height, width


def adjust_color(image: torch.Tensor, brightness: float, contrast: float,
                  saturation: float) -> torch.Tensor:
    """Scale brightness, contrast and saturation of an RGB image [3,H,W] in [0,1] (clamped).

    Brightness multiplies the values; contrast blends with the mean grey level; saturation
    blends with the per-pixel grey (ITU-R 601 luma), as PIL's ``ImageEnhance`` does.
    """
    luma = torch.tensor([0.299, 0.587, 0.114], dtype=image.dtype).view(3, 1, 1)
    image = (image * brightness).clamp(0, 1)
    mean = (image * luma).sum(0).mean()
    image = (mean + contrast * (image - mean)).clamp(0, 1)
    grey = (image * luma).sum(0, keepdim=True)
    return (grey + saturation * (image - grey)).clamp(0, 1)


@dataclass
class Augment:
    """Resize to ``size`` plus optional random augmentations for one image/mask pair.

    Geometric steps (``__call__``, on numpy arrays): random resized crop (area fraction in
    ``crop_scale``) then resize to ``size`` (the input size when ``None``), a rotation by an
    angle uniform in [-rotate, rotate] degrees and a zoom by a factor uniform in ``zoom`` (low,
    high; < 1 shrinks the scene inside a void border, > 1 enlarges its centre) about the centre,
    in one resampling, then a horizontal flip with probability 0.5.
    ``photometric`` applies color jitter (factors uniform in [1-j, 1+j]) to RGB tensors in [0,1].
    With no augmentation set the transform is deterministic (evaluation).
    """

    size: tuple[int, int] | None = None
    crop_scale: tuple[float, float] | None = None
    rotate: float = 0.0
    hflip: bool = False
    color_jitter: float = 0.0
    zoom: tuple[float, float] | None = None
    base_size: tuple[int, int] | None = field(init=False)  # ``size`` as constructed

    def __post_init__(self) -> None:
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 1):
            raise ValueError(f"image_size must be (H, W) with positive sizes, got {self.size}")
        self.base_size = self.size
        if self.crop_scale is not None:
            if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
                raise ValueError(f"data.crop_scale must be [low, high] with 0 < low <= high <= 1, "
                                 f"got {self.crop_scale}")
            self.crop_scale = (float(self.crop_scale[0]), float(self.crop_scale[1]))
        if not 0.0 <= self.rotate <= 180.0:
            raise ValueError(f"data.rotate must be a maximum angle in [0, 180] degrees, "
                             f"got {self.rotate}")
        if self.zoom is not None:
            if len(self.zoom) != 2 or not 0 < self.zoom[0] <= self.zoom[1]:
                raise ValueError(f"data.zoom must be [low, high] scale factors with 0 < low <= "
                                 f"high, e.g. [0.8, 1.2], got {self.zoom}")
            self.zoom = (float(self.zoom[0]), float(self.zoom[1]))
        if not 0.0 <= self.color_jitter < 1.0:
            raise ValueError(f"data.color_jitter must be in [0, 1), got {self.color_jitter}")

    def __call__(self, image: np.ndarray, *masks: np.ndarray) -> tuple[np.ndarray, ...]:
        """Transformed (image [H,W,C], *masks [H,W]): every mask (e.g. the label mask and a
        pseudo mask) goes through the same geometric steps; each must have the image's H, W."""
        size = self.size
        if self.crop_scale is not None:
            size = size or image.shape[:2]
            top, left, h, w = random_crop_box(*image.shape[:2], self.crop_scale)
            image = image[top:top + h, left:left + w]
            masks = tuple(mask[top:top + h, left:left + w] for mask in masks)
        image, masks = resize_image(image, size), [resize_mask(mask, size) for mask in masks]
        degrees = _uniform(-self.rotate, self.rotate) if self.rotate else 0.0
        scale = _uniform(*self.zoom) if self.zoom else 1.0
        if degrees or scale != 1.0:
            image = affine_image(image, degrees, scale)
            masks = [affine_mask(mask, degrees, scale) for mask in masks]
        if self.hflip and torch.rand(()).item() < 0.5:
            image, masks = image[:, ::-1], [mask[:, ::-1] for mask in masks]
        return (np.ascontiguousarray(image), *(np.ascontiguousarray(mask) for mask in masks))

    def photometric(self, image: torch.Tensor) -> torch.Tensor:
        """Color jitter of an RGB image [3,H,W] in [0,1]; other channel counts raise."""
        if not self.color_jitter:
            return image
        if image.shape[0] != 3:
            raise ValueError(f"data.color_jitter applies to RGB images only; got an image with "
                             f"{image.shape[0]} channels (set data.color_jitter=0)")
        low, high = 1.0 - self.color_jitter, 1.0 + self.color_jitter
        return adjust_color(image, _uniform(low, high), _uniform(low, high), _uniform(low, high))


def set_geometry(dataset: object, rotate: float, zoom: tuple[float, float] | None,
                 early_size: Sequence[int] | None = None) -> bool:
    """Set the maximum rotation and the zoom range of the :class:`Augment` of ``dataset`` (or
    of the dataset it wraps, through ``.dataset``), and its output size: ``early_size`` when
    given, else the size it was constructed with; False when there is none."""
    while dataset is not None:
        augment = getattr(dataset, "augment", None)
        if isinstance(augment, Augment):
            augment.rotate = float(rotate)
            augment.zoom = None if zoom is None else (float(zoom[0]), float(zoom[1]))
            augment.size = (augment.base_size if early_size is None
                            else (int(early_size[0]), int(early_size[1])))
            return True
        dataset = getattr(dataset, "dataset", None)
    return False


def set_geometry_at_epoch(dataset: object, cfg: DataConfig, epoch: int) -> bool:
    """:func:`set_geometry` with the rotation, zoom and size of ``cfg`` as they stand at
    ``epoch``: rotation and zoom off before ``cfg.rotate_start_epoch`` / ``cfg.zoom_start_epoch``
    (the curriculum), images at ``cfg.early_size`` before ``cfg.early_size_epochs`` and at their
    configured size from then on (progressive resizing)."""
    early = cfg.early_size is not None and epoch < cfg.early_size_epochs
    return set_geometry(dataset, cfg.rotate if epoch >= cfg.rotate_start_epoch else 0.0,
                        cfg.zoom if epoch >= cfg.zoom_start_epoch else None,
                        cfg.early_size if early else None)
