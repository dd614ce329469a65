"""Masked image modelling (SimMIM, Xie et al. 2022) around a ClassTokenViT encoder.

A random ``mask_ratio`` of the patches of each image is hidden: their pixels are set to 0 (the
normalized mean) before the stem, so no convolution sees them, and their patch embeddings are
replaced by a learned mask token (through a forward hook on ``encoder.patch_embed``, so the
encoder is unchanged and its weights load into a classifier as they are). A linear decoder
predicts each patch's normalized pixels from the encoder's patch outputs, and the loss is the
L1 error over the hidden patches only.

Example:
    >>> mim = MaskedImageModel(ClassTokenViT(10, img_size=(32, 32), patch_size=8))  # doctest: +SKIP
    >>> loss = mim(images, random_patch_mask(len(images), (4, 4), 0.6))  # doctest: +SKIP
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .vit import ClassTokenViT


def random_patch_mask(batch: int, grid: tuple[int, int], ratio: float,
                      generator: torch.Generator | None = None) -> Tensor:
    """Bool [B, h, w]: exactly ``round(ratio * h * w)`` (at least 1) hidden patches per image."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"pretrain.mask_ratio must lie in (0, 1), got {ratio}")
    count = grid[0] * grid[1]
    hidden = max(1, round(ratio * count))
    ranks = torch.rand(batch, count, generator=generator).argsort(1).argsort(1)
    return (ranks < hidden).view(batch, *grid)


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """[B, C, H, W] -> [B, N, patch_size**2 * C], patches in row-major order, pixels (p, p, C)."""
    batch, channels, height, width = images.shape
    h, w = height // patch_size, width // patch_size
    x = images.reshape(batch, channels, h, patch_size, w, patch_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(batch, h * w, patch_size**2 * channels)


def masked_patch_l1(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean absolute error over the hidden patches only: ``pred``/``target`` [B, N, P],
    ``mask`` bool [B, N]."""
    per_patch = (pred - target).abs().mean(-1)
    weights = mask.to(per_patch.dtype)
    return (per_patch * weights).sum() / weights.sum().clamp_min(1.0)


class MaskedImageModel(nn.Module):
    """SimMIM pretraining wrapper: ``forward(images, mask)`` returns the masked-patch L1 loss."""

    def __init__(self, encoder: ClassTokenViT):
        super().__init__()
        self.encoder = encoder
        dim = encoder.pos_embed.shape[-1]
        self.mask_token = nn.Parameter(torch.zeros(1, dim, 1, 1))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.decoder = nn.Linear(dim, encoder.patch_size**2 * encoder.in_chans)
        self._mask: Tensor | None = None
        encoder.patch_embed.register_forward_hook(self._hide_patches)

    def no_weight_decay(self) -> set[str]:
        return {*self.encoder.no_weight_decay(), "mask_token"}

    def _hide_patches(self, module: nn.Module, inputs: tuple, output: Tensor) -> Tensor | None:
        if self._mask is None:
            return None
        hidden = self._mask.unsqueeze(1).to(output.dtype)
        return output * (1 - hidden) + self.mask_token.to(output.dtype) * hidden

    def reconstruct(self, images: Tensor, mask: Tensor) -> Tensor:
        """Predicted patch pixels [B, N, p*p*C] from ``images`` with the patches ``mask``
        (bool [B, h, w]) hidden."""
        p = self.encoder.patch_size
        grid = (images.shape[-2] // p, images.shape[-1] // p)
        if mask.shape != (images.shape[0], *grid):
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match the patch grid "
                             f"{(images.shape[0], *grid)} of images {tuple(images.shape)}")
        pixels = F.interpolate(mask[:, None].float(), scale_factor=p, mode="nearest")
        self._mask = mask
        try:
            out = self.encoder.forward_features(images * (1 - pixels.to(images.dtype)))
        finally:
            self._mask = None
        return self.decoder(out["patch"])

    def forward(self, images: Tensor, mask: Tensor) -> Tensor:
        """The masked-patch L1 loss of :meth:`reconstruct` against the normalized pixels."""
        pred = self.reconstruct(images, mask)
        return masked_patch_l1(pred, patchify(images, self.encoder.patch_size), mask.flatten(1))
