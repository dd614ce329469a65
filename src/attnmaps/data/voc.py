"""PASCAL-VOC-layout segmentation dataset.

Layout under ``root``::

    JPEGImages/<id>.jpg|.png          images
    SegmentationClass/<id>.png        optional palette/index masks (0 = background, 255 = ignore)
    SegmentationClassAug/<id>.png     optional SBD-augmented index masks (for ``train_aug``)
    ImageSets/Segmentation/<split>.txt  one id per line (e.g. train, val, train_aug)
    Annotations/<id>.xml              optional VOC XML, gives image labels when present
    classes.txt                       optional class names, background first

>>> ds = VOCDataset("VOC2012", split="val", image_size=(224, 224))  # doctest: +SKIP
>>> ds[0]["labels"].shape  # doctest: +SKIP
torch.Size([20])

Masks come from ``mask_dir`` (relative to ``root``). Left unset, splits whose name ends in
``_aug`` (``train_aug``: the 10,582 images of the SBD-augmented set) read
``SegmentationClassAug/`` when that folder exists, every other split ``SegmentationClass/``.
Ids without a mask file take their labels from ``Annotations/<id>.xml``.
"""

from __future__ import annotations

import warnings
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..conventions import IGNORE_INDEX
from .base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageDataset,
    check_mask,
    find_image,
    labels_from_mask,
    multi_hot,
    read_lines,
    read_names,
)
from .image_io import read_mask

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
MASK_DIR = "SegmentationClass"
AUG_MASK_DIR = "SegmentationClassAug"
AUG_SUFFIX = "_aug"


def default_mask_dir(root: Path, split: str) -> str:
    """``SegmentationClassAug`` for a ``*_aug`` split when ``root`` has it, else
    ``SegmentationClass``."""
    if split.endswith(AUG_SUFFIX) and (root / AUG_MASK_DIR).is_dir():
        return AUG_MASK_DIR
    return MASK_DIR


class VOCDataset(ImageDataset):
    """Images, multi-hot labels over the K foreground classes, and masks (255 = ignore).

    Mask value c+1 is model class c; 0 is background. Image labels come from Annotations XML when
    present for an id, else from the mask. With ``num_classes_check`` mask values above K (other
    than 255) raise ValueError; without it they are treated as ignore. ``mask_dir`` is the mask
    folder under ``root`` (``None``: :func:`default_mask_dir`). ``options`` are the
    augmentations of :class:`~attnmaps.data.base.ImageDataset` (crop_scale, rotate, color_jitter).
    """

    has_background = True

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        image_size: tuple[int, int] | None = None,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        hflip: bool = False,
        num_classes_check: bool = True,
        mask_dir: str | None = None,
        **options: Any,
    ) -> None:
        super().__init__(image_size, mean, std, hflip, **options)
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"VOC root directory not found: {self.root}")
        split_file = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not split_file.is_file():
            found = sorted(p.name for p in split_file.parent.glob("*.txt"))
            raise FileNotFoundError(
                f"split file for split {split!r} not found: expected {split_file}; "
                f"split files present: {found or 'none'}")
        self.ids = read_lines(split_file)
        if not self.ids:
            raise ValueError(f"split file {split_file} lists no ids")
        self.class_names = self._read_class_names()
        self.num_classes = len(self.class_names) - 1
        self.num_classes_check = num_classes_check
        self.mask_dir = self.root / (default_mask_dir(self.root, split) if mask_dir is None
                                     else mask_dir)
        if mask_dir is not None and not self.mask_dir.is_dir():
            raise FileNotFoundError(f"mask folder {self.mask_dir} (mask_dir={mask_dir!r}) not "
                                    f"found; expected a folder of <id>.png masks under {self.root}")
        self.image_paths = [find_image(self.root / "JPEGImages", i, (".jpg", ".png"))
                            for i in self.ids]

    def _read_class_names(self) -> list[str]:
        path = self.root / "classes.txt"
        if not path.is_file():
            if not any("voc" in part.lower() for part in self.root.resolve().parts):
                warnings.warn(f"{path} not found: using the 21 PASCAL VOC class names; write "
                              "classes.txt (background first, one name a line) for other data",
                              stacklevel=3)
            return list(VOC_CLASSES)
        names = read_names(path)
        if len(names) < 2:
            raise ValueError(f"{path} must list 2..255 distinct class names (background first), "
                             f"got {names}")
        return names

    def _read_mask(self, i: int, image_shape: tuple[int, ...]) -> np.ndarray | None:
        path = self.mask_dir / f"{self.ids[i]}.png"
        if not path.is_file():
            return None
        mask = read_mask(path)
        if not self.num_classes_check:
            bad = (mask > self.max_label) & (mask != IGNORE_INDEX)
            mask = np.where(bad, IGNORE_INDEX, mask).astype(np.uint8)
        check_mask(mask, path, self.image_paths[i], image_shape, self.max_label)
        return mask

    def _xml_labels(self, path: Path) -> list[int]:
        try:
            names = [(obj.findtext("name") or "").strip() for obj in ET.parse(path).iter("object")]
        except ET.ParseError as err:
            raise ValueError(f"cannot parse annotation file {path}: {err}") from err
        foreground = {name: c for c, name in enumerate(self.class_names[1:])}
        unknown = [name for name in names if name not in foreground]
        if unknown:
            raise ValueError(f"annotation file {path} names unknown class {unknown[0]!r}; "
                             f"expected one of {self.class_names[1:]}")
        return [foreground[name] for name in names]

    def _labels(self, i: int, mask: np.ndarray | None) -> torch.Tensor:
        xml = self.root / "Annotations" / f"{self.ids[i]}.xml"
        if xml.is_file():
            return multi_hot(self._xml_labels(xml), self.num_classes)
        if mask is None:
            raise ValueError(f"id {self.ids[i]!r} has neither an annotation file nor a mask, "
                             f"so it has no image labels")
        return labels_from_mask(mask, self.num_classes, has_background=True)

    def load_target(self, i: int, image_shape: tuple[int, ...]) -> tuple[np.ndarray | None,
                                                                           torch.Tensor]:
        mask = self._read_mask(i, image_shape)
        return mask, self._labels(i, mask)
