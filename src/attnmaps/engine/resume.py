"""What makes ``--resume`` safe: the stored config is compared with the new one, the log is cut
back to the checkpoint's step, a mid-epoch resume skips the batches already done, and the
evaluation split's masks are checked before any training time is spent."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from torch.utils.data import Dataset, Sampler

from ..atomic import atomic_write
from ..config import Config, config_to_dict
from ..conventions import IGNORE_INDEX
from ..errors import ConfigError, DataError

# Keys that may change on resume without changing what the run computes (or that only extend
# it: train.epochs may grow).
RESUMABLE_KEYS = {"out_dir", "train.epochs", "train.device", "train.log_every",
                  "train.checkpoint_every", "train.eval_every", "data.num_workers",
                  "train.compile"}


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(stored: Mapping[str, Any], cfg: Config) -> dict[str, tuple[Any, Any]]:
    """``{key: (stored, new)}`` for every key outside :data:`RESUMABLE_KEYS` whose value differs
    between a run's stored config (as read from its ``config.yaml``) and ``cfg``; a key the
    stored config lacks (written by an older version) counts at its default."""
    old = {**_flatten(config_to_dict(Config())), **_flatten(stored)}
    new = _flatten(config_to_dict(cfg))
    return {key: (old.get(key), new.get(key)) for key in sorted(set(old) | set(new))
            if key not in RESUMABLE_KEYS and old.get(key) != new.get(key)}


def describe_differences(changed: Mapping[str, tuple[Any, Any]]) -> str:
    """``key: old -> new; ...`` for the differences :func:`config_differences` returns."""
    return "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changed.items())


def check_resume_config(run_dir: Path, cfg: Config, allow_changes: bool) -> None:
    """Refuse to resume ``run_dir`` with settings that differ from its ``config.yaml`` (listed
    in the error) unless ``allow_changes``; ``train.epochs`` may grow but not shrink."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return
    stored = yaml.safe_load(path.read_text()) or {}
    saved_epochs = stored.get("train", {}).get("epochs", cfg.train.epochs)
    if cfg.train.epochs < saved_epochs and not allow_changes:
        raise ConfigError(f"--resume with train.epochs={cfg.train.epochs} but {path} ran with "
                          f"{saved_epochs}; epochs may grow, not shrink")
    changed = config_differences(stored, cfg)
    if changed and not allow_changes:
        raise ConfigError(f"--resume with settings that differ from {path}: "
                          f"{describe_differences(changed)}. Resume "
                          "with the run's settings, or pass --allow-changes to continue with "
                          "the new ones (the old config is kept beside it)")


def keep_previous_config(run_dir: Path) -> None:
    """Copy the run's ``config.yaml`` to ``config.<time>.yaml`` before it is overwritten."""
    path = run_dir / "config.yaml"
    if path.is_file():
        text = path.read_text()
        kept = run_dir / f"config.{time.strftime('%Y%m%d-%H%M%S')}.yaml"
        atomic_write({kept: lambda tmp: tmp.write_text(text)})


def truncate_log(path: Path, step: int) -> None:
    """Drop the records of ``log.jsonl`` written after ``step`` (the checkpoint's), so a resumed
    run does not repeat them."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        text = "".join(line + "\n" for line in kept)
        atomic_write({path: lambda tmp: tmp.write_text(text)})


class SkipSampler(Sampler[int]):
    """The indices of ``sampler`` after its first ``skip`` (a mid-epoch resume: with batches of
    ``b``, skipping ``k * b`` indices skips exactly the first ``k`` batches)."""

    def __init__(self, sampler: Sampler[int], skip: int):
        self.sampler, self.skip = sampler, skip

    def __len__(self) -> int:
        return max(len(self.sampler) - self.skip, 0)

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.sampler), self.skip, None)


def check_masks(dataset: Dataset, split: str) -> None:
    """Raise naming the image when a mask of ``dataset`` holds a label it cannot have (found
    now, not after an epoch of training). Reads every mask once; needs ``num_classes``."""
    num_labels = dataset.num_classes + int(getattr(dataset, "has_background", True))
    for index in range(len(dataset)):
        sample = dataset[index]
        if not sample.get("has_mask", True):
            continue
        values = np.unique(sample["mask"].numpy())
        bad = values[(values >= num_labels) & (values != IGNORE_INDEX)]
        if bad.size:
            raise DataError(f"split {split!r}, image {sample['id']!r}: mask values "
                            f"{bad.tolist()} outside 0..{num_labels - 1} ({IGNORE_INDEX} = ignore)")
