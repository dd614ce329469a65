"""Multi-label image classification metrics and head-gate sparsity."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .sync import all_gather_cat


def average_precision(scores: Tensor, positives: Tensor) -> float:
    """Non-interpolated AP of one class: sum over distinct score thresholds of
    (R_n - R_{n-1}) * P_n, as sklearn's average_precision_score. NaN without positives."""
    num_pos = positives.sum().item()
    if num_pos == 0:
        return math.nan
    order = torch.argsort(scores, descending=True, stable=True)
    scores, hits = scores[order], positives[order].double()
    tp = hits.cumsum(0)
    fp = (1 - hits).cumsum(0)
    last_of_tie = torch.ones_like(scores, dtype=torch.bool)
    last_of_tie[:-1] = scores[1:] != scores[:-1]
    tp, fp = tp[last_of_tie], fp[last_of_tie]
    precision = tp / (tp + fp)
    recall_step = torch.diff(tp, prepend=tp.new_zeros(1)) / num_pos
    return (recall_step * precision).sum().item()


class MultiLabelMetric:
    """Accumulates per-image class probabilities and multi-hot labels.

    `compute` returns:

    - `map`: mean over classes with at least one positive image of the non-interpolated average
      precision (sklearn's average_precision_score, torchmetrics MultilabelAveragePrecision;
      their macro average instead counts a class without positives as AP 0). `per_class_ap`
      lists it per class (NaN without positives).
    - `exact_match`: fraction of images whose thresholded predictions (probs >= threshold) equal
      the label set exactly.
    - `label_accuracy`: fraction of correct (image, class) decisions.
    - `f1`: micro F1 = 2 TP / (2 TP + FP + FN) over all (image, class) decisions; 0 when there
      are neither positives nor predicted positives.

    >>> metric = MultiLabelMetric(num_classes=2)
    >>> metric.update(torch.tensor([[0.9, 0.2], [0.6, 0.7]]), torch.tensor([[1, 0], [0, 1]]))
    >>> metric.compute()["exact_match"]
    0.5
    """

    def __init__(self, num_classes: int, threshold: float = 0.5) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.threshold = threshold
        self.probs: list[Tensor] = []
        self.labels: list[Tensor] = []

    def update(self, probs: Tensor, labels: Tensor) -> None:
        """Add a batch of probabilities [B,K] and multi-hot labels [B,K] (nonzero = positive)."""
        expected = (probs.shape[0] if probs.dim() == 2 else -1, self.num_classes)
        for name, values in (("probs", probs), ("labels", labels)):
            if tuple(values.shape) != expected:
                raise ValueError(
                    f"{name} must have shape [B, {self.num_classes}] matching probs, "
                    f"got {tuple(values.shape)}"
                )
        self.probs.append(probs.detach().float().cpu())
        self.labels.append(labels.detach().cpu() != 0)

    def _cat(self, parts: list[Tensor], dtype: torch.dtype) -> Tensor:
        if not parts:
            return torch.zeros(0, self.num_classes, dtype=dtype)
        return torch.cat(parts)

    def compute(self) -> dict:
        """map, per_class_ap, exact_match, label_accuracy and f1 of all samples so far, those of
        every process together inside a process group (every process must call it; safe to call
        again)."""
        probs = all_gather_cat(self._cat(self.probs, torch.float32))
        labels = all_gather_cat(self._cat(self.labels, torch.bool))
        if probs.shape[0] == 0:
            raise ValueError("MultiLabelMetric.compute called before any update")
        per_class_ap = [average_precision(probs[:, k], labels[:, k]) for k in range(probs.shape[1])]
        valid = [ap for ap in per_class_ap if not math.isnan(ap)]
        decided = probs >= self.threshold
        correct = decided == labels
        tp = (decided & labels).sum().item()
        wrong = (~correct).sum().item()
        return {
            "map": sum(valid) / len(valid) if valid else math.nan,
            "per_class_ap": per_class_ap,
            "exact_match": correct.all(dim=1).double().mean().item(),
            "label_accuracy": correct.double().mean().item(),
            "f1": 2 * tp / (2 * tp + wrong) if tp + wrong > 0 else 0.0,
        }

    def reset(self) -> None:
        """Drop all accumulated samples."""
        self.probs.clear()
        self.labels.clear()


def head_sparsity(gate_values: Tensor) -> float:
    """Percentage (0-100) of heads whose deterministic evaluation gate value is exactly 0.

    >>> head_sparsity(torch.tensor([[0.0, 1.0], [0.0, 0.3]]))
    50.0
    """
    if gate_values.numel() == 0:
        raise ValueError("head_sparsity needs at least one gate value, got an empty tensor")
    return 100.0 * (gate_values == 0).sum().item() / gate_values.numel()
