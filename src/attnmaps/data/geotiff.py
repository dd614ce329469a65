"""Multispectral GeoTIFF scenes (e.g. Sentinel-2, DFC2020 / SEN12MS style) with label rasters.

Layout under ``root``::

    images/<id>.tif              C bands, planar (C,H,W) or interleaved (H,W,C)
    masks/<id>.tif | <id>.png    optional single-band label raster
    splits/<split>.txt           one id per line
    classes.txt                  the K class names, one per line

Needs the optional package ``tifffile`` (``pip install tifffile``). Band values are used as
stored (uint8 bands are divided by 255), so ``mean``/``std`` hold one value per band in those
units; an image whose band count differs from ``len(mean)`` raises an error naming the file.

Label rasters: ``label_map[v]`` gives the label of stored value v (255 = invalid/ignore), e.g.
:data:`DFC2020_LABEL_MAP` maps the 10 DFC2020 values to the 8 classes used in the literature
and 0 (no data) to ignore. The labels then follow the project convention: class c is c without
background (the default) and c + 1 with ``has_background`` (0 = background). Image labels are the
classes covering at least ``label_min_fraction`` of an image's non-ignore pixels (reference: 0.1).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..conventions import IGNORE_INDEX
from .base import (
    ImageDataset,
    check_mask,
    find_image,
    labels_from_mask,
    read_lines,
    read_names,
)
from .image_io import read_mask

DFC2020_CLASSES = ("forest", "shrubland", "grassland", "wetlands", "croplands",
                   "urban_built-up", "barren", "water")
# DFC2020 values 1..10: forest, shrubland, savanna, grassland, wetlands, croplands, urban,
# snow/ice, barren, water; savanna and snow/ice are absent from the validation data and ignored.
DFC2020_LABEL_MAP = (255, 0, 1, 255, 2, 3, 4, 5, 255, 6, 7)
IMAGE_SUFFIXES = (".tif", ".tiff")
MASK_SUFFIXES = (*IMAGE_SUFFIXES, ".png")


def _tifffile():
    try:
        import tifffile
    except ImportError as err:
        raise ImportError("reading GeoTIFF files needs the optional package tifffile: "
                          "pip install tifffile (or pip install 'attnmaps[geo]')") from err
    return tifffile


def read_tiff(path: Path) -> np.ndarray:
    """A TIFF raster as [H,W,C] in its stored dtype (single-band rasters get C = 1)."""
    if not path.is_file():
        raise FileNotFoundError(f"GeoTIFF file not found: {path}")
    tifffile = _tifffile()
    try:
        with tifffile.TiffFile(path) as tif:
            array, axes = tif.asarray(), tif.series[0].axes
    except (OSError, ValueError, tifffile.TiffFileError) as err:
        raise ValueError(f"cannot read TIFF file {path}: {err}") from err
    if array.ndim == 2:
        return array[..., None]
    if array.ndim != 3 or "Y" not in axes or "X" not in axes:
        raise ValueError(f"TIFF file {path} has shape {array.shape} (axes {axes!r}); expected a "
                         f"2-D raster or 3-D bands x height x width")
    band_axis = next(k for k, a in enumerate(axes) if a not in "YX")
    return np.moveaxis(array, band_axis, -1)


class GeoTIFFDataset(ImageDataset):
    """Multispectral scenes, multi-hot labels from the label rasters, and the rasters as masks.

    ``options`` are those of :class:`~attnmaps.data.base.ImageDataset`; ``mean`` and ``std``
    need one value per band.
    """

    channels = None

    def __init__(self, root: str | Path, split: str = "train", has_background: bool = False,
                 label_map: Sequence[int] | None = None, label_min_fraction: float = 0.0,
                 **options: Any) -> None:
        super().__init__(**options)
        _tifffile()
        self.root = Path(root)
        split_file = self.root / "splits" / f"{split}.txt"
        if not split_file.is_file():
            found = sorted(p.name for p in split_file.parent.glob("*.txt"))
            raise FileNotFoundError(f"split file for split {split!r} not found: expected "
                                    f"{split_file}; split files present: {found or 'none'}")
        self.ids = read_lines(split_file)
        if not self.ids:
            raise ValueError(f"split file {split_file} lists no ids")
        classes = self.root / "classes.txt"
        if not classes.is_file():
            raise FileNotFoundError(f"class list not found: expected {classes} with the class "
                                    f"names, one per line")
        names = read_names(classes)
        self.has_background = has_background
        self.num_classes = len(names)
        self.class_names = ["background", *names] if has_background else names
        if not 0.0 <= label_min_fraction <= 1.0:
            raise ValueError(f"data.label_min_fraction must be in [0, 1], got "
                             f"{label_min_fraction}")
        self.label_min_fraction = label_min_fraction
        self.label_map = None if label_map is None else np.asarray(label_map, dtype=np.int64)
        if self.label_map is not None and (self.label_map.ndim != 1 or not len(self.label_map)
                                           or self.label_map.min() < 0
                                           or self.label_map.max() > IGNORE_INDEX):
            raise ValueError(f"data.label_map must list labels in 0..255 (255 = ignore), one per "
                             f"stored mask value, got {label_map}")
        self.image_paths = [find_image(self.root / "images", i, IMAGE_SUFFIXES) for i in self.ids]

    def load_image(self, i: int) -> np.ndarray:
        return read_tiff(self.image_paths[i])

    def stored_size(self, i: int) -> tuple[int, int]:
        """(H, W) of item i's raster (read in full: band layouts vary)."""
        height, width = self.load_image(i).shape[:2]
        return height, width

    def _read_mask(self, path: Path) -> np.ndarray:
        if path.suffix.lower() == ".png":
            values = read_mask(path).astype(np.int64)
        else:
            raster = read_tiff(path)
            if raster.shape[2] != 1 or not np.issubdtype(raster.dtype, np.integer):
                raise ValueError(f"mask {path} must be a single-band integer raster, got "
                                 f"{raster.shape[2]} bands of {raster.dtype}")
            values = raster[..., 0].astype(np.int64)
        if self.label_map is None:
            bad = (values < 0) | (values > IGNORE_INDEX)
            if bad.any():
                raise ValueError(f"mask {path} has values {np.unique(values[bad])[:10].tolist()} "
                                 f"outside 0..255; set data.label_map to map them to classes")
            return values.astype(np.uint8)
        bad = (values < 0) | (values >= len(self.label_map))
        if bad.any():
            raise ValueError(f"mask {path} has values {np.unique(values[bad])[:10].tolist()} "
                             f"that data.label_map (values 0..{len(self.label_map) - 1}) "
                             f"does not map")
        return self.label_map[values].astype(np.uint8)

    def load_target(self, i: int, image_shape: tuple[int, ...]) -> tuple[np.ndarray,
                                                                           torch.Tensor]:
        candidates = [self.root / "masks" / f"{self.ids[i]}{s}" for s in MASK_SUFFIXES]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise FileNotFoundError(f"id {self.ids[i]!r} has no label raster, so it has no image "
                                    f"labels: expected one of {[str(p) for p in candidates]}")
        mask = self._read_mask(path)
        check_mask(mask, path, self.image_paths[i], image_shape, self.max_label)
        labels = labels_from_mask(mask, self.num_classes, self.has_background,
                                  self.label_min_fraction)
        return mask, labels
