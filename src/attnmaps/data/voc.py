"""PASCAL-VOC-layout segmentation dataset.

Layout under ``root``::

    JPEGImages/<id>.jpg|.png          images
    SegmentationClass/<id>.png        optional palette/index masks (0 = background, 255 = ignore)
    ImageSets/Segmentation/<split>.txt  one id per line
    Annotations/<id>.xml              optional VOC XML, gives image labels when present
    classes.txt                       optional class names, background first

>>> ds = VOCDataset("VOC2012", split="val", image_size=(224, 224))  # doctest: +SKIP
>>> ds[0]["labels"].shape  # doctest: +SKIP
torch.Size([20])
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from attnmaps.data.image_io import read_image, read_mask

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
IGNORE = 255


class VOCDataset(Dataset):
    """Images, multi-hot labels over the K foreground classes, and masks (255 = ignore).

    Mask value c+1 is model class c; 0 is background. Image labels come from Annotations XML when
    present for an id, else from the mask. With ``num_classes_check`` mask values above K (other
    than 255) raise ValueError; without it they are treated as ignore.
    """

    has_background = True

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        image_size: tuple[int, int] | None = None,
        mean: tuple[float, ...] = (0.485, 0.456, 0.406),
        std: tuple[float, ...] = (0.229, 0.224, 0.225),
        hflip: bool = False,
        num_classes_check: bool = True,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"VOC root directory not found: {self.root}")
        split_file = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not split_file.is_file():
            found = sorted(p.name for p in split_file.parent.glob("*.txt"))
            raise FileNotFoundError(
                f"split file for split {split!r} not found: expected {split_file}; "
                f"split files present: {found or 'none'}")
        self.ids = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
        if not self.ids:
            raise ValueError(f"split file {split_file} lists no ids")
        self.class_names = self._read_class_names()
        self.num_classes = len(self.class_names) - 1
        if image_size is not None and (len(image_size) != 2 or min(image_size) < 1):
            raise ValueError(f"image_size must be (H, W) with positive sizes, got {image_size}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need 3 values (std > 0), got mean={mean}, std={std}")
        self.image_size = None if image_size is None else (int(image_size[0]), int(image_size[1]))
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.hflip = hflip
        self.num_classes_check = num_classes_check
        self._image_paths = [self._find_image(i) for i in self.ids]

    def _read_class_names(self) -> list[str]:
        path = self.root / "classes.txt"
        if not path.is_file():
            return list(VOC_CLASSES)
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if len(names) < 2 or len(set(names)) != len(names) or len(names) > IGNORE:
            raise ValueError(f"{path} must list 2..255 distinct class names (background first), "
                             f"got {names}")
        return names

    def _find_image(self, image_id: str) -> Path:
        candidates = [self.root / "JPEGImages" / f"{image_id}{ext}" for ext in (".jpg", ".png")]
        for path in candidates:
            if path.is_file():
                return path
        raise FileNotFoundError(f"no image for id {image_id!r}: expected one of "
                                f"{[str(p) for p in candidates]}")

    def __len__(self) -> int:
        return len(self.ids)

    def _resize(self, array: np.ndarray, resample: Image.Resampling) -> np.ndarray:
        if self.image_size is None:
            return array
        height, width = self.image_size
        return np.array(Image.fromarray(array).resize((width, height), resample))

    def raw_image(self, i: int) -> np.ndarray:
        """The uint8 [H,W,3] image of item i (resized when image_size is set, never flipped)."""
        return self._resize(read_image(self._image_paths[i]), Image.Resampling.BILINEAR)

    def _read_mask(self, i: int, image_shape: tuple[int, ...]) -> np.ndarray | None:
        path = self.root / "SegmentationClass" / f"{self.ids[i]}.png"
        if not path.is_file():
            return None
        mask = read_mask(path)
        if mask.shape != image_shape[:2]:
            raise ValueError(
                f"mask {path} has size {mask.shape[1]}x{mask.shape[0]} (WxH) but image "
                f"{self._image_paths[i]} has size {image_shape[1]}x{image_shape[0]}")
        bad = (mask > self.num_classes) & (mask != IGNORE)
        if bad.any():
            if self.num_classes_check:
                raise ValueError(
                    f"mask {path} has values {np.unique(mask[bad]).tolist()} outside "
                    f"0..{self.num_classes} (or {IGNORE} = ignore)")
            mask = np.where(bad, IGNORE, mask).astype(np.uint8)
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
            classes = self._xml_labels(xml)
        elif mask is not None:
            classes = [int(v) - 1 for v in np.unique(mask) if v not in (0, IGNORE)]
        else:
            raise ValueError(f"id {self.ids[i]!r} has neither an annotation file nor a mask, "
                             f"so it has no image labels")
        labels = torch.zeros(self.num_classes, dtype=torch.float32)
        labels[classes] = 1.0
        return labels

    def __getitem__(self, i: int) -> dict:
        raw = read_image(self._image_paths[i])
        mask = self._read_mask(i, raw.shape)
        labels = self._labels(i, mask)
        image = torch.from_numpy(self._resize(raw, Image.Resampling.BILINEAR)).permute(2, 0, 1)
        image = (image.float() / 255.0 - self.mean) / self.std
        if mask is None:
            target = torch.full(image.shape[1:], IGNORE, dtype=torch.int64)
        else:
            target = torch.from_numpy(self._resize(mask, Image.Resampling.NEAREST)).long()
        if self.hflip and torch.rand(()).item() < 0.5:
            image, target = image.flip(-1), target.flip(-1)
        return {"image": image.contiguous(), "labels": labels, "mask": target.contiguous(),
                "has_mask": mask is not None, "id": self.ids[i]}
