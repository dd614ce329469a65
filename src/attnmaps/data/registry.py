"""Datasets selected by name in the config (``data.name``)."""

from __future__ import annotations

from pathlib import Path

from ..config import DataConfig
from .ade20k import ADE20KDataset
from .base import ImageDataset
from .coco import COCODataset
from .folder import FolderDataset
from .geotiff import GeoTIFFDataset
from .manifest import ManifestDataset
from .synthetic import write_synthetic_voc
from .voc import VOCDataset

LOADERS: dict[str, type[ImageDataset]] = {
    "voc": VOCDataset,
    "synthetic": VOCDataset,
    "coco": COCODataset,
    "ade20k": ADE20KDataset,
    "geotiff": GeoTIFFDataset,
    "folder": FolderDataset,
    "manifest": ManifestDataset,
}
DATASETS = tuple(LOADERS)
OPTIONAL_BACKGROUND = ("ade20k", "geotiff", "folder", "manifest")
GEOTIFF_ONLY = ("label_map", "label_min_fraction")


def build_dataset(cfg: DataConfig, split: str, train: bool) -> ImageDataset:
    """The dataset ``cfg.name`` for ``split``.

    Training sets get the configured augmentations (``hflip``, ``crop_scale``, ``rotate``,
    ``zoom``, ``color_jitter``) and, with ``normalize_on_device``, keep uint8 images for the
    training loop to normalise on its device; evaluation sets are only resized,
    deterministically. ``synthetic`` reads
    the VOC layout like ``voc`` and, when ``cfg.root`` does not exist yet, first writes the
    default synthetic set there.
    """
    if cfg.name not in LOADERS:
        raise ValueError(f"data.name={cfg.name!r} is not a known dataset; expected one of "
                         f"{DATASETS}")
    if cfg.root is None:
        raise ValueError(f"data.root is not set; give the directory of the {cfg.name} dataset")
    root = Path(cfg.root)
    if cfg.name == "synthetic" and not root.exists():
        write_synthetic_voc(root)
    options: dict = {"image_size": None if cfg.image_size is None else tuple(cfg.image_size),
                     "mean": tuple(cfg.mean), "std": tuple(cfg.std)}
    if train:
        options.update(hflip=cfg.hflip, rotate=cfg.rotate, color_jitter=cfg.color_jitter,
                       crop_scale=None if cfg.crop_scale is None else tuple(cfg.crop_scale),
                       zoom=None if cfg.zoom is None else tuple(cfg.zoom),
                       uint8_images=cfg.normalize_on_device)
    if cfg.has_background is not None:
        if cfg.name in OPTIONAL_BACKGROUND:
            options["has_background"] = cfg.has_background
        elif not cfg.has_background:
            raise ValueError(f"data.has_background=false does not apply to data.name={cfg.name}, "
                             f"whose masks always have background 0; it applies to "
                             f"{OPTIONAL_BACKGROUND}")
    if cfg.name == "manifest":
        options["allow_outside_root"] = cfg.allow_outside_root
    elif cfg.allow_outside_root:
        raise ValueError(f"data.allow_outside_root applies to data.name=manifest only; unset it "
                         f"for data.name={cfg.name}")
    if cfg.name == "geotiff":
        options.update(label_map=cfg.label_map, label_min_fraction=cfg.label_min_fraction)
    else:
        defaults = DataConfig()
        for key in GEOTIFF_ONLY:
            if getattr(cfg, key) != getattr(defaults, key):
                raise ValueError(f"data.{key} applies to data.name=geotiff only; unset it for "
                                 f"data.name={cfg.name}")
    return LOADERS[cfg.name](root, split, **options)
