"""Image-level labels from class folders, with optional masks (e.g. EndoTect-style medical sets).

Layout under ``root``::

    <split>/<class_name>/<name>.png|.jpg|...    one folder per class, one label per image
    masks/<split>/<class_name>/<name>.png|...   optional mask of the image with the same name
    classes.txt                                  optional class names, one per line

Classes are those of ``classes.txt``, else the sorted union of the class folders of all splits
(every folder under ``root`` but ``masks``), so that all splits agree on them. Items have ids
``<class_name>/<stem>`` and one-hot labels (from the folder, never from the mask).

A mask marks where the image's class is; ``v`` below is that class's mask value (class index + 1
with background, the default; the class index without). Its stored values decide how it is read:

- binary, only 0 and 255 or only 0 and 1 (a lesion mask): nonzero is the object (``v``), 0 is
  background (0), or ignore (255) when ``has_background`` is False;
- index, only 0 (background), ``v`` and 255 (ignore): used as it is (0 not allowed without
  background);
- anything else, e.g. another class's value, raises ValueError naming the file.

PNG/BMP/TIFF/GIF masks keep their values: palette and grey indices, VOC palette colors or grey
RGB. JPEG masks (lossy, as HyperKvasir's ``segmented-images/masks``) are binary: grey >= 128 is
the object. A mask must have its image's size (resizing with ``image_size`` keeps them aligned);
a mask whose image is missing raises ValueError. Images without a mask have ``has_mask`` False.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..conventions import IGNORE_INDEX
from .base import ImageDataset, check_mask, multi_hot, read_names
from .image_io import read_image, read_mask

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
LOSSY_MASK_SUFFIXES = (".jpg", ".jpeg")
MASK_SUFFIXES = (".png", ".bmp", ".gif", ".tif", ".tiff", *LOSSY_MASK_SUFFIXES)
MASK_FOLDER = "masks"


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _split_folders(root: Path) -> list[Path]:
    return [p for p in _subfolders(root) if p.name != MASK_FOLDER]


def read_mask_values(path: Path) -> np.ndarray:
    """The stored values of a mask file as uint8 [H,W].

    JPEG: 255 where the grey level is >= 128, else 0. Other files: :func:`read_mask` (palette or
    grey indices, VOC palette colors), else the grey level of a grey image (e.g. a 1-bit PNG or
    white-on-black RGB).
    """
    if path.suffix.lower() in LOSSY_MASK_SUFFIXES:
        return np.where(read_image(path).mean(axis=2) >= 128, IGNORE_INDEX, 0).astype(np.uint8)
    try:
        return read_mask(path)
    except ValueError as err:
        rgb = read_image(path)
        if not (rgb == rgb[..., :1]).all():
            raise ValueError(f"mask {path} is neither grey nor in VOC palette colors "
                             f"({err})") from err
        return rgb[..., 0].copy()


class FolderDataset(ImageDataset):
    """Images with one class each, from ``root/<split>/<class_name>/``, and their optional masks
    from ``root/masks/<split>/<class_name>/``.

    ``has_background`` states whether the classes' objects lie on a background (it decides
    whether masks and pseudo masks have a background label). ``options`` are those of
    :class:`~attnmaps.data.base.ImageDataset`.
    """

    def __init__(self, root: str | Path, split: str = "train", has_background: bool = True,
                 **options: Any) -> None:
        super().__init__(**options)
        self.root = Path(root)
        split_dir = self.root / split
        if split == MASK_FOLDER or not split_dir.is_dir():
            found = [p.name for p in _split_folders(self.root)] if self.root.is_dir() else []
            raise FileNotFoundError(f"folder for split {split!r} not found: expected {split_dir}; "
                                    f"split folders present: {found or 'none'}")
        classes = self.root / "classes.txt"
        if classes.is_file():
            names = read_names(classes)
        else:
            names = sorted({c.name for s in _split_folders(self.root) for c in _subfolders(s)})
        index = {name: c for c, name in enumerate(names)}
        self.ids, self.image_paths, self.classes = [], [], []
        for folder in _subfolders(split_dir):
            if folder.name not in index:
                raise ValueError(f"class folder {folder} is not listed in {classes}; expected "
                                 f"one of {names}")
            for path in sorted(folder.iterdir()):
                if path.suffix.lower() in IMAGE_SUFFIXES:
                    self.ids.append(f"{folder.name}/{path.stem}")
                    self.image_paths.append(path)
                    self.classes.append(index[folder.name])
        duplicates = sorted(i for i, n in Counter(self.ids).items() if n > 1)
        if duplicates:
            raise ValueError(f"{split_dir} holds several images with id {duplicates[0]!r} "
                             f"(same name, different suffix); rename one of them")
        if not self.ids:
            raise ValueError(f"{split_dir} holds no images in class folders "
                             f"(<class_name>/<name> with suffix {'/'.join(IMAGE_SUFFIXES)})")
        masks = self._find_masks(self.root / MASK_FOLDER / split, split_dir)
        self.mask_paths: list[Path | None] = [masks.get(i) for i in self.ids]
        self.has_background = has_background
        self.num_classes = len(names)
        self.class_names = ["background", *names] if has_background else names

    def _find_masks(self, mask_dir: Path, split_dir: Path) -> dict[str, Path]:
        """Mask file by image id; raises for two masks of one id or a mask without image."""
        if not mask_dir.is_dir():
            return {}
        paths = [p for folder in _subfolders(mask_dir) for p in sorted(folder.iterdir())
                 if p.suffix.lower() in MASK_SUFFIXES]
        ids = [f"{p.parent.name}/{p.stem}" for p in paths]
        duplicates = sorted(i for i, n in Counter(ids).items() if n > 1)
        if duplicates:
            raise ValueError(f"{mask_dir} holds several masks with id {duplicates[0]!r} "
                             f"(same name, different suffix); keep one of them")
        known = set(self.ids)
        for mask_id, path in zip(ids, paths):
            if mask_id not in known:
                raise ValueError(f"mask {path} has no image {split_dir / mask_id}.* "
                                 f"(suffix {'/'.join(IMAGE_SUFFIXES)}); add the image or move "
                                 f"the mask")
        return dict(zip(ids, paths))

    def _read_mask(self, i: int, path: Path, image_shape: tuple[int, ...]) -> np.ndarray:
        values = read_mask_values(path)
        value = self.classes[i] + 1 if self.has_background else self.classes[i]
        present = set(np.unique(values).tolist())
        index_values = {value, IGNORE_INDEX} | ({0} if self.has_background else set())
        if present <= {0, IGNORE_INDEX} or present <= {0, 1}:
            rest = 0 if self.has_background else IGNORE_INDEX
            mask = np.where(values > 0, value, rest).astype(np.uint8)
        elif present <= index_values:
            mask = values
        else:
            name = self.class_names[value]
            raise ValueError(
                f"mask {path} has values {sorted(present)}; expected a binary mask (only 0 and "
                f"255, or only 0 and 1) or an index mask with values {sorted(index_values)} "
                f"({value} = {name!r}, the image's class folder; 255 = ignore"
                f"{'; 0 = background' if self.has_background else ''})")
        check_mask(mask, path, self.image_paths[i], image_shape, self.max_label)
        return mask

    def load_target(self, i: int, image_shape: tuple[int, ...]) -> tuple[np.ndarray | None,
                                                                           torch.Tensor]:
        path = self.mask_paths[i]
        mask = None if path is None else self._read_mask(i, path, image_shape)
        return mask, self.image_labels(i)

    def image_labels(self, i: int) -> torch.Tensor:
        """Item ``i``'s class (its folder) as a multi-hot vector; nothing is read."""
        return multi_hot([self.classes[i]], self.num_classes)
