"""Permutohedral-lattice Gaussian filtering in plain torch (Adams, Baek & Davis, 2010).

``PermutohedralLattice(features).filter(values)`` approximates ``out_i = sum_j
exp(-|f_i - f_j|^2 / 2) v_j`` for N points with d-dimensional features in O(N d^2): every point
is splatted onto the d + 1 vertices of its enclosing simplex with barycentric weights, the
lattice is blurred with ``[1/2, 1, 1/2]`` along each of its d + 1 axes, and the result is sliced
back with the same weights. The construction follows, step for step, the lattice of Krähenbühl's
dense CRF (the one ``pydensecrf`` builds), so both filter the same way; here every step is a
tensor operation (a sort-based hash instead of a hash table) and splat, blur and slice are
sparse matrix products, on the features' device.

``groups`` (one integer per point, e.g. the image of a batch it belongs to) keeps groups apart:
points of different groups never share a lattice vertex.

Example:
    >>> features = torch.tensor([[0.0, 0.0], [0.1, 0.0], [50.0, 50.0]])
    >>> out = PermutohedralLattice(features).filter(torch.ones(3, 1))
    >>> bool(out[0, 0] > out[2, 0])  # the first two points are near each other, the third alone
    True
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor


class PermutohedralLattice:
    """The lattice of ``features`` [N,d] (float); see the module doc."""

    def __init__(self, features: Tensor, groups: Tensor | None = None):
        if features.dim() != 2 or features.shape[1] < 1:
            raise ValueError(f"features must be [N,d] with d >= 1, got {tuple(features.shape)}")
        num_points, d = features.shape
        device = features.device
        features = features.float()
        self.alpha = 1.0 / (1.0 + 2.0 ** -d)
        scale = math.sqrt(2.0 / 3.0) * (d + 1) / torch.sqrt(
            torch.arange(1, d + 1, device=device, dtype=torch.float64)
            * torch.arange(2, d + 2, device=device, dtype=torch.float64)).float()
        elevated = _elevate(features * scale)  # [N, d+1]
        # The nearest remainder-0 lattice point, then the simplex the point lies in (its rank).
        lower = torch.floor(elevated / (d + 1)) * (d + 1)
        upper = torch.ceil(elevated / (d + 1)) * (d + 1)
        rem0 = torch.where(upper - elevated < elevated - lower, upper, lower)
        coordinate_sum = (rem0.sum(1, keepdim=True) / (d + 1)).round().long()
        delta = elevated - rem0
        # rank[i]: the place of delta[i] in descending order, ties to the lower coordinate
        order = delta.sort(dim=1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(
            1, order, torch.arange(d + 1, device=device).expand(num_points, -1))
        rank = rank + coordinate_sum
        below, above = rank < 0, rank > d
        rank = rank + (d + 1) * below.long() - (d + 1) * above.long()
        rem0 = rem0 + (d + 1) * below.float() - (d + 1) * above.float()
        # Barycentric weights of the d + 1 vertices.
        share = (elevated - rem0) / (d + 1)
        barycentric = torch.zeros(num_points, d + 2, device=device)
        barycentric.scatter_add_(1, d - rank, share)
        barycentric.scatter_add_(1, d - rank + 1, -share)
        barycentric[:, 0] += 1.0 + barycentric[:, d + 1]
        packed, strides = _vertex_keys(rem0.round().long(), rank, groups)
        # One sort gives the vertices, which entries splat onto each, and each entry's vertex.
        ordered, order = packed.flatten().sort()
        self.vertices, counts = torch.unique_consecutive(ordered, return_counts=True)
        num_vertices = len(self.vertices)
        inverse = torch.empty_like(order)
        inverse[order] = torch.repeat_interleave(torch.arange(num_vertices, device=device), counts)
        flat_weights = barycentric[:, : d + 1].flatten()
        self.splat = _csr(_offsets(counts), order // (d + 1), flat_weights[order],
                          (num_vertices, num_points))
        self.slice = _csr(torch.arange(0, (d + 1) * num_points + 1, d + 1, device=device),
                          inverse, flat_weights, (num_points, num_vertices))
        # Blur along each axis j: neighbours key - 1 everywhere and key[j] + d, and the reverse.
        ones = strides[:d].sum()
        steps = torch.stack([ones - (d + 1) * strides[j] if j < d else ones
                             for j in range(d + 1)])
        vertices = self.vertices
        found = self._find(torch.cat([vertices[None] - steps[:, None],
                                      vertices[None] + steps[:, None]]))
        self.blurs = [_blur_matrix(down, up) for down, up in zip(found[: d + 1], found[d + 1:])]

    def _find(self, packed: Tensor) -> Tensor:
        """Index of each packed key among the lattice vertices; -1 where absent."""
        position = torch.searchsorted(self.vertices, packed).clamp_max(len(self.vertices) - 1)
        return torch.where(self.vertices[position] == packed, position, -1)

    def filter(self, values: Tensor) -> Tensor:
        """Gaussian-filtered ``values`` [N,V] (splat, blur, slice), float32."""
        lattice = self.splat @ values.float()
        for blur in self.blurs:
            lattice = blur @ lattice
        return (self.slice @ lattice) * self.alpha


def _blur_matrix(down: Tensor, up: Tensor) -> Tensor:
    """Sparse [M,M] matrix of ``x_i + (x_down + x_up) / 2`` for neighbour indices ``down`` and
    ``up`` [M] (-1 = absent, an entry of weight 0 on the diagonal)."""
    own = torch.arange(len(down), device=down.device)
    columns = torch.stack([torch.where(down < 0, own, down), own, torch.where(up < 0, own, up)], 1)
    values = torch.stack([(down >= 0).float() * 0.5, torch.ones_like(own, dtype=torch.float32),
                          (up >= 0).float() * 0.5], 1)
    return _csr(torch.arange(0, 3 * len(down) + 1, 3, device=down.device), columns.flatten(),
                values.flatten(), (len(down), len(down)))


def _offsets(counts: Tensor) -> Tensor:
    """CSR row offsets of rows with ``counts`` entries."""
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def _csr(offsets: Tensor, columns: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(offsets, columns, values, size)


def _elevate(scaled: Tensor) -> Tensor:
    """Points [N,d] (already scaled) on the hyperplane sum = 0 of R^{d+1} (Adams et al., p. 5).

    ``e_0 = sum_k s_k`` and ``e_j = sum_{k >= j} s_k - j s_{j-1}`` for j = 1..d (0-based s).
    """
    d = scaled.shape[1]
    suffix = scaled.flip(1).cumsum(1).flip(1)  # suffix[k] = sum_{m >= k} s_m
    after = torch.cat([suffix[:, 1:], suffix.new_zeros(len(scaled), 1)], 1)
    j = torch.arange(1, d + 1, device=scaled.device, dtype=scaled.dtype)
    return torch.cat([suffix[:, :1], after - j * scaled], 1)


def _vertex_keys(rem0: Tensor, rank: Tensor, groups: Tensor | None) -> tuple[Tensor, Tensor]:
    """The d + 1 vertices of every point's simplex as int64 keys [N,d+1], and the strides.

    Vertex r is ``rem0 + canonical[r, rank]`` on the first d coordinates, i.e. ``rem0 + r``
    minus ``d + 1`` on the coordinates of rank above ``d - r`` (Adams et al., p. 10); the d
    coordinates and the point's group are packed in mixed radix. Every vertex lies within
    d + 1 of ``rem0`` and its blur neighbours within another d + 1, which the radix leaves room
    for, so neighbour keys are found by adding to a packed key.
    """
    num_points, d = rem0.shape[0], rem0.shape[1] - 1
    low = rem0[:, :d].amin(0) - 2 * (d + 1)
    radix = [*(rem0[:, :d].amax(0) - low + 2 * (d + 1) + 1).tolist()]
    if groups is not None:
        groups = groups.long() - groups.min()
        radix.append(int(groups.max()) + 1)
    if sum(math.log2(r) for r in radix) >= 62:
        raise ValueError("the lattice keys do not fit in 64 bits: the features span too wide a "
                         "range for their widths (use larger kernel widths or smaller images)")
    strides = torch.tensor([math.prod(radix[:k]) for k in range(len(radix))], device=rem0.device)
    base = ((rem0[:, :d] - low) * strides[:d]).sum(1)
    if groups is not None:
        base = base + groups * strides[d]
    # by_rank[t]: the stride of the coordinate of rank t (coordinate d has none).
    by_rank = torch.zeros(num_points, d + 2, dtype=torch.long, device=rem0.device)
    by_rank.scatter_(1, rank[:, :d], strides[:d].expand(num_points, d))
    at_or_above = by_rank.flip(1).cumsum(1).flip(1)  # sum of strides of rank >= t; 0 at d + 1
    remainder = torch.arange(d + 1, device=rem0.device)
    return (base[:, None] + remainder * strides[:d].sum()
            - (d + 1) * at_or_above[:, d + 1 - remainder]), strides


