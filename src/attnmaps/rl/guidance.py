"""Mask-guidance terms for a policy: :mod:`attnmaps.losses` applied to the exact map of the action
taken in each stored frame.

``camal`` / ``camal_energy`` (:class:`~attnmaps.losses.CAMALLoss`, contrast / energy form),
``l1`` (:class:`~attnmaps.losses.L1MapLoss`) and ``gain`` (GAIN's external supervision,
:class:`~attnmaps.losses.GAINLoss`; without attention mining, whose sigmoid of a class score has
no meaning for the shift-invariant logits of a softmax policy) act on the action's CAM; ``rrr``
(:class:`~attnmaps.losses.RRRLoss`) on the input gradient of the summed action log-probabilities.
Since a GAP + linear head makes Grad-CAM equal ``relu(CAM - b) / (h w)``, the exact CAM serves
for GAIN as well. Only frames with ``has_mask`` enter the term (:func:`guidance_loss`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..losses import CAMALLoss, GAINLoss, L1MapLoss, MaskGuidedLoss, RRRLoss, input_gradient
from .policy import PolicyMaps

FrameLoss = Callable[[PolicyMaps, Tensor, Tensor, Tensor], Tensor]


def _on_action_map(loss: MaskGuidedLoss) -> FrameLoss:
    def term(net: PolicyMaps, images: Tensor, actions: Tensor, masks: Tensor) -> Tensor:
        _, _, maps = net.maps(images)
        chosen = maps[torch.arange(len(actions)), actions]
        return loss(chosen, masks, torch.ones(len(actions), dtype=torch.bool))
    return term


def _rrr(net: PolicyMaps, images: Tensor, actions: Tensor, masks: Tensor) -> Tensor:
    grads = input_gradient(net, images, multilabel=False)
    return RRRLoss()(grads, masks, torch.ones(len(actions), dtype=torch.bool))


METHODS: dict[str, FrameLoss | None] = {
    "none": None,
    "camal": _on_action_map(CAMALLoss()),
    "camal_energy": _on_action_map(CAMALLoss(form="energy")),
    "rrr": _rrr,
    "gain": _on_action_map(GAINLoss()),
    "l1": _on_action_map(L1MapLoss()),
}
BASELINES = ("rrr", "gain", "l1")


def check_method(name: str) -> str:
    """``name`` if it is a method of :data:`METHODS`, else a ValueError listing them."""
    if name not in METHODS:
        raise ValueError(f"unknown guidance method {name!r}; expected one of {tuple(METHODS)}")
    return name


def guidance_loss(net: PolicyMaps, observations: dict[str, Tensor], actions: Tensor,
                  method: str) -> Tensor | None:
    """The guidance term of ``method`` on the frames of ``observations`` (as stored by SB3 from
    :class:`~attnmaps.rl.observation.MaskObservation`) whose ``has_mask`` is set, for the taken
    ``actions`` [B]; None for ``none`` or when no frame has a mask. Frames without a mask never
    enter the computation."""
    frame_loss = METHODS[check_method(method)]
    if frame_loss is None:
        return None
    inputs = net.preprocess(observations)
    keep = inputs["has_mask"].view(-1) > 0.5
    if not keep.any():
        return None
    images = inputs["image"][keep]
    masks = inputs["mask"][keep] > 0.5
    return frame_loss(net, images, actions.long().view(-1)[keep], masks)
