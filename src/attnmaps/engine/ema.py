"""Exponential moving average of a model's weights (Polyak averaging, as in DeiT / timm).

After every optimiser step ``ema = d * ema + (1 - d) * weights`` for each floating-point parameter
and buffer (integer buffers such as BatchNorm's step count are copied), with the decay warmed up
as ``d_t = min(decay, (1 + t) / (10 + t))`` over the ``t`` updates so far, so that the average
does not remember the random initialisation for the first thousands of steps of a short run.

Example:
    >>> ema = ModelEMA(model, decay=0.998)  # doctest: +SKIP
    >>> optimizer.step(); ema.update(model)  # doctest: +SKIP
    >>> evaluate(ema.module, ...)  # doctest: +SKIP
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_decay(decay: float, updates: int) -> float:
    """The decay of update number ``updates`` (0-based): ``min(decay, (1 + t) / (10 + t))``."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


class ModelEMA:
    """A frozen copy of ``model`` whose weights follow the model's by an exponential average.

    Args:
        model: the trained model (its current weights start the average).
        decay: the long-run decay in [0, 1).
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"train.ema_decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for param in self.module.parameters():
            param.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the current weights of ``model`` (same architecture) into the average."""
        d = ema_decay(self.decay, self.updates)
        source = model.state_dict()
        for name, value in self.module.state_dict().items():
            if value.is_floating_point():
                value.lerp_(source[name].detach(), 1.0 - d)
            else:
                value.copy_(source[name])
        self.updates += 1


def build_ema(model: nn.Module, decay: float, state: dict | None = None) -> ModelEMA | None:
    """The average of ``model`` for ``train.ema_decay`` (None when it is 0).

    Checkpoints of an averaged run hold the *averaged* weights in ``last.safetensors`` (what
    evaluation and pseudo masks read) and the raw weights in the state file (see
    :func:`ema_state`). When resuming, pass that ``state``: ``model`` then holds the averaged
    weights just loaded, which start the average, and gets its raw weights back.
    """
    if not decay:
        return None
    ema = ModelEMA(model, decay)
    if state is not None:
        if "raw_weights" not in state:
            raise ValueError("train.ema_decay is set but the checkpoint has no raw weights (it was "
                             "written without weight averaging); resume with train.ema_decay=0")
        model.load_state_dict(state["raw_weights"])
        ema.updates = int(state["ema_updates"])
    return ema


def ema_state(ema: ModelEMA | None, model: nn.Module) -> dict:
    """Entries for the checkpoint's state file: the raw weights and the update count."""
    if ema is None:
        return {}
    return {"raw_weights": model.state_dict(), "ema_updates": ema.updates}
