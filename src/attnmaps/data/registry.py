"""Datasets selected by name in the config (``data.name``)."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from ..config import DataConfig
from .synthetic import write_synthetic_voc
from .voc import VOCDataset

DATASETS = ("voc", "synthetic")


def build_dataset(cfg: DataConfig, split: str, train: bool) -> Dataset:
    """The dataset ``cfg.name`` for ``split``; training sets get the random flips.

    ``synthetic`` reads the VOC layout like ``voc`` and, when ``cfg.root`` does not exist yet,
    first writes the default synthetic set there.
    """
    if cfg.name not in DATASETS:
        raise ValueError(f"data.name={cfg.name!r} is not a known dataset; expected one of {DATASETS}")
    if cfg.root is None:
        raise ValueError(f"data.root is not set; give the directory of the {cfg.name} dataset")
    root = Path(cfg.root)
    if cfg.name == "synthetic" and not root.exists():
        write_synthetic_voc(root)
    size = tuple(cfg.image_size) if cfg.image_size is not None else None
    return VOCDataset(root, split, image_size=size, mean=tuple(cfg.mean), std=tuple(cfg.std),
                      hflip=train and cfg.hflip)
