"""Project-wide conventions, one definition each: the ignore label and map normalization.

Label masks: with a background class, model class ``c`` is label ``c + 1`` and background is 0;
without one, class ``c`` is label ``c``. :data:`IGNORE_INDEX` marks pixels that no metric or loss
counts (void borders, unlabelled or padded pixels).

>>> min_max_normalize(torch.tensor([[[1.0, 3.0]], [[2.0, 2.0]]])).tolist()
[[[0.0, 1.0]], [[0.0, 0.0]]]
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = 255
SPATIAL = (-2, -1)


def min_max_normalize(maps: Tensor) -> Tensor:
    """Scale each map (the last two dimensions of ``maps`` [..., h, w]) to [0, 1] by its own
    minimum and maximum; a constant map becomes zeros. Differentiable (no NaN gradient on
    constant maps)."""
    if maps.dim() < 2:
        raise ValueError(f"maps must have at least two (spatial) dimensions, got shape "
                         f"{tuple(maps.shape)}")
    low = maps.amin(dim=SPATIAL, keepdim=True)
    span = maps.amax(dim=SPATIAL, keepdim=True) - low
    varies = span > 0
    return torch.where(varies, (maps - low) / torch.where(varies, span, torch.ones_like(span)),
                       torch.zeros_like(maps))
