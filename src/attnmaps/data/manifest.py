"""Any image set described by a manifest file: image path, labels and optional mask path.

Layout under ``root``::

    <split>.csv | <split>.jsonl   the manifest of a split; paths are relative to ``root``
    classes.txt                   optional: the K class names, one per line

CSV: a header naming the columns ``image``, ``labels`` and optionally ``mask``; labels are class
names separated by ``;`` (empty: no class); an empty mask cell means no mask. JSONL: one object
per line with keys ``image``, ``labels`` (a list of names or a ``;``-separated string) and
optionally ``mask`` (null or absent: no mask).

Classes are those of ``classes.txt``, else the sorted union of the labels in every ``*.csv`` and
``*.jsonl`` manifest in ``root``, so that all splits agree on them. Masks are index PNGs in the
project convention: with background (the default) 0 = background and class c = c + 1, without
it class c = c; 255 = ignore. Image labels come from the manifest, not from the masks. Item ids
are the image paths relative to ``root`` without suffix.

Example ``train.csv``::

    image,labels,mask
    img/a.png,cat;dog,masks/a.png
    img/b.jpg,dog,
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from .base import ImageDataset, check_mask, multi_hot, read_names
from .image_io import read_mask

MANIFEST_SUFFIXES = (".csv", ".jsonl")
COLUMNS = ("image", "labels", "mask")


@dataclass
class Entry:
    """One manifest row; ``where`` is ``file:line`` for error messages."""

    image: str
    labels: list[str]
    mask: str | None
    where: str


def _split_labels(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        return [name.strip() for name in value.split(";") if name.strip()]
    if isinstance(value, list) and all(isinstance(name, str) for name in value):
        return [name.strip() for name in value if name.strip()]
    raise ValueError(f"{where}: 'labels' must be class names separated by ';' or a list of "
                     f"names, got {value!r}")


def _read_csv(path: Path) -> list[Entry]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        if not {"image", "labels"} <= set(columns):
            raise ValueError(f"{path} must have a header with columns 'image', 'labels' and "
                             f"optionally 'mask', got {columns}")
        _check_columns(columns, path)
        entries = []
        for row in reader:
            where = f"{path}:{reader.line_num}"
            mask = (row.get("mask") or "").strip() or None
            entries.append(Entry((row["image"] or "").strip(),
                                 _split_labels(row["labels"] or "", where), mask, where))
    return entries


def _read_jsonl(path: Path) -> list[Entry]:
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where} is not valid JSON: {err}") from err
        if not isinstance(row, dict) or "image" not in row or "labels" not in row:
            raise ValueError(f"{where} must be an object with keys 'image', 'labels' and "
                             f"optionally 'mask', got {line.strip()[:200]}")
        _check_columns(row, where)
        mask = row.get("mask")
        entries.append(Entry(str(row["image"]).strip(), _split_labels(row["labels"], where),
                             str(mask).strip() if mask else None, where))
    return entries


def _check_columns(columns: Any, where: object) -> None:
    unknown = [name for name in columns if name not in COLUMNS]
    if unknown:
        raise ValueError(f"{where}: unknown column(s) {unknown}; a manifest has the columns "
                         f"{list(COLUMNS)} ('mask' optional)")


def read_manifest(path: Path) -> list[Entry]:
    """The rows of a ``.csv`` or ``.jsonl`` manifest."""
    entries = _read_csv(path) if path.suffix == ".csv" else _read_jsonl(path)
    for entry in entries:
        if not entry.image:
            raise ValueError(f"{entry.where}: the 'image' path is empty")
    return entries


def _inside(root: Path, relative: str) -> bool:
    """Whether ``root / relative`` (after resolving '..' and links) lies under ``root``."""
    return (root / relative).resolve().is_relative_to(root.resolve())


class ManifestDataset(ImageDataset):
    """The images listed by ``root/<split>.csv`` or ``root/<split>.jsonl``.

    ``options`` are those of :class:`~attnmaps.data.base.ImageDataset`.
    """

    def __init__(self, root: str | Path, split: str = "train", has_background: bool = True,
                 allow_outside_root: bool = False, **options: Any) -> None:
        super().__init__(**options)
        self.root = Path(root)
        candidates = [self.root / f"{split}{suffix}" for suffix in MANIFEST_SUFFIXES]
        manifest = next((p for p in candidates if p.is_file()), None)
        if manifest is None:
            found = sorted(p.name for s in MANIFEST_SUFFIXES for p in self.root.glob(f"*{s}"))
            raise FileNotFoundError(f"manifest for split {split!r} not found: expected "
                                    f"{candidates[0]} or {candidates[1]}; manifests present: "
                                    f"{found or 'none'}")
        self.entries = read_manifest(manifest)
        if not self.entries:
            raise ValueError(f"manifest {manifest} lists no images")
        classes = self.root / "classes.txt"
        names = read_names(classes) if classes.is_file() else self._label_union()
        index = {name: c for c, name in enumerate(names)}
        source = f" (from {classes})" if classes.is_file() else ""
        for entry in self.entries:
            unknown = [name for name in entry.labels if name not in index]
            if unknown:
                raise ValueError(f"{entry.where}: unknown class {unknown[0]!r}; expected one "
                                 f"of {names}{source}")
        if not allow_outside_root:
            for entry in self.entries:
                for column, value in (("image", entry.image), ("mask", entry.mask)):
                    if value is not None and not _inside(self.root, value):
                        raise ValueError(
                            f"{entry.where}: {column} path {value!r} leaves the data root "
                            f"{self.root}; move the file under it, or set "
                            "data.allow_outside_root=true to accept it")
        self.label_indices = [[index[name] for name in e.labels] for e in self.entries]
        self.image_paths = [self.root / e.image for e in self.entries]
        self.ids = [str(PurePosixPath(e.image).with_suffix("")) for e in self.entries]
        duplicates = [i for i, n in Counter(self.ids).items() if n > 1]
        if duplicates:
            raise ValueError(f"manifest {manifest} lists id {duplicates[0]!r} more than once "
                             f"(ids are image paths without suffix)")
        self.has_background = has_background
        self.num_classes = len(names)
        self.class_names = ["background", *names] if has_background else names

    def _label_union(self) -> list[str]:
        manifests = sorted(p for s in MANIFEST_SUFFIXES for p in self.root.glob(f"*{s}"))
        names = sorted({name for path in manifests for e in read_manifest(path)
                        for name in e.labels})
        if not names:
            raise ValueError(f"the manifests in {self.root} name no class; list the classes "
                             f"in {self.root / 'classes.txt'}")
        return names

    def image_labels(self, i: int) -> torch.Tensor:
        """Item ``i``'s labels from the manifest; nothing is read."""
        return multi_hot(self.label_indices[i], self.num_classes)

    def load_target(self, i: int, image_shape: tuple[int, ...]) -> tuple[np.ndarray | None,
                                                                           torch.Tensor]:
        labels = self.image_labels(i)
        entry = self.entries[i]
        if entry.mask is None:
            return None, labels
        path = self.root / entry.mask
        mask = read_mask(path)
        check_mask(mask, path, self.image_paths[i], image_shape, self.max_label)
        return mask, labels
