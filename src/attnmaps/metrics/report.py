"""Segmentation evaluation of mask directories, text tables and JSON metric files."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from attnmaps.atomic import atomic_write
from attnmaps.conventions import IGNORE_INDEX
from attnmaps.data.image_io import read_mask
from attnmaps.metrics.segmentation import SegmentationMetric, metrics_from_confusion


def to_jsonable(value: object) -> object:
    """Recursively convert tensors, arrays and numpy scalars to Python values, NaN/inf to None."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(item) for item in value]
    return value


def _percent(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def format_iou_table(metrics: Mapping, class_names: Sequence[str] | None = None) -> str:
    """Aligned text table of per-class IoU in %, then mIoU, pixel accuracy (and mean accuracy).

    `metrics` needs `per_class_iou`, `miou` and `pixel_acc` (as from `SegmentationMetric.compute`
    or `evaluate_directories`); NaN/None IoUs print as "-". `class_names` defaults to
    `metrics["class_names"]`, else "class_<i>".
    """
    per_class = list(metrics["per_class_iou"])
    names = class_names if class_names is not None else metrics.get("class_names")
    names = list(names) if names is not None else [f"class_{i}" for i in range(len(per_class))]
    if len(names) != len(per_class):
        raise ValueError(f"got {len(names)} class names for {len(per_class)} per-class IoUs")
    summary = [("mIoU", metrics["miou"]), ("pixel acc", metrics["pixel_acc"])]
    if "mean_acc" in metrics:
        summary.append(("mean acc", metrics["mean_acc"]))
    width = max(len(name) for name in [*names, *(label for label, _ in summary), "class"])
    rows = [f"{'class':<{width}}  {'IoU (%)':>8}"]
    rows += [f"{name:<{width}}  {_percent(iou):>8}" for name, iou in zip(names, per_class)]
    rows.append("-" * (width + 10))
    rows += [f"{label:<{width}}  {_percent(value):>8}" for label, value in summary]
    return "\n".join(rows)


def _mask_tensor(path: Path) -> torch.Tensor:
    return torch.from_numpy(read_mask(path).astype(np.int64))


def _name_some(items: Sequence[str]) -> str:
    shown = ", ".join(items[:5])
    return f"{shown} (and {len(items) - 5} more)" if len(items) > 5 else shown


def evaluate_directories(
    pred_dir: str | Path, gt_dir: str | Path, class_names: list[str] | None = None,
    ids: list[str] | None = None,
) -> dict:
    """Compare every `<id>.png` mask in `gt_dir` (or those of `ids` only) with `<id>.png` in
    `pred_dir`.

    The number of labels is `len(class_names)`, else the largest label seen in the ground truth or
    (non-ignored) predictions, plus one; 255 is ignore. Returns a JSON-serialisable dict: miou,
    pixel_acc, mean_acc, per_class_iou (None for labels absent from gt and pred), class_names
    (default "class_<i>"), num_images and confusion (nested lists, rows = ground truth).
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    for directory in (pred_dir, gt_dir):
        if not directory.is_dir():
            raise FileNotFoundError(f"mask directory not found: {directory}")
    if class_names is not None and len(set(class_names)) != len(class_names):
        raise ValueError(f"class names must be distinct, got {class_names}")
    if ids is None:
        gt_paths = sorted(gt_dir.glob("*.png"))
    else:
        gt_paths = [gt_dir / f"{image_id}.png" for image_id in ids]
        absent = [path.stem for path in gt_paths if not path.is_file()]
        if absent:
            raise FileNotFoundError(f"{len(absent)} listed ids have no ground-truth mask in "
                                    f"{gt_dir}: {_name_some(absent)}")
    if not gt_paths:
        raise FileNotFoundError(f"no *.png ground-truth masks in {gt_dir}")
    missing = [path.stem for path in gt_paths if not (pred_dir / path.name).is_file()]
    if missing:
        raise ValueError(
            f"{len(missing)} ground-truth masks in {gt_dir} have no prediction <id>.png in "
            f"{pred_dir}: {_name_some(missing)}"
        )

    metric = SegmentationMetric(256)
    max_label: dict[str, int] = {}
    for gt_path in gt_paths:
        pred_path = pred_dir / gt_path.name
        gt, pred = _mask_tensor(gt_path), _mask_tensor(pred_path)
        if gt.shape != pred.shape:
            raise ValueError(
                f"prediction {pred_path} has size {tuple(pred.shape)} but ground truth "
                f"{gt_path} has size {tuple(gt.shape)}"
            )
        scored = gt != IGNORE_INDEX
        used = torch.cat([gt[scored], pred[scored]])
        max_label[gt_path.stem] = int(used.max()) if used.numel() else -1
        metric.update(pred, gt)
    confusion = metric.compute()["confusion"]

    if class_names is None:
        counts = confusion.sum(dim=1) + confusion.sum(dim=0)
        counts[IGNORE_INDEX] = 0  # predicted 255 is invalid, not a label (gt 255 is never counted)
        seen = counts.nonzero()
        if seen.numel() == 0:
            raise ValueError(f"all ground-truth pixels in {gt_dir} are ignore ({IGNORE_INDEX})")
        num_labels = int(seen.max()) + 1
        class_names = [f"class_{i}" for i in range(num_labels)]
    num_labels = len(class_names)
    if not 0 < num_labels <= IGNORE_INDEX:
        raise ValueError(f"class_names must have 1..{IGNORE_INDEX} entries, got {num_labels}")
    bad = [stem for stem, label in max_label.items() if label >= num_labels]
    if bad:
        raise ValueError(
            f"{len(bad)} images have ground-truth or predicted labels outside 0..{num_labels - 1} "
            f"(non-ignored pixels): {_name_some(bad)}"
        )

    metrics = metrics_from_confusion(confusion[:num_labels, :num_labels])
    metrics.update(class_names=list(class_names), num_images=len(gt_paths))
    return to_jsonable(metrics)


def save_metrics(path: str | Path, metrics: Mapping) -> None:
    """Write `metrics` as indented JSON via a temporary file and os.replace; NaN becomes null."""
    text = json.dumps(to_jsonable(metrics), indent=2, allow_nan=False) + "\n"
    atomic_write({Path(path): lambda tmp: tmp.write_text(text, encoding="utf-8")})
