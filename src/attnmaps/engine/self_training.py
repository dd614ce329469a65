"""Self-training of the class maps on their own refined read-out (as ToCo and DuPL train on
refined pseudo labels, here at patch level and inside the classifier).

The raw class-token maps are a sharp peak on a few patches over a low plateau: nothing in the
image-label loss asks a map to cover its object, while the refined read-out (PAMR + binarising)
does cover it. Each training step (or, with ``train.self_train_refresh_epochs``, once every few
epochs for all training images: :mod:`~attnmaps.engine.self_training_refresh`) the model's own
maps of the image's true classes (no gradient, evaluation mode, every patch) are refined and
binarised as the pseudo masks are (at ``cell`` x ``cell`` pixels per patch, PAMR's dilations
scaled alike: on CPU the affinities at full resolution cost several training steps), and the
share of each patch's pixels that each class's mask holds becomes the target of two terms on the
training forward's patches (the kept ones under PatchDropout):

* :func:`dense_patch_bce`: the patch head's per-patch class scores against those shares
  (absent classes: 0 on every patch), so its sigmoid, which fused maps multiply in, is high on
  the whole object and low around it;
* :func:`attention_target_loss`: the cross-entropy from each present class's target shares,
  normalised to a distribution over the patches, to that class token's attention renormalised
  over the same patches, so the token spreads its attention over the object instead of a peak;
* :func:`absent_attention_loss`: the tokens of the classes *not* in the image are pulled to
  attend evenly, instead of to whatever object the image holds (which makes all maps alike).

Example:
    >>> masks = torch.tensor([[[0, 1], [2, 1]]])  # one 2x2 image: background, class 0, class 1
    >>> patch_shares(masks, num_classes=2, has_background=True, grid=(1, 1)).tolist()
    [[[0.5], [0.25]]]
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import PseudoMaskConfig
from ..conventions import IGNORE_INDEX
from ..models.vit import ClassTokenViT
from ..pseudo.masks import class_scores, make_pseudo_masks
from ..pseudo.pamr import DILATIONS


def patch_shares(masks: Tensor, num_classes: int, has_background: bool,
                 grid: tuple[int, int]) -> Tensor:
    """The share [B,K,h*w] of each patch's pixels that each class holds in the label masks
    ``masks`` [B,H,W] (class ``c`` is label ``c + 1`` with background, ``c`` without; ignore
    pixels and background count for no class). H, W must be multiples of ``grid``."""
    height, width = masks.shape[-2:]
    if height % grid[0] or width % grid[1]:
        raise ValueError(f"masks of {height}x{width} pixels do not tile a {grid[0]}x{grid[1]} "
                         "patch grid")
    offset = int(has_background)
    labels = masks.long() - offset
    inside = (labels >= 0) & (labels < num_classes) & (masks != IGNORE_INDEX)
    onehot = F.one_hot(labels.clamp(0, num_classes - 1), num_classes) * inside.unsqueeze(-1)
    shares = F.avg_pool2d(onehot.permute(0, 3, 1, 2).float(),
                          (height // grid[0], width // grid[1]))
    return shares.flatten(2)


def scaled_dilations(factor: float) -> tuple[int, ...]:
    """PAMR's dilations for images resized by ``factor`` (each rounded, at least 1, distinct)."""
    return tuple(sorted({max(1, round(d * factor)) for d in DILATIONS}))


@torch.no_grad()
def refined_masks(model: ClassTokenViT, images: Tensor, labels: Tensor,
                  settings: PseudoMaskConfig, refine_iterations: int,
                  attn_blocks: str | Sequence[int], has_background: bool,
                  cell: int = 4) -> Tensor:
    """Label masks [B, h*cell, w*cell] (uint8, the project's convention) that the model's own
    class maps (``settings.maps``; evaluation mode, every patch, no gradient) of the true
    classes (``labels`` > 0.5) give after ``refine_iterations`` of PAMR and binarising at
    ``settings.threshold`` with ``settings.merge``, all at ``cell`` x ``cell`` pixels per patch
    of the h x w grid (the images area-resized to that, PAMR's dilations scaled alike)."""
    was_training = model.training
    model.eval()
    try:
        _, maps = model.predict(images, attn_blocks, fused=settings.maps == "fused")
    finally:
        model.train(was_training)
    grid = tuple(maps.shape[-2:])
    size = (grid[0] * cell, grid[1] * cell)
    factor = size[0] / images.shape[-2]
    small = images if factor == 1 else F.interpolate(images, size=size, mode="area")
    present = labels > 0.5
    scores = class_scores(small.float(), maps.float(), present, refine_iterations,
                          scaled_dilations(factor))
    masks = make_pseudo_masks(scores, present.float(), size, threshold=settings.threshold,
                              has_background=has_background, labels=labels,
                              merge=settings.merge)
    return masks.to(torch.uint8)


def refined_patch_targets(model: ClassTokenViT, images: Tensor, labels: Tensor,
                          settings: PseudoMaskConfig, refine_iterations: int,
                          attn_blocks: str | Sequence[int], has_background: bool,
                          cell: int = 4) -> Tensor:
    """Targets [B,K,N]: the patch shares (:func:`patch_shares`) of :func:`refined_masks`."""
    masks = refined_masks(model, images, labels, settings, refine_iterations, attn_blocks,
                          has_background, cell)
    grid = (masks.shape[-2] // cell, masks.shape[-1] // cell)
    return patch_shares(masks, model.num_classes, has_background, grid)


def dense_patch_bce(patch_scores: Tensor, targets: Tensor) -> Tensor:
    """Mean BCE of the patch head's scores [B,N,K] (logits) against targets [B,K,N] in [0, 1]."""
    return F.binary_cross_entropy_with_logits(patch_scores.float(),
                                              targets.transpose(1, 2).to(torch.float32))


def attention_target_loss(attention: Tensor, targets: Tensor, present: Tensor,
                          eps: float = 1e-8) -> Tensor:
    """Mean over the present (image, class) pairs with some target of the cross-entropy
    ``-sum_n t_n log a_n``, where ``t`` = the targets [B,K,N] and ``a`` = the class-to-patch
    attention [B,K,N], each normalised to sum 1 over the N patches; 0 without such a pair."""
    targets = targets.to(torch.float32)
    chosen = present.bool() & (targets.sum(-1) > 0)
    if not chosen.any():
        return attention.sum() * 0.0
    target = targets[chosen]
    target = target / target.sum(-1, keepdim=True)
    weights = attention[chosen].float()
    log_attention = (weights.clamp_min(eps) / weights.sum(-1, keepdim=True).clamp_min(eps)).log()
    return -(target * log_attention).sum(-1).mean()


def absent_attention_loss(attention: Tensor, absent: Tensor) -> Tensor:
    """Mean over the absent (image, class) pairs of the KL divergence from the uniform
    distribution over the N patches to the class token's attention [B,K,N] renormalised over
    them: 0 when a token whose class is not in the image attends evenly, instead of to the
    objects that are there (which makes the maps of all classes alike)."""
    uniform = torch.ones_like(attention, dtype=torch.float32)
    return attention_target_loss(attention, uniform, absent) - math.log(attention.shape[-1])
