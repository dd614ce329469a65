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
``pydensecrf``, by default a lattice of 2 x 2 pixel blocks (``bilateral_downsample``, see
:class:`_AppearanceKernel`; 1: of every pixel, as ``pydensecrf``); the smoothness kernel, a
Gaussian of the pixel grid alone, is separable and is applied exactly, as two 1-D convolutions
truncated at 4 standard deviations (``pydensecrf`` approximates it with a lattice too). One
step is ``Q = softmax(-unary + sum_kernels compat * filtered(Q))``, starting from
``softmax(-unary)``. The lattice is built once per call; as Q sums to one over the labels,
L - 1 label channels go through the kernels each step.

Example:
    >>> colors = torch.zeros(1, 8, 8, 3); colors[0, :, 4:] = 200.0  # dark left, bright right
    >>> right = torch.full((1, 8, 8), 0.3); right[..., 4:] = 0.7
    >>> right[0, 0, 1] = 0.6  # one noisy pixel on the left
    >>> probs = torch.stack([1 - right, right], 1)
    >>> probs.argmax(1)[0, 0].tolist(), dense_crf(colors, probs).argmax(1)[0, 0].tolist()
    ([0, 1, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1, 1])
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .crf_params import CRFParams
from .lattice import PermutohedralLattice, csr_matrix

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
    num_labels, height, width = unary.shape[1:]
    if num_labels == 1:
        return torch.ones_like(unary)
    appearance = _AppearanceKernel(colors, params)
    # Normalizations as diagonal scalings: the appearance kernel's per pixel, the smoothness
    # kernel's folded into its two separable factors (its row sums are the products of the
    # factors' row sums).
    appearance_norm = appearance(unary.new_ones(len(unary), 1, height, width)).rsqrt()
    appearance_weight = params.bilateral_compat * appearance_norm
    rows, columns = (_normalized_gaussian(size, params.gaussian_sxy, unary.device)
                     for size in (height, width))
    rows = params.gaussian_compat * rows
    # Q sums to one over the labels, so the last label's message is the message of ones minus
    # the other labels': L - 1 channels go through the kernels.
    total = (torch.outer(rows.sum(1), columns.sum(0))
             + appearance_weight * appearance(appearance_norm))
    q = (-unary).softmax(1)
    for _ in range(params.iterations):
        others = (rows @ q[:, :-1] @ columns).addcmul_(
            appearance(q[:, :-1] * appearance_norm), appearance_weight)
        message = torch.cat([others, total - others.sum(1, keepdim=True)], 1)
        q = message.sub_(unary).softmax(1)
    return q


@functools.lru_cache(maxsize=8)  # the same few image sizes, again and again
def _normalized_gaussian(size: int, sxy: float, device: torch.device) -> Tensor:
    """[size, size] matrix ``n_i^{-1/2} g_ij n_j^{-1/2}``: ``g_ij = exp(-(i - j)^2 / (2
    sxy^2))`` for ``|i - j| <= 4 sxy``, else 0 (the 1-D Gaussian of a grid, truncated at 4
    standard deviations), symmetrically normalized by its row sums ``n``."""
    offsets = torch.arange(size, device=device, dtype=torch.float32)
    offsets = offsets[:, None] - offsets[None, :]
    gaussian = torch.where(offsets.abs() <= 4 * sxy, torch.exp(-offsets**2 / (2 * sxy**2)), 0.0)
    norm = gaussian.sum(1).rsqrt()
    return norm[:, None] * gaussian * norm[None, :]


