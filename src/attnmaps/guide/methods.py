"""Guidance methods for a :class:`GAPConvNet`: the training loss of one batch under each method.

Every method returns ``(cross_entropy, guidance)``; the map it guides is the true class's. Names:
``none``, ``camal`` (contrast form), ``camal_energy``, ``rrr`` (input gradients), ``gain``
(Grad-CAM vs mask + attention mining), ``l1`` (GRADIA-style map-vs-mask).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cam import grad_cam
from ..losses import (
    CAMALLoss,
    GAINLoss,
    L1MapLoss,
    RRRLoss,
    attention_mining_loss,
    input_gradient,
    soft_mask,
)
from .gap_net import GAPConvNet

MethodLoss = Callable[[GAPConvNet, Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


def true_class_maps(model: GAPConvNet, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Logits [B,K] and the class activation map of each image's true class [B,h,w]."""
    logits, maps = model.forward_with_maps(images)
    return logits, maps[torch.arange(len(labels)), labels]


def _map_loss(loss: torch.nn.Module) -> MethodLoss:
    def method(model, images, labels, masks, has_mask):
        logits, maps = true_class_maps(model, images, labels)
        return F.cross_entropy(logits, labels), loss(maps, masks, has_mask)
    return method


def _none(model, images, labels, masks, has_mask):
    logits = model(images)
    return F.cross_entropy(logits, labels), logits.sum() * 0.0


@contextmanager
def frozen_running_stats(model: nn.Module) -> Iterator[None]:
    """Inside the block, BatchNorm layers still normalize with batch statistics (in training)
    but leave their running statistics unchanged (momentum 0)."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.momentum = 0.0
    try:
        yield
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum


def _rrr(model, images, labels, masks, has_mask):
    # The input gradient is taken in training mode, as the cross-entropy is: BatchNorm's batch
    # statistics then couple the images of a batch (RRR itself was defined for networks without
    # BatchNorm).
    grads = input_gradient(model, images, multilabel=False)
    return F.cross_entropy(model(images), labels), RRRLoss()(grads, masks, has_mask)


def _gain(model, images, labels, masks, has_mask):
    maps = grad_cam(model, model.features, images, labels)
    external = GAINLoss()(maps, masks, has_mask)
    erase = F.interpolate(soft_mask(maps.unsqueeze(1)), size=images.shape[-2:], mode="bilinear",
                          align_corners=False)
    with frozen_running_stats(model):  # erased images must not shift the running statistics
        erased_scores = model(images * (1 - erase))
    mining = attention_mining_loss(erased_scores, F.one_hot(labels, erased_scores.shape[1]))
    return F.cross_entropy(model(images), labels), external + mining


METHODS: dict[str, MethodLoss] = {
    "none": _none,
    "camal": _map_loss(CAMALLoss()),
    "camal_energy": _map_loss(CAMALLoss(form="energy")),
    "rrr": _rrr,
    "gain": _gain,
    "l1": _map_loss(L1MapLoss()),
}
BASELINES = ("rrr", "gain", "l1")


def method_loss(name: str) -> MethodLoss:
    """The loss function of method ``name`` (see :data:`METHODS`)."""
    if name not in METHODS:
        raise ValueError(f"unknown guidance method {name!r}; expected one of {tuple(METHODS)}")
    return METHODS[name]
