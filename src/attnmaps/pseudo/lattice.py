"""Permutohedral-lattice Gaussian filtering in plain torch (Adams, Baek & Davis, 2010).

``PermutohedralLattice(features).filter(values)`` approximates ``out_i = sum_j
exp(-|f_i - f_j|^2 / 2) v_j`` for N points with d-dimensional features in O(N d^2): every point
is splatted onto the d + 1 vertices of its enclosing simplex with barycentric weights, the
lattice is blurred with ``[1/2, 1, 1/2]`` along each of its d + 1 axes, and the result is sliced
back with the same weights. The construction follows, step for step, the lattice of Krähenbühl's
dense CRF (the one ``pydensecrf`` builds), so both filter the same way; here every step is a
tensor operation on the features' device, coordinates in rows: one sort of the vertex keys
packed in int32 (int64 where they do not fit) instead of a hash table, one ``searchsorted``
for the blur neighbours along all axes, splat and slice as sparse (CSR) matrix products, the
blur as row gathers. The lattice is built once and filters any number of value channels.

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

    def __init__(self, features: Tensor, groups: Tensor | None = None) -> None:
        if features.dim() != 2 or features.shape[1] < 1:
            raise ValueError(f"features must be [N,d] with d >= 1, got {tuple(features.shape)}")
        num_points, d = features.shape
        device = features.device
        # Coordinates first: [d+1, N], so every per-coordinate step reads contiguous memory.
        scaled = (features.float() @ (elevation_matrix(d, device) / (d + 1))).T.contiguous()
        # The nearest remainder-0 lattice point (d + 1) * nearest (ties to the lower one).
        nearest = (scaled - 0.5).ceil()
        share = scaled - nearest  # (elevated - remainder-0 point) / (d + 1)
        # The simplex the point lies in: the rank of each coordinate of ``share`` (descending,
        # ties to the lower coordinate) plus the coordinate sum of ``nearest``, wrapped into
        # 0..d by moving ``nearest`` by one along the wrapped coordinates.
        shifted = _descending_rank(share) + nearest.sum(0).int()
        wrap = shifted.div(d + 1, rounding_mode="floor")
        rank = (shifted - (d + 1) * wrap).long()
        base = nearest.int() - wrap
        share += wrap
        order = torch.empty_like(rank).scatter_(  # order[t]: the coordinate of rank t
            0, rank, torch.arange(d + 1, device=device)[:, None].expand(-1, num_points))
        # Barycentric weight of vertex r: share of rank d - r minus share of rank d - r + 1.
        by_rank = share.gather(0, order).flip(0)
        weights = by_rank - by_rank.roll(1, 0)
        weights[0] += 1.0
        keys, strides, remainder_place = _vertex_keys(base, order, groups)
        # Entry i * (d + 1) + r: vertex r of point i. One sort gives the vertices, the entries
        # that splat onto each (in point order: a stable sort, so sums are reproducible) and,
        # inverted, each entry's vertex.
        ordered, entries = keys.T.flatten().sort(stable=True)
        self.vertices, inverse, counts = torch.unique_consecutive(
            ordered, return_inverse=True, return_counts=True)
        num_vertices = len(self.vertices)
        # Sparse indices in int32 where they fit: the products then take them without a copy.
        index = torch.int32 if len(entries) < 2**31 else torch.int64
        weights = weights.T.flatten()
        columns = torch.empty(len(entries), dtype=index, device=device).scatter_(
            0, entries, inverse.to(index))
        # Slicing also scales: by Krähenbühl's 1 / (1 + 2^-d), and by 1/2 per blurred axis.
        scale = 1.0 / ((1.0 + 2.0**-d) * 2.0 ** (d + 1))
        self.slice = csr_matrix(
            torch.arange(0, len(entries) + 1, d + 1, dtype=index, device=device), columns,
            weights * scale, (num_points, num_vertices + 1))
        self.splat = csr_matrix(_offsets(counts).to(index), entries.to(index) // (d + 1),
                                weights.index_select(0, entries), (num_vertices + 1, num_points))
        # Blur along axis j: the neighbour one step down (every coordinate - 1, coordinate j
        # + d) is found by its key; the one step up is the vertex whose down neighbour it is.
        # Absent neighbours are M, a zero row below the lattice's M values (a spare column
        # M + 1 of ``up`` takes the writes for absent ones).
        down = self._find(self.vertices + _down_steps(self.vertices, strides,
                                                      remainder_place))
        up = torch.full((d + 1, num_vertices + 2), num_vertices, device=device)
        up.scatter_(1, down + (down == num_vertices).long(),
                    torch.arange(num_vertices, device=device).expand(d + 1, -1))
        self.up = up[:, : num_vertices + 1]
        self.down = torch.cat([down, down.new_full((d + 1, 1), num_vertices)], 1)

    def _find(self, packed: Tensor) -> Tensor:
        """Index of each packed key among the lattice vertices; M (their count) where absent."""
        position = torch.searchsorted(self.vertices, packed).clamp_max(len(self.vertices) - 1)
        found = self.vertices.index_select(0, position.flatten()).view_as(packed) == packed
        return torch.where(found, position, len(self.vertices))

    def filter(self, values: Tensor) -> Tensor:
        """Gaussian-filtered ``values`` [N,V] (splat, blur, slice), float32."""
        lattice = self.splat @ values.float()  # row M: zero, the absent neighbours' value
        for down, up in zip(self.down, self.up):  # [1, 2, 1]: the 1/2 of each axis is in slice
            lattice = lattice.index_select(0, down).add_(lattice.index_select(0, up)).add_(
                lattice, alpha=2.0)
        return self.slice @ lattice


def elevation_matrix(d: int, device: torch.device | str = "cpu") -> Tensor:
    """[d, d+1] matrix taking features to the hyperplane sum = 0 of R^{d+1}, scaled so the
    lattice's blur is a unit Gaussian (Adams et al., p. 5): with ``s_k = f_k * scale_k``,
    ``e_0 = sum_k s_k`` and ``e_j = sum_{k >= j} s_k - j s_{j-1}`` for j = 1..d (0-based s)."""
    k = torch.arange(1, d + 1, dtype=torch.float64)
    scale = math.sqrt(2.0 / 3.0) * (d + 1) / torch.sqrt(k * (k + 1))
    row, column = torch.arange(d)[:, None], torch.arange(d + 1)[None, :]
    matrix = (row >= column).double()
    matrix[column[0, 1:] - 1, column[0, 1:]] = -k
    return (matrix * scale[:, None]).float().to(device)


def _descending_rank(values: Tensor) -> Tensor:
    """Rank (uint8) of every row of ``values`` [d+1,N] within its column, descending, ties to
    the lower row: the pairwise comparisons of Krähenbühl's code (faster than a sort for small
    d; the keys of more than 30 dimensions would not fit in 64 bits anyway)."""
    rank = torch.zeros(values.shape, dtype=torch.uint8, device=values.device)
    for i in range(len(values)):
        for j in range(i + 1, len(values)):
            lower = values[i] < values[j]
            rank[i] += lower
            rank[j] += ~lower
    return rank


def _vertex_keys(base: Tensor, order: Tensor, groups: Tensor | None
                 ) -> tuple[Tensor, Tensor, int]:
    """The d + 1 vertices of every point's simplex as packed keys [d+1,N], the strides [d+1]
    of the first d coordinates' q (0 for coordinate d) and the place of the remainder.

    Vertex r has remainder r: its coordinates are ``(d + 1) * q + r`` with ``q = base`` minus
    one on the coordinates of rank above ``d - r`` (Adams et al., p. 10). A key packs the q of
    the first d coordinates, the group and r in mixed radix, r highest (so the vertices of
    one remainder are a run of the sorted keys); q has a margin of 2 below and 1 above, which
    holds every vertex's blur neighbours. Keys are int32 where the radix product allows (a
    faster sort), else int64.
    """
    d = base.shape[0] - 1
    low = base[:d].amin(1) - 2
    radix = (base[:d].amax(1) - low + 2).tolist()
    if groups is not None:
        groups = groups.long() - groups.min()
        radix.append(int(groups.max()) + 1)
    radix.append(d + 1)
    if sum(math.log2(r) for r in radix) >= 62:
        raise ValueError("the lattice keys do not fit in 64 bits: the features span too wide a "
                         "range for their widths (use larger kernel widths or smaller images)")
    dtype = torch.int32 if math.prod(radix) < 2**31 else torch.int64
    place = [math.prod(radix[:k]) for k in range(len(radix))]
    strides = torch.tensor([*place[:d], 0], dtype=dtype, device=base.device)
    packed = ((base[:d] - low[:, None]).to(dtype) * strides[:d, None]).sum(0, dtype=dtype)
    if groups is not None:
        packed += groups.to(dtype) * place[d]
    keys = packed + torch.arange(0, (d + 1) * place[-1], place[-1], dtype=dtype,
                                 device=base.device)[:, None]
    # Vertex r: minus the strides of the coordinates of rank above d - r, summed.
    keys[1:] -= strides.gather(0, order[1:].flatten()).view(d, -1).flip(0).cumsum(
        0, dtype=dtype)
    return keys, strides, place[-1]


def _down_steps(vertices: Tensor, strides: Tensor, remainder_place: int) -> Tensor:
    """[d+1, M]: added to the keys of ``vertices``, the key of the neighbour one step down
    along each axis j (every coordinate - 1, coordinate j + d): remainder r becomes r - 1 mod
    d + 1, which keeps q but q_j + 1, except from r = 0 to d, where every q but q_j drops by
    one."""
    d = len(strides) - 1
    from_zero = d * remainder_place - strides.sum() + strides
    from_other = strides - remainder_place
    return torch.where(vertices[None] < remainder_place, from_zero[:, None],
                       from_other[:, None]).to(vertices.dtype)


def _offsets(counts: Tensor) -> Tensor:
    """CSR row offsets of rows with ``counts`` entries, then of one empty row."""
    ends = counts.cumsum(0)
    return torch.cat([ends.new_zeros(1), ends, ends[-1:]])


def csr_matrix(offsets: Tensor, columns: Tensor, values: Tensor, size: tuple[int, int]
               ) -> Tensor:
    """A sparse CSR matrix (without the beta warning)."""
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(offsets, columns, values, size)
