"""Differentiable class attention maps for use inside the training graph.

* :func:`cam`: class activation maps of a CNN ending in global average pooling + linear layer.
* :func:`token_cam`: the same for a ViT whose head is a linear layer on mean-pooled patch tokens.
* class-token attention of a :class:`~attnmaps.models.vit.ClassTokenViT`: its ``predict``.
* :func:`grad_cam`: Grad-CAM on any layer with a [B, C, h, w] output, differentiable to second
  order so that a loss on the map trains the model.

Example:
    >>> features, weight = torch.randn(2, 8, 4, 4), torch.randn(3, 8)
    >>> cam(features, weight).shape
    torch.Size([2, 3, 4, 4])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def cam(features: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """Class activation maps ``A_c = sum_k w_ck F_k``, [B, K, h, w].

    Args:
        features: last feature maps [B, C, h, w] before global average pooling.
        weight: linear classifier weight [K, C].
        bias: optional classifier bias [K], added at every location, so that the spatial mean of
            the map equals the logit exactly.
    """
    if features.ndim != 4 or weight.ndim != 2 or weight.shape[1] != features.shape[1]:
        raise ValueError(f"cam expects features [B, C, h, w] and weight [K, C], got "
                         f"{tuple(features.shape)} and {tuple(weight.shape)}")
    maps = torch.einsum("bchw,kc->bkhw", features, weight)
    if bias is not None:
        maps = maps + bias.view(1, -1, 1, 1)
    return maps


def token_cam(patch_tokens: Tensor, grid: tuple[int, int], weight: Tensor,
              norm: nn.Module | None = None, bias: Tensor | None = None) -> Tensor:
    """Token CAM ``A_c(p) = w_c . norm(z_p)`` of a ViT with a mean-pooled linear head, [B, K, h, w].

    Args:
        patch_tokens: patch token outputs [B, N, D] with ``N = h * w`` in row-major order.
        grid: (h, w) patch grid.
        weight: head weight [K, D].
        norm: the layer applied to each token before pooling (e.g. the final LayerNorm), if any.
        bias: optional head bias [K], added at every location (see :func:`cam`).
    """
    batch, tokens, dim = patch_tokens.shape
    if tokens != grid[0] * grid[1]:
        raise ValueError(f"token_cam got {tokens} patch tokens for grid={tuple(grid)}; "
                         f"expected {grid[0] * grid[1]}")
    if norm is not None:
        patch_tokens = norm(patch_tokens)
    features = patch_tokens.transpose(1, 2).reshape(batch, dim, *grid)
    return cam(features, weight, bias)


def grad_cam(model: nn.Module, layer: nn.Module, images: Tensor, class_idx: Tensor,
             create_graph: bool = True) -> Tensor:
    """Grad-CAM [B, h, w] of class ``class_idx[b]`` on the output [B, C, h, w] of ``layer``.

    ``relu(sum_k a_k F_k)`` with ``a_k`` the spatial mean of ``d score / d F_k``. With
    ``create_graph=True`` the gradient itself is differentiable, so a loss on the map reaches
    every parameter of the model (second order); with False only the activations ``F`` carry
    gradient.
    """
    captured: list[Tensor] = []
    handle = layer.register_forward_hook(lambda module, inputs, output: captured.append(output))
    try:
        logits = model(images)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise ValueError(f"grad_cam: layer {type(layer).__name__} ran {len(captured)} times in the "
                         "model's forward pass; expected exactly once")
    activations = captured[0]
    if not isinstance(activations, Tensor) or activations.ndim != 4:
        shape = tuple(activations.shape) if isinstance(activations, Tensor) else type(activations)
        raise ValueError(f"grad_cam needs a layer output [B, C, h, w], got {shape}")
    scores = logits.gather(1, class_idx.view(-1, 1).to(logits.device)).sum()
    (grads,) = torch.autograd.grad(scores, activations, create_graph=create_graph)
    weights = grads.mean(dim=(2, 3), keepdim=True)
    return F.relu((weights * activations).sum(1))
