"""The second stage's loss: pixel cross-entropy that leaves out ignore (255) pixels.

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


def cross_entropy_ignore(logits: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy of ``logits`` [B,L,H,W] over the pixels of ``target`` [B,H,W] that are
    not :data:`~attnmaps.conventions.IGNORE_INDEX`; 0 (with a gradient of zeros) when every
    pixel is ignored."""
    target = target.long()
    total = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (target != IGNORE_INDEX).sum().clamp_min(1)


class SegmentationObjective:
    """``{"loss": cross-entropy}`` of a batch's images [B,C,H,W] against its masks [B,H,W]
    (255 = ignore): the objective :class:`~attnmaps.engine.train.TrainStep` runs."""

    def __call__(self, model: nn.Module, batch: dict, device: torch.device) -> dict[str, Tensor]:
        logits = model(batch["image"].to(device))
        return {"loss": cross_entropy_ignore(logits, batch["mask"].to(device))}
