"""ADE20K SceneParsing (ADEChallengeData2016): 150 classes plus "other".

Layout under ``root`` (``split`` is ``training`` or ``validation``; ``train``/``val`` also work)::

    images/<split>/<id>.jpg
    annotations/<split>/<id>.png     index PNG, 0 = other, 1..150 = classes
    objectInfo150.csv                optional (Idx,...,Name); else the built-in names

Value 0 ("other", unlabelled stuff) is ignore by default (``has_background=False``: mask value
v becomes class v - 1, 0 becomes 255), the usual ADE20K evaluation. With ``has_background=True``
it is the background (mask values unchanged, ``class_names[0] == "other"``). Image labels are the
classes present in the annotation.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..conventions import IGNORE_INDEX
from .base import ImageDataset, check_mask, labels_from_mask
from .image_io import read_mask

ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug",
    "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub",
    "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter",
    "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs",
    "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning",
    "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel", "pole",
    "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van",
    "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool",
    "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light",
    "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board",
    "shower", "radiator", "glass", "clock", "flag",
)
SPLIT_ALIASES = {"train": "training", "val": "validation"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def read_object_info(path: Path) -> list[str]:
    """Class names from ``objectInfo150.csv``: column Name, first of its ';'-separated synonyms,
    rows ordered by column Idx = 1..N."""
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"Idx", "Name"} <= set(reader.fieldnames):
            raise ValueError(f"{path} must have columns 'Idx' and 'Name', got {reader.fieldnames}")
        rows = [(row["Idx"], row["Name"]) for row in reader]
    indices = [int(idx) if idx.strip().isdigit() else idx for idx, _ in rows]
    if indices != list(range(1, len(rows) + 1)) or len(rows) >= IGNORE_INDEX:
        raise ValueError(f"{path}: column 'Idx' must run 1..N (N < 255) in order, got "
                         f"{indices[:5]}{'...' if len(indices) > 5 else ''}")
    return [name.split(";")[0].strip() for _, name in rows]


class ADE20KDataset(ImageDataset):
    """ADE20K images, multi-hot labels over the 150 classes and their masks.

    ``options`` are those of :class:`~attnmaps.data.base.ImageDataset`.
    """

    def __init__(self, root: str | Path, split: str = "training", has_background: bool = False,
                 **options: Any) -> None:
        super().__init__(**options)
        self.root = Path(root)
        split = SPLIT_ALIASES.get(split, split)
        image_dir = self.root / "images" / split
        self.mask_dir = self.root / "annotations" / split
        for folder in (image_dir, self.mask_dir):
            if not folder.is_dir():
                found = sorted(p.name for p in folder.parent.glob("*") if p.is_dir())
                raise FileNotFoundError(f"ADE20K folder for split {split!r} not found: expected "
                                        f"{folder}; folders present: {found or 'none'}")
        self.image_paths = sorted(p for p in image_dir.iterdir()
                                  if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.image_paths:
            raise ValueError(f"{image_dir} holds no images ({'/'.join(IMAGE_SUFFIXES)})")
        self.ids = [p.stem for p in self.image_paths]
        missing = [i for i in self.ids if not (self.mask_dir / f"{i}.png").is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} images of {image_dir} have no annotation "
                                    f"in {self.mask_dir}, e.g. expected "
                                    f"{self.mask_dir / (missing[0] + '.png')}")
        info = self.root / "objectInfo150.csv"
        names = read_object_info(info) if info.is_file() else list(ADE20K_CLASSES)
        self.has_background = has_background
        self.num_classes = len(names)
        self.class_names = ["other", *names] if has_background else names

    def load_target(self, i: int, image_shape: tuple[int, ...]) -> tuple[np.ndarray,
                                                                           torch.Tensor]:
        path = self.mask_dir / f"{self.ids[i]}.png"
        mask = read_mask(path)
        check_mask(mask, path, self.image_paths[i], image_shape, self.num_classes)
        if not self.has_background:
            mask = np.where((mask == 0) | (mask == IGNORE_INDEX), IGNORE_INDEX, mask - 1).astype(np.uint8)
        return mask, labels_from_mask(mask, self.num_classes, self.has_background)
