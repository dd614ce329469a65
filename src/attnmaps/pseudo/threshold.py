"""A background threshold chosen without pixel labels: Otsu's split of the class maps' values.

The maps of the classes an image is predicted to contain (after PAMR, min-max normalized at
image size, exactly what the pseudo masks binarise) are pooled over the whole split into a
histogram of :data:`BINS` bins on [0, 1]. Otsu's method (1979) picks the split that maximises
the between-class variance ``w0 * w1 * (mu0 - mu1)^2`` of the two groups of values (object and
background): no pixel label and no mIoU is looked at, only the maps' own statistics. The
threshold is the upper edge of the last bin of the low group, so values at or above it (the
masks' rule) are the high group.

Example:
    >>> histogram = MapHistogram()
    >>> maps = torch.tensor([[[[0.0, 0.2], [0.7, 0.8], [0.9, 1.0]]]])  # low pair, high four
    >>> histogram.update(maps, torch.tensor([[True]]))
    >>> histogram.threshold()  # the first split after the low pair's bins (0.0, 0.2)
    0.21
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..conventions import min_max_normalize
from ..metrics.sync import all_reduce_sum

BINS = 100
METHOD = ("Otsu split of the predicted classes' min-max normalized maps, pooled over the split "
          "(no pixel labels)")


def otsu_threshold(counts: Tensor) -> float:
    """Otsu threshold of a histogram ``counts`` [n] of values on n equal bins of [0, 1].

    Bin k holds values in ``[k/n, (k+1)/n)`` and stands for its centre. Returns ``(k+1)/n`` for
    the split after bin k with the largest between-class variance (the first on ties), 0.5 for
    an empty histogram or one with all values in one bin.
    """
    counts = counts.double()
    n = len(counts)
    centres = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    w0 = counts.cumsum(0)[:-1]
    total = counts.sum()
    w1 = total - w0
    m0 = (counts * centres).cumsum(0)[:-1]
    m1 = (counts * centres).sum() - m0
    valid = (w0 > 0) & (w1 > 0)
    if not valid.any():
        return 0.5
    between = torch.where(valid, w0 * w1 * (m0 / w0.clamp_min(1e-12)
                                             - m1 / w1.clamp_min(1e-12)) ** 2, -1.0)
    return (int(between.argmax()) + 1) / n


class MapHistogram:
    """Histogram of the selected classes' min-max normalized maps; ``threshold()`` is its Otsu
    threshold, summed over processes inside a process group."""

    def __init__(self, bins: int = BINS, device: torch.device | str | None = None):
        self.counts = torch.zeros(bins, dtype=torch.float64, device=device)

    def update(self, maps: Tensor, selected: Tensor) -> None:
        """Add the maps [B,K,H,W] of the ``selected`` [B,K] classes (normalized here)."""
        values = min_max_normalize(maps[selected.bool()].float())
        self.counts += torch.histc(values, bins=len(self.counts), min=0.0, max=1.0).to(
            self.counts)

    def threshold(self) -> float:
        return otsu_threshold(all_reduce_sum(self.counts).cpu())
