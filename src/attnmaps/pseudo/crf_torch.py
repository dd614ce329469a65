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
filtered(Q))``, starting from ``softmax(-unary)``. The lattice is built once per call; as Q sums
to one over the labels, L - 1 label channels go through the kernels each step.

Example:
    >>> colors = torch.zeros(1, 8, 8, 3); colors[0, :, 4:] = 200.0  # dark left, bright right
    >>> right = torch.full((1, 8, 8), 0.3); right[..., 4:] = 0.7
    >>> right[0, 0, 1] = 0.6  # one noisy pixel on the left
    >>> probs = torch.stack([1 - right, right], 1)
    >>> probs.argmax(1)[0, 0].tolist(), dense_crf(colors, probs).argmax(1)[0, 0].tolist()
    ([0, 1, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1, 1])
"""

from __future__ import annotations

import torch
from torch import Tensor

from .crf_params import CRFParams
from .lattice import PermutohedralLattice

PROB_FLOOR = 1e-5  # probabilities are clipped here before -log, as pydensecrf's utils do


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
    batch, num_labels = probs.shape[:2]
    unary = -probs.float().clamp_min(PROB_FLOOR).log()
    if allowed is not None:
        if allowed.shape != (batch, num_labels) or not allowed.any(1).all():
            raise ValueError(f"allowed must be bool [B,L] = {(batch, num_labels)} with at least "
                             f"one label per image, got {tuple(allowed.shape)}")
        unary = unary.masked_fill(~allowed.bool()[:, :, None, None], float("inf"))
    # On CPU one image at a time: the working set of one image stays in cache (faster per image
    # than a batch's); on CUDA the whole batch at once.
    chunk = 1 if unary.device.type == "cpu" else batch
    return torch.cat([_mean_field(colors[start: start + chunk], unary[start: start + chunk],
                                  params) for start in range(0, batch, chunk)])


def _mean_field(colors: Tensor, unary: Tensor, params: CRFParams) -> Tensor:
    """Q [B,L,H,W] after ``params.iterations`` mean-field steps from ``softmax(-unary)``."""
    batch, num_labels, height, width = unary.shape
    if num_labels == 1:
        return torch.ones_like(unary)
    appearance = _appearance_lattice(colors, params)
    # Normalizations as diagonal scalings: the appearance kernel's per point ([B,H,W,1], the
    # lattice's point order), the smoothness kernel's folded into its two separable factors
    # (its row sums are the products of the factors' row sums).
    appearance_norm = appearance.filter(unary.new_ones(batch * height * width, 1)).rsqrt()
    appearance_norm = appearance_norm.view(batch, height, width, 1)
    appearance_weight = (params.bilateral_compat * appearance_norm).permute(0, 3, 1, 2)
    rows, columns = (_normalized_gaussian(size, params.gaussian_sxy, unary.device)
                     for size in (height, width))
    rows = params.gaussian_compat * rows
    # Q sums to one over the labels, so the last label's message is the message of ones minus
    # the other labels': L - 1 channels go through the kernels.
    total = (torch.outer(rows.sum(1), columns.sum(0))
             + appearance_weight * appearance.filter(appearance_norm.view(-1, 1)).view(
                 batch, 1, height, width))
    q = (-unary).softmax(1)
    points = q.new_empty(batch, height, width, num_labels - 1)
    for _ in range(params.iterations):
        torch.mul(q[:, :-1].permute(0, 2, 3, 1), appearance_norm, out=points)
        filtered = appearance.filter(points.view(-1, num_labels - 1))
        others = (rows @ q[:, :-1] @ columns).addcmul_(
            filtered.view(points.shape).permute(0, 3, 1, 2), appearance_weight)
        message = torch.cat([others, total - others.sum(1, keepdim=True)], 1)
        q = message.sub_(unary).softmax(1)
    return q


def _normalized_gaussian(size: int, sxy: float, device: torch.device) -> Tensor:
    """[size, size] matrix ``n_i^{-1/2} g_ij n_j^{-1/2}``: ``g_ij = exp(-(i - j)^2 / (2
    sxy^2))`` for ``|i - j| <= 4 sxy``, else 0 (the 1-D Gaussian of a grid, truncated at 4
    standard deviations), symmetrically normalized by its row sums ``n``."""
    offsets = torch.arange(size, device=device, dtype=torch.float32)
    offsets = offsets[:, None] - offsets[None, :]
    gaussian = torch.where(offsets.abs() <= 4 * sxy, torch.exp(-offsets**2 / (2 * sxy**2)), 0.0)
    norm = gaussian.sum(1).rsqrt()
    return norm[:, None] * gaussian * norm[None, :]


def _appearance_lattice(colors: Tensor, params: CRFParams) -> PermutohedralLattice:
    """The lattice of the appearance features of a batch, one group of points per image."""
    batch, height, width, channels = colors.shape
    device = colors.device
    ys, xs = torch.meshgrid(torch.arange(height, device=device, dtype=torch.float32),
                            torch.arange(width, device=device, dtype=torch.float32),
                            indexing="ij")
    position = torch.stack([xs, ys], -1).reshape(1, -1, 2).expand(batch, -1, -1).reshape(-1, 2)
    groups = (torch.arange(batch, device=device).repeat_interleave(height * width)
              if batch > 1 else None)
    features = torch.cat([position / params.bilateral_sxy,
                          colors.float().reshape(-1, channels) / params.bilateral_srgb], 1)
    return PermutohedralLattice(features, groups)
