"""What every dataset format shares: the sample dict, value scaling, normalization, label checks.

A format subclasses :class:`ImageDataset`, sets ``ids``, ``image_paths``, ``class_names``,
``num_classes`` and ``has_background``, and implements :meth:`ImageDataset.load_target` (and
:meth:`ImageDataset.load_image` when its images are not RGB files). Each item is::

    {"image": float [C,H,W] normalized, "labels": float multi-hot [K], "mask": long [H,W],
     "has_mask": bool, "id": str}

Mask convention: with background, value 0 is background and model class ``c`` is ``c + 1``;
without, class ``c`` is ``c``. 255 is ignore; images without a mask get an all-255 mask.
``class_names[v]`` names mask value ``v`` (so it starts with the background when there is one).

Pixel values: uint8 images are divided by 255, any other dtype (e.g. uint16 GeoTIFF reflectances)
is used as it is; ``mean``/``std`` (one value per channel) are in those units. With
``uint8_images`` a uint8 image stays uint8 [C,H,W] (a quarter of the bytes through the loader and
the host-to-device copy); :func:`normalize_images` then scales and normalises the batch on its
device, with the same result.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..conventions import IGNORE_INDEX
from .image_io import read_image, read_image_size
from .transforms import Augment, resize_image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def image_to_float(image: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """``image`` as floats of ``dtype``: uint8 divided by 255, other dtypes unchanged in value."""
    if image.dtype == np.uint8:
        return image.astype(dtype) / dtype(255.0)
    return image.astype(dtype)


def normalize_images(images: torch.Tensor, mean: torch.Tensor,
                     std: torch.Tensor) -> torch.Tensor:
    """``(images / 255 - mean) / std`` in float32 for uint8 ``images`` [..., C, H, W] (other
    dtypes without the division); ``mean`` and ``std`` are [C, 1, 1]."""
    scaled = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    return (scaled - mean) / std


def multi_hot(classes: Iterable[int], num_classes: int) -> torch.Tensor:
    """float [K] with ones at ``classes``."""
    labels = torch.zeros(num_classes, dtype=torch.float32)
    labels[sorted(set(classes))] = 1.0
    return labels


def labels_from_mask(mask: np.ndarray, num_classes: int, has_background: bool,
                     min_fraction: float = 0.0) -> torch.Tensor:
    """Multi-hot labels of the classes in ``mask`` covering at least ``min_fraction`` of its
    non-ignore pixels (any pixel when 0)."""
    offset = 1 if has_background else 0
    counts = np.bincount(mask.ravel(), minlength=256)[offset:offset + num_classes]
    valid = (mask != IGNORE_INDEX).sum()
    present = (counts > 0) & (counts >= min_fraction * valid)
    return multi_hot(np.flatnonzero(present).tolist(), num_classes)


def check_mask(mask: np.ndarray, path: Path, image_path: Path, image_shape: Sequence[int],
               max_label: int) -> None:
    """Raise ValueError when ``mask`` does not match the image size or holds values outside
    0..max_label and 255."""
    if mask.shape != tuple(image_shape[:2]):
        raise ValueError(
            f"mask {path} has size {mask.shape[1]}x{mask.shape[0]} (WxH) but image "
            f"{image_path} has size {image_shape[1]}x{image_shape[0]}")
    bad = (mask > max_label) & (mask != IGNORE_INDEX)
    if bad.any():
        raise ValueError(f"mask {path} has values {np.unique(mask[bad]).tolist()} outside "
                         f"0..{max_label} (or {IGNORE_INDEX} = ignore)")


def find_image(folder: Path, image_id: str, suffixes: Sequence[str]) -> Path:
    """The first existing ``folder/<image_id><suffix>``; FileNotFoundError lists the candidates."""
    candidates = [folder / f"{image_id}{suffix}" for suffix in suffixes]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"no image for id {image_id!r}: expected one of "
                            f"{[str(p) for p in candidates]}")


def read_lines(path: Path) -> list[str]:
    """The non-empty lines of a text file, stripped (split files, id lists, class lists)."""
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def read_names(path: Path) -> list[str]:
    """Distinct non-empty lines of a class list file (at most 255)."""
    names = read_lines(path)
    if not names or len(set(names)) != len(names) or len(names) > IGNORE_INDEX:
        shown = names if len(names) <= 10 else [*names[:10], "..."]
        raise ValueError(f"{path} must list 1..255 distinct class names, one per line, "
                         f"got {len(names)}: {shown}")
    return names


class ImageDataset(Dataset):
    """Shared loading of one sample: read, check, augment/resize, scale, normalize."""

    has_background: bool = True
    channels: int | None = 3  # fixed channel count of the format; None = as many as mean has
    ids: list[str]
    image_paths: list[Path]
    class_names: list[str]
    num_classes: int

    def __init__(
        self,
        image_size: tuple[int, int] | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        hflip: bool = False,
        crop_scale: tuple[float, float] | None = None,
        rotate: float = 0.0,
        color_jitter: float = 0.0,
        uint8_images: bool = False,
        zoom: tuple[float, float] | None = None,
    ) -> None:
        expected = self.channels or len(mean)
        if len(mean) != expected or len(std) != expected or min(std) <= 0:
            raise ValueError(f"mean and std need {expected} values (std > 0), got mean={mean}, "
                             f"std={std}")
        if uint8_images and color_jitter:
            raise ValueError("uint8 images (data.normalize_on_device) leave the color jitter "
                             "nowhere to run; set data.color_jitter=0 or "
                             "data.normalize_on_device=false")
        self.uint8_images = uint8_images
        size = None if image_size is None else tuple(int(s) for s in image_size)
        self.augment = Augment(size, crop_scale, rotate, hflip, color_jitter, zoom)
        self.image_size = size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def max_label(self) -> int:
        """The largest class value in a mask: K with background, K - 1 without."""
        return self.num_classes if self.has_background else self.num_classes - 1

    def load_image(self, i: int) -> np.ndarray:
        """The stored image of item i as [H,W,C] (RGB uint8 here; formats may override)."""
        return read_image(self.image_paths[i])

    def load_target(self, i: int, image_shape: tuple[int, ...]) -> tuple[np.ndarray | None,
                                                                           torch.Tensor]:
        """(uint8 mask [H,W] in the project convention or None, multi-hot labels [K])."""
        raise NotImplementedError

    def checked_image(self, i: int) -> np.ndarray:
        """:meth:`load_image` after checking it has one channel per ``mean`` value."""
        image = self.load_image(i)
        if image.ndim != 3 or image.shape[2] != self.mean.shape[0]:
            channels = image.shape[2] if image.ndim == 3 else 1
            raise ValueError(
                f"image {self.image_paths[i]} has {channels} channels, expected "
                f"{self.mean.shape[0]} (one per data.mean/data.std value and model.in_chans)")
        return image

    def raw_image(self, i: int) -> np.ndarray:
        """Item i's image in its stored dtype, resized when image_size is set, not augmented."""
        return resize_image(self.checked_image(i), self.image_size)

    def stored_size(self, i: int) -> tuple[int, int]:
        """(H, W) of item i's stored image, from the file header (formats may override)."""
        return read_image_size(self.image_paths[i])

    def image_labels(self, i: int) -> torch.Tensor:
        """Item ``i``'s multi-hot labels [K] as stored: not augmented (no random draws), and the
        image not decoded (its size from the header, for the mask check)."""
        return self.load_target(i, self.stored_size(i))[1]

    def __getitem__(self, i: int) -> dict:
        image = self.checked_image(i)
        mask, labels = self.load_target(i, image.shape)
        return self.make_sample(i, image, mask, labels)

    def make_sample(self, i: int, image: np.ndarray, mask: np.ndarray | None,
                    labels: torch.Tensor, pseudo_mask: np.ndarray | None = None) -> dict:
        """Item ``i``'s sample from its stored image, mask (None: all ignore) and labels:
        augmented together, scaled and normalized (a uint8 image is kept as it is with
        ``uint8_images``). A ``pseudo_mask`` [H,W] (uint8, the image's size) goes through the
        same geometric steps and into the sample as ``"pseudo_mask"``."""
        has_mask = mask is not None
        if mask is None:
            mask = np.full(image.shape[:2], IGNORE_INDEX, dtype=np.uint8)
        masks = (mask,) if pseudo_mask is None else (mask, pseudo_mask)
        image, *masks = self.augment(image, *masks)
        if self.uint8_images and image.dtype == np.uint8:
            tensor = torch.from_numpy(image).permute(2, 0, 1)
        else:
            unit = torch.from_numpy(image_to_float(image)).permute(2, 0, 1)
            tensor = normalize_images(self.augment.photometric(unit), self.mean, self.std)
        sample = {"image": tensor.contiguous(), "labels": labels,
                  "mask": torch.from_numpy(masks[0].astype(np.int64)), "has_mask": has_mask,
                  "id": self.ids[i]}
        if pseudo_mask is not None:
            sample["pseudo_mask"] = torch.from_numpy(masks[1].astype(np.int64))
        return sample
