"""The second stage's loss: pixel cross-entropy that leaves out ignore (255) pixels, optionally
class-balanced.

Example:
    >>> logits = torch.zeros(1, 2, 1, 2)
    >>> round(cross_entropy_ignore(logits, torch.tensor([[[0, 255]]])).item(), 4)  # log 2
    0.6931
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..conventions import IGNORE_INDEX


def cross_entropy_ignore(logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Mean cross-entropy of ``logits`` [B,L,H,W] over the pixels of ``target`` [B,H,W] that are
    not :data:`~attnmaps.conventions.IGNORE_INDEX`; 0 (with a gradient of zeros) when every
    pixel is ignored. With per-label ``weight`` [L], the weighted mean (each pixel's term
    times its label's weight, divided by the sum of those weights), as ``F.cross_entropy``'s."""
    target = target.long()
    total = F.cross_entropy(logits.float(), target, weight=weight, ignore_index=IGNORE_INDEX,
                            reduction="sum")
    valid = target != IGNORE_INDEX
    if weight is None:
        return total / valid.sum().clamp_min(1)
    return total / weight[target[valid]].sum().clamp_min(1e-12)


def balanced_class_weights(counts: Tensor, power: float) -> Tensor:
    """Per-label weights ``(median / frequency) ** power`` from pixel ``counts`` [L]: 1 for
    every label at ``power`` 0, median-frequency balancing (Eigen & Fergus, 2015) at 1, its
    square root at 0.5. The median is over the labels that occur (the mean of the two middle
    counts when their number is even); a label that never occurs (never a target) gets 0.

    Example:
        >>> balanced_class_weights(torch.tensor([80.0, 10.0, 10.0, 0.0]), power=1.0).tolist()
        [0.125, 1.0, 1.0, 0.0]
    """
    counts = counts.double()
    present = counts > 0
    if not present.any():
        raise ValueError("balanced_class_weights: no label occurs in the seeds (all counts 0)")
    median = counts[present].quantile(0.5)
    weights = torch.zeros_like(counts)
    weights[present] = (median / counts[present]) ** power
    return weights.float()


class SegmentationObjective:
    """``{"loss": cross-entropy}`` of a batch's images [B,C,H,W] against its masks [B,H,W]
    (255 = ignore), with optional per-label ``weight`` [L]: the objective
    :class:`~attnmaps.engine.train.TrainStep` runs."""

    def __init__(self, weight: Tensor | None = None):
        self.weight = weight

    def __call__(self, model: nn.Module, batch: dict, device: torch.device) -> dict[str, Tensor]:
        logits = model(batch["image"].to(device))
        weight = None if self.weight is None else self.weight.to(device)
        return {"loss": cross_entropy_ignore(logits, batch["mask"].to(device), weight)}
