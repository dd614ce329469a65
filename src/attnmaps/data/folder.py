"""Image-level labels from class folders (e.g. EndoTect-style medical image sets).

Layout under ``root``::

    <split>/<class_name>/<name>.png|.jpg|...   one folder per class, one label per image
    classes.txt                                 optional class names, one per line

Classes are those of ``classes.txt``, else the sorted union of the class folders of all splits
(every folder under ``root``), so that all splits agree on them. Items have ids
``<class_name>/<stem>``, one-hot labels and no mask (all 255).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import torch

from .base import ImageDataset, multi_hot, read_names

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


class FolderDataset(ImageDataset):
    """Images with one class each, from ``root/<split>/<class_name>/``.

    ``has_background`` only states whether the classes' objects lie on a background (it decides
    whether pseudo masks have a background label). ``options`` are those of
    :class:`~attnmaps.data.base.ImageDataset`.
    """

    def __init__(self, root: str | Path, split: str = "train", has_background: bool = True,
                 **options: Any) -> None:
        super().__init__(**options)
        self.root = Path(root)
        split_dir = self.root / split
        if not split_dir.is_dir():
            found = [p.name for p in _subfolders(self.root)] if self.root.is_dir() else []
            raise FileNotFoundError(f"folder for split {split!r} not found: expected {split_dir}; "
                                    f"split folders present: {found or 'none'}")
        classes = self.root / "classes.txt"
        if classes.is_file():
            names = read_names(classes)
        else:
            names = sorted({c.name for s in _subfolders(self.root) for c in _subfolders(s)})
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
        self.has_background = has_background
        self.num_classes = len(names)
        self.class_names = ["background", *names] if has_background else names

    def load_target(self, i: int, image_shape: tuple[int, ...]) -> tuple[None, torch.Tensor]:
        return None, multi_hot([self.classes[i]], self.num_classes)

