"""Semantic segmentation metrics from a confusion matrix (rows = ground truth, cols = prediction).

>>> metric = SegmentationMetric(num_labels=2)
>>> metric.update(torch.tensor([[0, 1], [1, 1]]), torch.tensor([[0, 1], [0, 255]]))
>>> round(metric.compute()["miou"], 3)  # IoU(0) = 1/2, IoU(1) = 1/2
0.5
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..conventions import IGNORE_INDEX
from .sync import all_reduce_sum


def confusion_matrix(
    pred: Tensor, target: Tensor, num_labels: int, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """Count (target, pred) label pairs into an int64 [L,L] matrix, skipping ignored targets.

    `pred` and `target` are integer tensors of the same shape. Raises ValueError when a
    non-ignored pixel has a prediction or target outside 0..num_labels-1.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    for name, values in (("pred", pred), ("target", target)):
        if values.dtype.is_floating_point or values.dtype.is_complex:
            raise ValueError(f"{name} must be an integer tensor, got {values.dtype}")
    target = target.reshape(-1).long()
    keep = target != ignore_index
    target = target[keep]
    pred = pred.reshape(-1).long()[keep]
    for name, values in (("prediction", pred), ("target", target)):
        bad = (values < 0) | (values >= num_labels)
        if bad.any():
            shown = values[bad].unique()[:10].tolist()
            raise ValueError(
                f"{name} values {shown} are outside the label range 0..{num_labels - 1} "
                f"(ignore_index {ignore_index} is only allowed in the target)"
            )
    counts = torch.bincount(target * num_labels + pred, minlength=num_labels * num_labels)
    return counts.reshape(num_labels, num_labels)


def metrics_from_confusion(confusion: Tensor) -> dict:
    """mIoU, per-class IoU, pixel accuracy and mean class accuracy of a confusion matrix.

    A label's IoU is NaN when its union (gt or pred pixels) is empty; `miou` averages the others.
    `mean_acc` averages per-class recall over labels present in the ground truth. Quantities with
    no pixels to average over are NaN.
    """
    cm = confusion.double()
    tp = cm.diag()
    gt = cm.sum(dim=1)
    union = gt + cm.sum(dim=0) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))
    present = union > 0
    in_gt = gt > 0
    total = cm.sum()
    return {
        "miou": iou[present].mean().item() if present.any() else math.nan,
        "per_class_iou": iou.tolist(),
        "pixel_acc": (tp.sum() / total).item() if total > 0 else math.nan,
        "mean_acc": (tp[in_gt] / gt[in_gt]).mean().item() if in_gt.any() else math.nan,
        "confusion": confusion.clone(),
    }


class SegmentationMetric:
    """Accumulates a confusion matrix over batches of label maps.

    `update` takes integer predictions and targets of shape [B,H,W] or [H,W]; target pixels equal
    to `ignore_index` are skipped. See `metrics_from_confusion` for the keys `compute` returns.
    """

    def __init__(
        self, num_labels: int, ignore_index: int = IGNORE_INDEX, device: torch.device | str | None = None
    ) -> None:
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        self.num_labels = num_labels
        self.ignore_index = ignore_index
        self.confusion = torch.zeros(num_labels, num_labels, dtype=torch.int64, device=device)

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add one batch ([B,H,W]) or one image ([H,W]) of predictions and targets."""
        if pred.dim() not in (2, 3):
            raise ValueError(f"pred must be [B,H,W] or [H,W], got shape {tuple(pred.shape)}")
        device = self.confusion.device
        self.confusion += confusion_matrix(
            pred.to(device), target.to(device), self.num_labels, self.ignore_index
        )

    def compute(self) -> dict:
        """Metrics of everything accumulated so far, on every process together inside a process
        group (every process must call it; safe to call again): miou, per_class_iou, pixel_acc,
        mean_acc, confusion."""
        return metrics_from_confusion(all_reduce_sum(self.confusion))

    def reset(self) -> None:
        """Zero the confusion matrix."""
        self.confusion.zero_()
