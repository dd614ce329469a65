"""Fully connected CRF (Krähenbühl & Koltun, NeurIPS 2011) in plain torch: batched, CPU or CUDA,
no compiled extension.

Mean-field inference with a Potts model and two Gaussian kernels, as ``pydensecrf``'s
``DenseCRF2D`` with ``addPairwiseGaussian`` + ``addPairwiseBilateral``:

* a smoothness kernel on the positions ``p / gaussian_sxy`` with weight ``gaussian_compat``;
* an appearance (bilateral) kernel on ``(p / bilateral_sxy, colors / bilateral_srgb)`` with
  weight ``bilateral_compat``.

Each kernel ``k(f_i, f_j) = exp(-|f_i - f_j|^2 / 2)`` is applied with symmetric normalization,
``n_i^{-1/2} sum_j k_ij n_j^{-1/2} Q_j`` with ``n_i = sum_j k_ij`` (the pixel itself included).
The appearance kernel goes through a permutohedral lattice (:mod:`.lattice`), as in
``pydensecrf``; the smoothness kernel, a Gaussian of the pixel grid alone, is separable and is
applied exactly, as two 1-D convolutions truncated at 4 standard deviations (``pydensecrf``
approximates it with a lattice too). One step is ``Q = softmax(-unary + sum_kernels compat *
filtered(Q))``, starting from ``softmax(-unary)``.

Example:
    >>> colors = torch.zeros(1, 8, 8, 3); colors[0, :, 4:] = 200.0  # dark left, bright right
    >>> right = torch.full((1, 8, 8), 0.3); right[..., 4:] = 0.7
    >>> right[0, 0, 1] = 0.6  # one noisy pixel on the left
    >>> probs = torch.stack([1 - right, right], 1)
    >>> probs.argmax(1)[0, 0].tolist(), dense_crf(colors, probs).argmax(1)[0, 0].tolist()
    ([0, 1, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1, 1])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .lattice import PermutohedralLattice

PROB_FLOOR = 1e-5  # probabilities are clipped here before -log, as pydensecrf's utils do


@dataclass(frozen=True)
class CRFParams:
    """Mean-field steps and kernel parameters (pixels, color units 0..255, weights).

    The defaults are those of the attention/CAM seed refinement in PSA (Ahn & Kwak, CVPR 2018)
    and the WSSS code built on it.
    """

    iterations: int = 10
    gaussian_sxy: float = 3.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 80.0
    bilateral_srgb: float = 13.0
    bilateral_compat: float = 10.0

    def __post_init__(self) -> None:
        if self.iterations < 0:
            raise ValueError(f"CRF iterations (pseudo.crf_iterations) must be >= 0, got "
                             f"{self.iterations}")
        for name in ("gaussian_sxy", "bilateral_sxy", "bilateral_srgb"):
            if not getattr(self, name) > 0:
                raise ValueError(f"CRF kernel width pseudo.crf_{name} must be > 0, got "
                                 f"{getattr(self, name)}")


DEFAULT_PARAMS = CRFParams()


def dense_crf(colors: Tensor, probs: Tensor, params: CRFParams = DEFAULT_PARAMS,
              allowed: Tensor | None = None) -> Tensor:
    """Mean-field marginals Q [B,L,H,W] of the dense CRF with unary ``-log probs``.

    Args:
        colors: [B,H,W,C] colors in 0..255 units (any channel count).
        probs: [B,L,H,W] label probabilities (clipped at 1e-5; need not sum to one).
        params: kernel parameters and steps.
        allowed: optional bool [B,L]; labels not allowed in an image get Q = 0 throughout, which
            equals running that image's CRF over its allowed labels only. At least one label
            per image must be allowed.
    """
    if colors.dim() != 4 or probs.dim() != 4 or colors.shape[:3] != (probs.shape[0],
                                                                     *probs.shape[2:]):
        raise ValueError(f"colors must be [B,H,W,C] and probs [B,L,H,W] with the same B, H, W; "
                         f"got colors {tuple(colors.shape)} and probs {tuple(probs.shape)}")
    batch, num_labels, height, width = probs.shape
    unary = -probs.float().clamp_min(PROB_FLOOR).log()
    if allowed is not None:
        if allowed.shape != (batch, num_labels) or not allowed.any(1).all():
            raise ValueError(f"allowed must be bool [B,L] = {(batch, num_labels)} with at least "
                             f"one label per image, got {tuple(allowed.shape)}")
        unary = unary.masked_fill(~allowed.bool()[:, :, None, None], float("inf"))
    appearance = _appearance_lattice(colors, params)
    ones = unary.new_ones(batch, 1, height, width)
    appearance_norm = (_filter(appearance, ones) + 1e-20).rsqrt()
    # The smoothness kernel is separable on the pixel grid: G_H @ v @ G_W.
    rows, columns = (_gaussian_matrix(size, params.gaussian_sxy, probs.device)
                     for size in (height, width))
    smooth_norm = (rows @ ones @ columns + 1e-20).rsqrt()
    q = _softmax(-unary)
    for _ in range(params.iterations):
        message = (params.bilateral_compat * appearance_norm
                   * _filter(appearance, q * appearance_norm)
                   + params.gaussian_compat * smooth_norm
                   * (rows @ (q * smooth_norm) @ columns))
        q = _softmax(message - unary)
    return q


def _softmax(logits: Tensor) -> Tensor:
    """Softmax over dim 1 of [B,L,H,W] (faster than ``Tensor.softmax`` over a short dim 1)."""
    exp = (logits - logits.amax(1, keepdim=True)).exp()
    return exp / exp.sum(1, keepdim=True)


def _filter(lattice: PermutohedralLattice, values: Tensor) -> Tensor:
    """``lattice.filter`` of image-shaped ``values`` [B,V,H,W] (points in (b, y, x) order)."""
    batch, channels, height, width = values.shape
    points = values.permute(0, 2, 3, 1).reshape(-1, channels)
    filtered = lattice.filter(points).view(batch, height, width, channels)
    return filtered.permute(0, 3, 1, 2).contiguous()


def _gaussian_matrix(size: int, sxy: float, device: torch.device) -> Tensor:
    """[size, size] matrix ``exp(-(i - j)^2 / (2 sxy^2))`` for ``|i - j| <= 4 sxy``, else 0: the
    1-D Gaussian of a grid, truncated at 4 standard deviations."""
    offsets = torch.arange(size, device=device, dtype=torch.float32)
    offsets = offsets[:, None] - offsets[None, :]
    return torch.where(offsets.abs() <= 4 * sxy, torch.exp(-offsets**2 / (2 * sxy**2)), 0.0)


def _appearance_lattice(colors: Tensor, params: CRFParams) -> PermutohedralLattice:
    """The lattice of the appearance features of a batch, one group of points per image."""
    batch, height, width, channels = colors.shape
    device = colors.device
    ys, xs = torch.meshgrid(torch.arange(height, device=device, dtype=torch.float32),
                            torch.arange(width, device=device, dtype=torch.float32),
                            indexing="ij")
    position = torch.stack([xs, ys], -1).reshape(1, -1, 2).expand(batch, -1, -1).reshape(-1, 2)
    groups = torch.arange(batch, device=device).repeat_interleave(height * width)
    features = torch.cat([position / params.bilateral_sxy,
                          colors.float().reshape(-1, channels) / params.bilateral_srgb], 1)
    return PermutohedralLattice(features, groups)
