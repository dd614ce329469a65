"""Alignment of relevance maps with object masks: per-image scores and a batch accumulator.

Every function takes non-negative relevance maps (float [B,H,W], any scale) and object masks
(bool [B,H,W]) and returns a float64 tensor [B] on the maps' device, NaN where the score is
undefined: always for an empty mask, and for a map holding NaN or inf. Ties in relevance are resolved in expectation (as by a
uniformly random tie-break), so results do not depend on pixel order.

>>> maps = torch.tensor([[[0.0, 1.0], [3.0, 0.0]]])
>>> masks = torch.tensor([[[False, False], [True, False]]])
>>> energy_pointing_game(maps, masks)
tensor([0.7500], dtype=torch.float64)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..conventions import min_max_normalize
from .sync import all_reduce_sum


def _check(maps: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    if maps.dim() != 3 or not maps.dtype.is_floating_point:
        raise ValueError(
            f"maps must be a float tensor [B,H,W], got {maps.dtype} {tuple(maps.shape)}"
        )
    if masks.shape != maps.shape or masks.dtype != torch.bool:
        raise ValueError(
            f"masks must be a bool tensor of the maps' shape {tuple(maps.shape)}, "
            f"got {masks.dtype} {tuple(masks.shape)}"
        )
    return maps.double(), masks.to(maps.device)


def _nan_where_undefined(scores: Tensor, maps: Tensor, masks: Tensor) -> Tensor:
    """``scores`` with NaN for images whose mask is empty or whose map holds NaN / inf (a
    relevance order that cannot be trusted)."""
    undefined = ~masks.flatten(1).any(dim=1) | ~maps.flatten(1).isfinite().all(dim=1)
    return scores.masked_fill(undefined, math.nan)


def energy_pointing_game(maps: Tensor, masks: Tensor) -> Tensor:
    """Positive relevance inside the mask over all positive relevance (Score-CAM's energy-based
    pointing game). NaN when the mask is empty or the map has no positive relevance."""
    maps, masks = _check(maps, masks)
    positive = maps.clamp(min=0)
    total = positive.sum(dim=(1, 2))
    inside = (positive * masks).sum(dim=(1, 2))
    scores = torch.where(
        total > 0, inside / total.clamp(min=torch.finfo(total.dtype).tiny), math.nan
    )
    return _nan_where_undefined(scores, maps, masks)


def dilate(masks: Tensor, radius: int) -> Tensor:
    """Grow bool masks [B,H,W] by a Euclidean disc: a pixel is set when some mask pixel lies
    within `radius` pixels of it."""
    if radius < 0:
        raise ValueError(f"dilation radius must be >= 0, got {radius}")
    height, width = masks.shape[-2:]
    ry, rx = min(radius, height - 1), min(radius, width - 1)
    dy = torch.arange(-ry, ry + 1, device=masks.device)[:, None]
    dx = torch.arange(-rx, rx + 1, device=masks.device)[None, :]
    disc = (dy * dy + dx * dx <= radius * radius).float()
    counts = F.conv2d(masks[:, None].float(), disc[None, None], padding=(ry, rx))
    return counts[:, 0] > 0.5


def pointing_game(maps: Tensor, masks: Tensor, tolerance: int = 15) -> Tensor:
    """1 when the maximum of the map lies within `tolerance` pixels (Euclidean) of the mask, else
    0 (Zhang et al. 2016). With several maximal pixels the score is the fraction of them that
    hit. NaN when the mask is empty."""
    maps, masks = _check(maps, masks)
    hit_zone = dilate(masks, tolerance).flatten(1)
    flat = maps.flatten(1)
    is_max = flat == flat.max(dim=1, keepdim=True).values
    scores = (is_max & hit_zone).sum(dim=1).double() / is_max.sum(dim=1).clamp(min=1)
    return _nan_where_undefined(scores, maps, masks)


def thresholded_iou(maps: Tensor, masks: Tensor, threshold: float = 0.5) -> Tensor:
    """IoU of (`min_max_normalize(map)` >= threshold) with the mask. NaN when the mask is empty."""
    maps, masks = _check(maps, masks)
    predicted = min_max_normalize(maps) >= threshold
    intersection = (predicted & masks).sum(dim=(1, 2)).double()
    union = (predicted | masks).sum(dim=(1, 2)).double()
    return _nan_where_undefined(intersection / union.clamp(min=1), maps, masks)


def roc_auc(maps: Tensor, masks: Tensor) -> Tensor:
    """ROC-AUC of map values scoring mask pixels against the others: the Mann-Whitney U
    statistic with average ranks for ties (a constant map gives 0.5). NaN when the mask is empty
    or covers the whole image."""
    maps, masks = _check(maps, masks)
    flat, positive = maps.flatten(1), masks.flatten(1)
    ordered = flat.sort(dim=1).values
    below = torch.searchsorted(ordered, flat, right=False)
    up_to = torch.searchsorted(ordered, flat, right=True)
    ranks = (below + up_to + 1).double() / 2
    num_pos = positive.sum(dim=1).double()
    num_neg = positive.shape[1] - num_pos
    u_stat = (ranks * positive).sum(dim=1) - num_pos * (num_pos + 1) / 2
    pairs = num_pos * num_neg
    return _nan_where_undefined(torch.where(pairs > 0, u_stat / pairs.clamp(min=1), math.nan),
                                maps, masks)


def relevance_rank_accuracy(maps: Tensor, masks: Tensor) -> Tensor:
    """Fraction of the |mask| most relevant pixels that lie in the mask (Arras et al. 2022).

    Pixels tied with the |mask|-th largest value count in proportion to how many of the top
    places they share. NaN when the mask is empty.

    >>> maps = torch.tensor([[[4.0, 3.0, 2.0, 1.0]]])
    >>> relevance_rank_accuracy(maps, torch.tensor([[[True, False, True, False]]]))
    tensor([0.5000], dtype=torch.float64)
    """
    maps, masks = _check(maps, masks)
    flat, positive = maps.flatten(1), masks.flatten(1)
    size = positive.sum(dim=1, keepdim=True)
    ordered = flat.sort(dim=1, descending=True).values
    cutoff = ordered.gather(1, (size - 1).clamp(min=0))
    above, tied = flat > cutoff, flat == cutoff
    num_above = above.sum(dim=1, keepdim=True)
    tied_share = (size - num_above).double() / tied.sum(dim=1, keepdim=True)
    hits = (above & positive).sum(dim=1, keepdim=True) + tied_share * (tied & positive).sum(
        dim=1, keepdim=True
    )
    return _nan_where_undefined((hits / size.clamp(min=1))[:, 0], maps, masks)


class AlignmentMetric:
    """Means over images of the five alignment scores, skipping images where a score is NaN.

    >>> metric = AlignmentMetric(tolerance=0)
    >>> metric.update(torch.tensor([[[0.0, 1.0]]]), torch.tensor([[[False, True]]]))
    >>> metric.compute()["pointing_game"]
    1.0
    """

    names = (
        "energy_pointing_game",
        "pointing_game",
        "thresholded_iou",
        "roc_auc",
        "relevance_rank_accuracy",
    )

    def __init__(
        self,
        tolerance: int = 15,
        threshold: float = 0.5,
        device: torch.device | str | None = None,
    ) -> None:
        if tolerance < 0:
            raise ValueError(f"tolerance must be >= 0, got {tolerance}")
        self.tolerance = tolerance
        self.threshold = threshold
        self.sums = torch.zeros(len(self.names), dtype=torch.float64, device=device)
        self.counts = torch.zeros(len(self.names), dtype=torch.float64, device=device)

    def scores(self, maps: Tensor, masks: Tensor) -> Tensor:
        """Per-image scores [len(names), B] of one batch, in the order of `names`."""
        return torch.stack(
            [
                energy_pointing_game(maps, masks),
                pointing_game(maps, masks, self.tolerance),
                thresholded_iou(maps, masks, self.threshold),
                roc_auc(maps, masks),
                relevance_rank_accuracy(maps, masks),
            ]
        )

    def update(self, maps: Tensor, masks: Tensor) -> None:
        """Add a batch of maps [B,H,W] and bool masks [B,H,W]."""
        scores = self.scores(maps, masks).to(self.sums.device)
        defined = ~scores.isnan()
        self.sums += torch.where(defined, scores, 0.0).sum(dim=1)
        self.counts += defined.sum(dim=1)

    def compute(self) -> dict[str, float]:
        """Mean of each score over the images where it is defined (NaN when there are none), over
        every process inside a process group (every process must call it; safe to call again)."""
        sums, counts = all_reduce_sum(self.sums), all_reduce_sum(self.counts)
        means = sums / counts.clamp(min=1)
        return {
            name: mean.item() if count > 0 else math.nan
            for name, mean, count in zip(self.names, means, counts.tolist())
        }

    def reset(self) -> None:
        """Zero the sums and counts."""
        self.sums.zero_()
        self.counts.zero_()
