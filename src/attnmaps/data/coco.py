"""MS-COCO instance annotations as semantic masks and image labels.

Layout under ``root`` (``split`` is e.g. ``train2017``, ``val2017`` or ``train2014``)::

    annotations/instances_<split>.json
    <split>/<file_name>   or   images/<split>/<file_name>

Categories map to contiguous classes 0..K-1 in increasing category id (the 80 COCO categories
become 0..79); the mask has 0 = background and class c = c + 1. Image labels are the categories
of all annotations of an image, crowd ones included; images without annotations have no labels
and an all-background mask.

Mask rendering rule: non-crowd instances are painted largest first (pixel count of the
rasterised instance), so smaller instances end up on top; equal sizes are painted in file order
(later on top). Crowd regions (``iscrowd=1``) are 255 (ignore) except where a non-crowd instance
covers them. Polygons are filled with PIL ``ImageDraw.polygon`` (outline pixels included;
polygons with fewer than three points are skipped); RLE may be uncompressed (``counts`` a list)
or compressed (``counts`` a string, decoded by :func:`decode_rle_counts`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..conventions import IGNORE_INDEX
from .base import ImageDataset, multi_hot


def decode_rle_counts(text: str) -> list[int]:
    """Run lengths of a compressed COCO RLE string.

    Each count is stored in 5-bit groups, least significant first, as characters ``48 + group``;
    bit 0x20 marks that another group follows and bit 0x10 of the last group is the sign. From
    the third count on, the value stored is the difference to the count two places before.

    >>> decode_rle_counts("253LN")
    [2, 5, 3, 1, 1]
    """
    counts: list[int] = []
    pos = 0
    while pos < len(text):
        value, shift, more = 0, 0, True
        while more:
            if pos >= len(text):
                raise ValueError(f"compressed RLE string {text!r} ends inside a count")
            group = ord(text[pos]) - 48
            if not 0 <= group < 64:
                raise ValueError(f"compressed RLE string {text!r} has invalid character "
                                 f"{text[pos]!r} at position {pos}")
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            pos += 1
            shift += 5
            if not more and group & 0x10:
                value -= 1 << shift
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def rle_to_mask(counts: list[int], height: int, width: int) -> np.ndarray:
    """Boolean [H,W] mask from run lengths over the column-major pixels (zeros run first)."""
    counts_arr = np.asarray(counts, dtype=np.int64)
    if (counts_arr < 0).any() or counts_arr.sum() != height * width:
        raise ValueError(f"RLE counts must be non-negative and sum to {height}x{width}="
                         f"{height * width} pixels, got sum {int(counts_arr.sum())}")
    values = np.arange(len(counts_arr)) % 2 == 1
    return np.repeat(values, counts_arr).reshape(width, height).T


def _polygon_mask(polygons: list, height: int, width: int) -> np.ndarray:
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for polygon in polygons:
        if len(polygon) >= 6:
            draw.polygon([float(v) for v in polygon], fill=1)
    return np.asarray(canvas, dtype=bool)


class COCODataset(ImageDataset):
    """COCO images with multi-hot labels over the categories and rendered semantic masks.

    ``options`` are those of :class:`~attnmaps.data.base.ImageDataset`.
    """

    has_background = True

    def __init__(self, root: str | Path, split: str = "train2017", **options: Any) -> None:
        super().__init__(**options)
        self.root = Path(root)
        self.annotation_file = self.root / "annotations" / f"instances_{split}.json"
        if not self.annotation_file.is_file():
            found = sorted(p.name for p in (self.root / "annotations").glob("instances_*.json"))
            raise FileNotFoundError(
                f"COCO annotation file for split {split!r} not found: expected "
                f"{self.annotation_file}; instance files present: {found or 'none'}")
        candidates = [self.root / split, self.root / "images" / split]
        image_dir = next((d for d in candidates if d.is_dir()), None)
        if image_dir is None:
            raise FileNotFoundError(f"COCO image folder for split {split!r} not found: expected "
                                    f"{candidates[0]} or {candidates[1]}")
        data = self._read_json()
        categories = sorted(data["categories"], key=lambda c: c["id"])
        self.category_to_class = {c["id"]: k for k, c in enumerate(categories)}
        self.class_names = ["background", *(c["name"] for c in categories)]
        self.num_classes = len(categories)
        images = sorted(data["images"], key=lambda im: im["id"])
        self.image_info = [(im["id"], int(im["height"]), int(im["width"])) for im in images]
        self.image_paths = [image_dir / im["file_name"] for im in images]
        self.ids = [Path(im["file_name"]).stem for im in images]
        known = {im["id"] for im in images}
        self.annotations: dict[int, list[dict]] = defaultdict(list)
        for ann in data["annotations"]:
            if ann.get("category_id") not in self.category_to_class:
                raise ValueError(f"{self.annotation_file}: annotation {ann.get('id')} has "
                                 f"category_id {ann.get('category_id')!r}, expected one of the "
                                 f"'categories' ids {sorted(self.category_to_class)}")
            if ann.get("image_id") not in known:
                raise ValueError(f"{self.annotation_file}: annotation {ann.get('id')} refers to "
                                 f"image_id {ann.get('image_id')!r}, which 'images' does not list")
            self.annotations[ann["image_id"]].append(ann)

    def _read_json(self) -> dict:
        try:
            data = json.loads(self.annotation_file.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{self.annotation_file} is not valid JSON: {err}") from err
        required = {"images": ("id", "file_name", "height", "width"),
                    "annotations": ("id", "image_id", "category_id"),
                    "categories": ("id", "name")}
        if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in required):
            raise ValueError(f"{self.annotation_file} must be a JSON object with lists under the "
                             f"keys {list(required)}")
        for key, fields in required.items():
            for entry in data[key]:
                missing = [f for f in fields if f not in entry]
                if missing:
                    raise ValueError(f"{self.annotation_file}: an entry of {key!r} lacks "
                                     f"{missing}; each needs {list(fields)}: {str(entry)[:200]}")
        return data

    def _instance_mask(self, ann: dict, height: int, width: int) -> np.ndarray:
        segmentation = ann.get("segmentation")
        if isinstance(segmentation, list):
            return _polygon_mask(segmentation, height, width)
        if isinstance(segmentation, dict) and "counts" in segmentation:
            size = [int(v) for v in segmentation.get("size", ())]
            if size != [height, width]:
                raise ValueError(f"{self.annotation_file}: annotation {ann['id']} has RLE size "
                                 f"{size}, expected the image's [height, width] = "
                                 f"{[height, width]}")
            counts = segmentation["counts"]
            if isinstance(counts, (bytes, str)):
                counts = decode_rle_counts(counts.decode() if isinstance(counts, bytes) else counts)
            try:
                return rle_to_mask(counts, height, width)
            except ValueError as err:
                raise ValueError(f"{self.annotation_file}: annotation {ann['id']}: {err}") from err
        raise ValueError(f"{self.annotation_file}: annotation {ann['id']} has segmentation of "
                         f"type {type(segmentation).__name__}; expected a list of polygons or an "
                         f"RLE dict with 'counts' and 'size'")

    def load_target(self, i: int, image_shape: tuple[int, ...]) -> tuple[np.ndarray,
                                                                           torch.Tensor]:
        image_id, height, width = self.image_info[i]
        if tuple(image_shape[:2]) != (height, width):
            raise ValueError(f"image {self.image_paths[i]} has size {image_shape[1]}x"
                             f"{image_shape[0]} (WxH) but {self.annotation_file} gives "
                             f"{width}x{height} for image id {image_id}")
        annotations = self.annotations.get(image_id, [])
        mask = np.zeros((height, width), dtype=np.uint8)
        instances = []
        for order, ann in enumerate(annotations):
            region = self._instance_mask(ann, height, width)
            if ann.get("iscrowd", 0):
                mask[region] = IGNORE_INDEX
            else:
                instances.append((-int(region.sum()), order, region, ann["category_id"]))
        for _, _, region, category in sorted(instances, key=lambda t: t[:2]):
            mask[region] = self.category_to_class[category] + 1
        return mask, self.image_labels(i)

    def image_labels(self, i: int) -> torch.Tensor:
        """The classes of all of item ``i``'s annotations, crowd regions included, from the
        annotation file alone (no image read, nothing rasterised)."""
        annotations = self.annotations.get(self.image_info[i][0], [])
        return multi_hot([self.category_to_class[ann["category_id"]] for ann in annotations],
                         self.num_classes)
