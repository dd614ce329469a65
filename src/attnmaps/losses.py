"""Mask-guided attention losses: pull a model's class maps inside the object mask.

Every loss takes ``maps`` [B, K, h, w] (or [B, h, w]), binary ``masks`` [B, K, H, W] (or
[B, H, W]; bool or float in [0, 1], 1 = object), ``has_mask`` [B] (or [B, K]) bool and optionally
``valid`` [B, H, W] bool, False on pixels to leave out of every term (e.g. label 255). Maps are
resized bilinearly to the mask size when sizes differ. Each map gets a loss, and the result is the
mean over the maps whose ``has_mask`` entry is True; the others contribute nothing, and with none
the loss is exactly 0 while staying in the graph. Pass ``has_mask[:, None] & labels.bool()`` to
guide only the maps of present classes. :func:`class_masks` turns label masks into ``masks``.

Example:
    >>> maps = torch.rand(2, 3, 4, 4, requires_grad=True)
    >>> masks = torch.zeros(2, 3, 16, 16, dtype=torch.bool)
    >>> loss = CAMALLoss()(maps, masks, torch.tensor([True, False]))
    >>> loss.backward()
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .conventions import SPATIAL, min_max_normalize


def class_masks(mask: Tensor, num_classes: int, has_background: bool) -> Tensor:
    """Per-class binary masks [B, K, H, W] bool from label masks [B, H, W] (project convention).

    With background, model class ``c`` has label ``c + 1``; without, label ``c``. Ignore pixels
    (255) belong to no class. ``class_masks(...).any(1)`` is the union of all objects.
    """
    offset = 1 if has_background else 0
    labels = torch.arange(num_classes, device=mask.device) + offset
    return mask.unsqueeze(1) == labels.view(1, -1, 1, 1)


def max_normalize(maps: Tensor, eps: float = 1e-6) -> Tensor:
    """Positive part of each map divided by its maximum, in [0, 1] (an all-zero map stays 0)."""
    positive = F.relu(maps)
    return positive / positive.amax(dim=SPATIAL, keepdim=True).clamp_min(eps)


def soft_mask(maps: Tensor, omega: float = 10.0, sigma: float = 0.5) -> Tensor:
    """GAIN's soft threshold ``sigmoid(omega * (A - sigma))`` of the min-max normalized maps.

    Erasing ``images * (1 - soft_mask(maps))`` (maps upsampled to the image) gives the input for
    :func:`attention_mining_loss`.
    """
    return torch.sigmoid(omega * (min_max_normalize(maps) - sigma))


def masked_mean(values: Tensor, weights: Tensor, eps: float = 1e-6) -> Tensor:
    """Weighted spatial mean of each map, [B, K]; 0 where the weights are all zero."""
    return (values * weights).sum(SPATIAL) / weights.sum(SPATIAL).clamp_min(eps)


class MaskGuidedLoss(nn.Module):
    """Base class: checks and aligns the inputs, averages :meth:`map_losses` over guided maps."""

    def map_losses(self, maps: Tensor, masks: Tensor, valid: Tensor) -> Tensor:
        """Loss of every map, [B, K], from float maps and masks [B, K, H, W] and the float
        pixel weights ``valid`` [B, 1, H, W] (1 = counts, 0 = left out)."""
        raise NotImplementedError

    def forward(self, maps: Tensor, masks: Tensor, has_mask: Tensor,
                valid: Tensor | None = None) -> Tensor:
        if maps.ndim not in (3, 4) or masks.ndim != maps.ndim or masks.shape[:-2] != maps.shape[:-2]:
            raise ValueError(f"expected maps and masks [B, K, h, w] / [B, K, H, W] or [B, h, w] / "
                             f"[B, H, W], got {tuple(maps.shape)} and {tuple(masks.shape)}")
        if masks.dtype != torch.bool and not masks.is_floating_point():
            raise ValueError(f"masks must be bool or float in [0, 1], got dtype {masks.dtype}; turn "
                             "label masks into binary ones with class_masks")
        if maps.ndim == 3:
            maps, masks = maps.unsqueeze(1), masks.unsqueeze(1)
        if has_mask.shape not in (maps.shape[:1], maps.shape[:2]):
            raise ValueError(f"has_mask must have shape [B] or [B, K] = {tuple(maps.shape[:2])}, "
                             f"got {tuple(has_mask.shape)}")
        maps = maps.float()
        if maps.shape[-2:] != masks.shape[-2:]:
            maps = F.interpolate(maps, size=masks.shape[-2:], mode="bilinear", align_corners=False)
        if valid is None:
            pixels = maps.new_ones((maps.shape[0], 1, *masks.shape[-2:]))
        elif valid.shape != (maps.shape[0], *masks.shape[-2:]):
            raise ValueError(f"valid must have shape [B, H, W] = "
                             f"{(maps.shape[0], *masks.shape[-2:])}, got {tuple(valid.shape)}")
        else:
            pixels = valid.to(maps.device, torch.float32).unsqueeze(1)
        guided = has_mask.to(maps.device, torch.float32)
        guided = guided.view(-1, 1).expand(maps.shape[:2]) if guided.ndim == 1 else guided
        losses = self.map_losses(maps, masks.to(maps.device, torch.float32), pixels)
        return (losses * guided).sum() / guided.sum().clamp_min(1.0)


class CAMALLoss(MaskGuidedLoss):
    """Class activation maps inside the mask, suppressed outside.

    ``form="contrast"``: with ``A`` the max-normalized map (:func:`max_normalize`),
    ``inside_weight * mean_{p in M}(1 - A) + outside_weight * mean_{p not in M}(A)``; an empty
    region's mean is 0. ``form="energy"``: ``1 - sum_{p in M} A+ / sum_p A+`` with
    ``A+ = relu(map)``, the share of positive map mass outside the mask (1 for an all-zero map).
    """

    def __init__(self, inside_weight: float = 1.0, outside_weight: float = 1.0, eps: float = 1e-6,
                 form: str = "contrast"):
        super().__init__()
        if form not in ("contrast", "energy"):
            raise ValueError(f"CAMALLoss form={form!r}; expected 'contrast' or 'energy'")
        self.inside_weight = inside_weight
        self.outside_weight = outside_weight
        self.eps = eps
        self.form = form

    def map_losses(self, maps: Tensor, masks: Tensor, valid: Tensor) -> Tensor:
        if self.form == "energy":
            positive = F.relu(maps) * valid
            inside = (positive * masks).sum(SPATIAL)
            return 1 - inside / positive.sum(SPATIAL).clamp_min(self.eps)
        normalized = max_normalize(maps, self.eps)
        inside = masked_mean(1 - normalized, masks * valid, self.eps)
        outside = masked_mean(normalized, (1 - masks) * valid, self.eps)
        return self.inside_weight * inside + self.outside_weight * outside


class GAINLoss(MaskGuidedLoss):
    """GAIN external supervision (Li et al., 2018): mean squared error between
    :func:`soft_mask` of the map and the mask."""

    def __init__(self, omega: float = 10.0, sigma: float = 0.5, eps: float = 1e-6):
        super().__init__()
        self.omega = omega
        self.sigma = sigma
        self.eps = eps

    def map_losses(self, maps: Tensor, masks: Tensor, valid: Tensor) -> Tensor:
        error = (soft_mask(maps, self.omega, self.sigma) - masks).pow(2)
        return masked_mean(error, valid.expand_as(error), self.eps)


def attention_mining_loss(masked_scores: Tensor, labels: Tensor) -> Tensor:
    """GAIN attention mining: mean sigmoid score [B, K] of the true classes (``labels`` multi-hot
    [B, K]) on the images with their attended regions erased; 0 when no class is present."""
    positive = (labels > 0).to(masked_scores.dtype)
    return (torch.sigmoid(masked_scores) * positive).sum() / positive.sum().clamp_min(1.0)


class L1MapLoss(MaskGuidedLoss):
    """GRADIA-style mean absolute difference between the max-normalized map and the mask."""

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def map_losses(self, maps: Tensor, masks: Tensor, valid: Tensor) -> Tensor:
        error = (max_normalize(maps, self.eps) - masks).abs()
        return masked_mean(error, valid.expand_as(error), self.eps)


class RRRLoss(MaskGuidedLoss):
    """Right for the Right Reasons (Ross et al., 2017): input gradients outside the mask.

    ``forward(input_grads [B, C, H, W], masks [B, H, W], has_mask [B])`` returns ``weight`` times
    the mean over guided images of ``sum_{p not in M} sum_c grad_{c,p}^2``; see
    :func:`input_gradient` for the gradients.
    """

    def __init__(self, weight: float = 1.0):
        super().__init__()
        self.weight = weight

    def map_losses(self, maps: Tensor, masks: Tensor, valid: Tensor) -> Tensor:
        return self.weight * (maps * (1 - masks) * valid).sum(SPATIAL)

    def forward(self, input_grads: Tensor, masks: Tensor, has_mask: Tensor,
                valid: Tensor | None = None) -> Tensor:
        if input_grads.ndim != 4 or masks.ndim != 3 or masks.shape != (
                input_grads.shape[:1] + input_grads.shape[2:]):
            raise ValueError(f"RRRLoss expects input_grads [B, C, H, W] and masks [B, H, W] of the "
                             f"same size, got {tuple(input_grads.shape)} and {tuple(masks.shape)}")
        return super().forward(input_grads.pow(2).sum(1), masks, has_mask, valid)


def input_gradient(model: nn.Module, images: Tensor, create_graph: bool = True,
                   multilabel: bool = True) -> Tensor:
    """``d sum_k log p_k / d images`` [B, C, H, W] for RRRLoss.

    ``log p`` is ``logsigmoid(logits)`` for multi-label models and ``log_softmax(logits)``
    otherwise. With ``create_graph=True`` a loss on the result trains the model.
    """
    images = images.detach().requires_grad_(True)
    logits = model(images)
    log_probs = F.logsigmoid(logits) if multilabel else F.log_softmax(logits, dim=1)
    (grads,) = torch.autograd.grad(log_probs.sum(), images, create_graph=create_graph)
    return grads


class NoGuidance(nn.Module):
    """Baseline without mask guidance: exactly 0, connected to ``maps``' graph."""

    def forward(self, maps: Tensor, masks: Tensor | None = None,
                has_mask: Tensor | None = None) -> Tensor:
        return maps.sum() * 0.0