class _AppearanceKernel:
    """The appearance kernel of a batch of images [B,H,W,C], applied to maps [B,V,H,W]
    (unnormalized: ``sum_j k_ij v_j``).

    With ``params.bilateral_downsample`` f > 1 the lattice holds the f x f pixel blocks (the
    last ones partial where f does not divide the size), each with its pixels' mean position
    and color: a map is averaged over the blocks, filtered there, and every pixel takes the
    result of its 4 nearest blocks, weighted bilinearly times the kernel's color factor
    ``exp(-|c_pixel - c_block|^2 / 2)`` (a joint bilateral upsampling: a pixel at a color edge
    takes the blocks of its own color). f^2 times fewer lattice points; close to the exact
    kernel, as its spatial width (``bilateral_sxy`` pixels) is much larger than f. With f = 1
    every pixel is a lattice point, as in ``pydensecrf``.
    """

    def __init__(self, colors: Tensor, params: CRFParams) -> None:
        batch, height, width, _ = colors.shape
        self.factor, self.size = params.bilateral_downsample, (height, width)
        self.grid = (batch, -(-height // self.factor), -(-width // self.factor))
        xs, ys = (self._pool(torch.arange(size, device=colors.device, dtype=torch.float32))
                  for size in (width, height))
        position = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1)
        block_colors = self._down(colors.float().permute(0, 3, 1, 2)) / params.bilateral_srgb
        features = torch.cat([position.reshape(1, -1, 2).expand(batch, -1, -1).reshape(-1, 2)
                              / params.bilateral_sxy, block_colors], 1)
        groups = (torch.arange(batch, device=colors.device).repeat_interleave(len(xs) * len(ys))
                  if batch > 1 else None)
        self.lattice = PermutohedralLattice(features, groups)
        if self.factor > 1:
            self.upsample = self._upsampling(colors.float() / params.bilateral_srgb, block_colors)

    def _pool(self, coordinates: Tensor) -> Tensor:
        """Block means of 1-D ``coordinates``."""
        return torch.nn.functional.avg_pool1d(coordinates[None, None], self.factor,
                                              ceil_mode=True)[0, 0]

    def _down(self, maps: Tensor) -> Tensor:
        """Points [B*h*w, V] (row-major per image) of maps [B,V,H,W]: block means."""
        if self.factor > 1:
            maps = torch.nn.functional.avg_pool2d(maps, self.factor, ceil_mode=True)
        return maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1])

    def _upsampling(self, colors: Tensor, block_colors: Tensor) -> Tensor:
        """[B*H*W, B*h*w] CSR matrix of the upsampling (see the class doc), for colors
        [B,H,W,C] and the blocks' [B*h*w, C], both divided by ``bilateral_srgb``."""
        batch, height, width, channels = colors.shape
        blocks = self.grid[1] * self.grid[2]
        device = colors.device
        (rows, row_weights), (columns, column_weights) = (
            _bilinear_taps(size, self.factor, count, device)
            for size, count in ((height, self.grid[1]), (width, self.grid[2])))
        # Tap-major [4, B*H*W] (a long last dimension: faster than [B*H*W, 4] on CPU).
        index = (rows[:, None, :, None] * self.grid[2] + columns[None, :, None, :]).view(4, 1, -1)
        # int32 indices: the product takes them without a copy
        index = index + torch.arange(0, batch * blocks, blocks, dtype=torch.int32,
                                     device=device)[:, None]
        index = index.view(4, -1)
        logits = row_weights.log()[:, None, :, None] + column_weights.log()[None, :, None, :]
        logits = logits.view(4, 1, -1).expand(-1, batch, -1).reshape(4, -1)
        for pixel, block in zip(colors.reshape(-1, channels).T.contiguous(),
                                block_colors.T.contiguous()):
            logits -= (pixel - block.index_select(0, index.flatten()).view_as(index)).square_() / 2
        weights = logits.sub_(logits.amax(0)).exp_()  # a softmax over the taps (dim 0 is slow)
        weights /= weights.sum(0)
        offsets = torch.arange(0, index.numel() + 1, 4, dtype=torch.int32, device=device)
        return csr_matrix(offsets, index.T.flatten(), weights.T.flatten(),
                          (index.shape[1], batch * blocks))

    def __call__(self, maps: Tensor) -> Tensor:
        filtered = self.lattice.filter(self._down(maps))
        batch, height, width = self.grid
        if self.factor > 1:
            filtered, (height, width) = self.upsample @ filtered, self.size
        return filtered.view(batch, height, width, -1).permute(0, 3, 1, 2)


def _bilinear_taps(size: int, factor: int, blocks: int, device: torch.device
                   ) -> tuple[Tensor, Tensor]:
    """The two blocks [2, size] nearest each pixel of a row of ``size`` pixels in ``blocks``
    blocks of ``factor`` pixels, and their bilinear weights [2, size]."""
    source = ((torch.arange(size, device=device) + 0.5) / factor - 0.5).clamp(0, blocks - 1)
    low = source.floor().int()
    share = source - low
    return torch.stack([low, (low + 1).clamp_max(blocks - 1)]), torch.stack([1 - share, share])
