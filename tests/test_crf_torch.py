"""The torch dense CRF against a brute-force mean-field with exact N x N Gaussian kernels, the
lattice against exact Gaussian filtering, batching and label restriction, and (with the crf
extra installed) agreement with pydensecrf."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from attnmaps.pseudo.crf import crf_refine
from attnmaps.pseudo.crf_torch import (
    DEFAULT_PARAMS,
    CRFParams,
    _AppearanceKernel,
    _mean_field,
    dense_crf,
)
from attnmaps.pseudo.lattice import PermutohedralLattice

HEIGHT, WIDTH = 12, 14


def scene(seed: int = 0, labels: int = 3, height: int = HEIGHT, width: int = WIDTH
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Colors [1,H,W,3] of three noisy color blocks and noisy probabilities [1,L,H,W]."""
    gen = torch.Generator().manual_seed(seed)
    truth = torch.zeros(height, width, dtype=torch.long)
    truth[:, width // 2:] = 1
    truth[height // 2:, : width // 3] = 2
    palette = torch.tensor([[30.0, 60.0, 200.0], [200.0, 40.0, 40.0], [40.0, 200.0, 60.0]])
    colors = (palette[truth] + 15 * torch.randn(height, width, 3, generator=gen)).clamp(0, 255)
    probs = torch.nn.functional.one_hot(truth, labels).permute(2, 0, 1).float() * 0.4 + 0.3
    probs = (probs + 0.25 * torch.randn(probs.shape, generator=gen)).clamp(0.01, 1.0)
    return colors[None], probs[None]


def pixel_positions(height: int, width: int) -> torch.Tensor:
    """[H*W, 2] (x, y) of every pixel, row-major, float64."""
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float64),
                            torch.arange(width, dtype=torch.float64), indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], 1)


def appearance_features(colors: torch.Tensor, params: CRFParams) -> torch.Tensor:
    """[H*W, 2+C] appearance features of one image's pixels, row-major, float64."""
    _, height, width, channels = colors.shape
    return torch.cat([pixel_positions(height, width) / params.bilateral_sxy,
                      colors[0].reshape(-1, channels).double() / params.bilateral_srgb], 1)


def exact_kernel(features: torch.Tensor) -> torch.Tensor:
    """The N x N Gaussian kernel exp(-|f_i - f_j|^2 / 2)."""
    return torch.exp(-torch.cdist(features, features) ** 2 / 2)


def brute_force_crf(colors: torch.Tensor, probs: torch.Tensor, params: CRFParams) -> torch.Tensor:
    """Mean-field with the exact dense kernels: K = exp(-|f_i - f_j|^2 / 2) as an N x N matrix,
    symmetric normalization, Potts messages; one image, float64."""
    _, height, width, _ = colors.shape
    kernels = []
    for features, compat in ((pixel_positions(height, width) / params.gaussian_sxy,
                              params.gaussian_compat),
                             (appearance_features(colors, params), params.bilateral_compat)):
        k = exact_kernel(features)
        norm = k.sum(1).rsqrt()
        kernels.append(compat * norm[:, None] * k * norm[None, :])
    unary = -probs[0].double().clamp_min(1e-5).log().reshape(probs.shape[1], -1).T  # [N, L]
    q = (-unary).softmax(1)
    for _ in range(params.iterations):
        q = (sum(k @ q for k in kernels) - unary).softmax(1)
    return q.T.reshape(1, -1, height, width)


@pytest.mark.parametrize("labels", [2, 3, 5])
def test_smoothness_kernel_alone_equals_brute_force(labels):
    colors, probs = scene(labels=max(labels, 3))
    probs = probs[:, :labels]
    params = CRFParams(iterations=5, bilateral_compat=0.0)
    assert_close(dense_crf(colors, probs, params).double(), brute_force_crf(colors, probs, params),
                 atol=2e-3, rtol=0)


@pytest.mark.parametrize("downsample", [1, 2])
def test_full_crf_is_close_to_brute_force(downsample):
    colors, probs = scene()
    params = CRFParams(iterations=5, bilateral_sxy=6.0, bilateral_srgb=20.0,
                       bilateral_downsample=downsample)
    got, want = dense_crf(colors, probs, params).double(), brute_force_crf(colors, probs, params)
    assert (got - want).abs().max() < 0.1
    assert (got.argmax(1) == want.argmax(1)).double().mean() >= 0.97
    assert not torch.equal(want.argmax(1), probs.argmax(1))  # the CRF changed labels


def test_appearance_kernel_without_downsampling_is_the_lattice_of_the_pixels():
    colors, probs = scene(height=9, width=11)
    params = replace(DEFAULT_PARAMS, bilateral_downsample=1)
    want = PermutohedralLattice(appearance_features(colors, params).float()).filter(
        probs[0].reshape(3, -1).T)
    got = _AppearanceKernel(colors, params)(probs)
    assert torch.equal(got[0].reshape(3, -1).T, want)


@pytest.mark.parametrize("downsample", [2, 3])
def test_downsampled_appearance_kernel_approximates_the_exact_filter(downsample):
    # PSA's widths; 25 x 31 pixels: partial blocks at the right and bottom.
    colors, probs = scene(height=25, width=31)
    params = replace(DEFAULT_PARAMS, bilateral_downsample=downsample)
    kernel, exact = _AppearanceKernel(colors, params), exact_kernel(
        appearance_features(colors, params))
    # The normalized filter (the weighted mean of the values) in 0..1, as the CRF's
    # normalization removes the kernel's scale.
    got = (kernel(probs) / kernel(torch.ones(1, 1, 25, 31)))[0].reshape(3, -1).T.double()
    want = exact @ probs[0].reshape(3, -1).T.double() / exact.sum(1, keepdim=True)
    error = (got - want).abs()
    # For comparison, the exact lattice (downsample 1) itself: mean 0.004, max 0.08 here.
    assert error.mean() < 0.03 and error.max() < 0.35


@pytest.mark.parametrize("seed", range(3))
def test_downsampled_crf_labels_agree_with_the_exact_ones(seed):
    colors, probs = scene(seed, height=49, width=57)  # PSA's parameters
    exact = dense_crf(colors, probs, replace(DEFAULT_PARAMS, bilateral_downsample=1)).argmax(1)
    got = dense_crf(colors, probs).argmax(1)
    assert DEFAULT_PARAMS.bilateral_downsample == 2
    assert (got == exact).double().mean() >= 0.99
    assert (exact != probs.argmax(1)).double().mean() > 0.1  # the CRF changed labels


def test_lattice_approximates_the_exact_gaussian_filter():
    gen = torch.Generator().manual_seed(0)
    features = torch.rand(400, 3, generator=gen) * 4
    values = torch.rand(400, 2, generator=gen)
    got = PermutohedralLattice(features).filter(values).double()
    exact = torch.exp(-torch.cdist(features, features).double() ** 2 / 2) @ values.double()
    # Up to a global scale (removed by the CRF's normalization): a few per cent typically, at
    # most 15 % (the lattice's approximation error).
    deviation = ((got / exact) / (got / exact).mean() - 1).abs()
    assert deviation.mean() < 0.03 and deviation.max() < 0.15


def reference_lattice_filter(features: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Krähenbühl's permutohedral filter (``permutohedral.cpp`` of pydensecrf) transcribed loop
    by loop, a dict as its hash table, float64: splat, blur along axes 0..d, slice."""
    d = features.shape[1]
    scale = [math.sqrt(2 / 3) * (d + 1) / math.sqrt((i + 1) * (i + 2)) for i in range(d)]
    vertices: dict[tuple[int, ...], int] = {}
    entries = []  # (point, vertex, weight)
    for point, f in enumerate(features):
        elevated, total = [0.0] * (d + 1), 0.0
        for i in range(d, 0, -1):
            cf = f[i - 1] * scale[i - 1]
            elevated[i] = total - i * cf
            total += cf
        elevated[0] = total
        rem0 = []
        for e in elevated:
            up, down = math.ceil(e / (d + 1)) * (d + 1), math.floor(e / (d + 1)) * (d + 1)
            rem0.append(up if up - e < e - down else down)
        coordinate_sum = sum(rem0) // (d + 1)
        rank = [0] * (d + 1)
        for i in range(d):
            for j in range(i + 1, d + 1):
                if elevated[i] - rem0[i] < elevated[j] - rem0[j]:
                    rank[i] += 1
                else:
                    rank[j] += 1
        for i in range(d + 1):
            rank[i] += coordinate_sum
            if rank[i] < 0:
                rank[i], rem0[i] = rank[i] + d + 1, rem0[i] + d + 1
            elif rank[i] > d:
                rank[i], rem0[i] = rank[i] - d - 1, rem0[i] - d - 1
        barycentric = [0.0] * (d + 2)
        for i in range(d + 1):
            v = (elevated[i] - rem0[i]) / (d + 1)
            barycentric[d - rank[i]] += v
            barycentric[d - rank[i] + 1] -= v
        barycentric[0] += 1.0 + barycentric[d + 1]
        for r in range(d + 1):
            key = tuple(rem0[i] + (r if rank[i] <= d - r else r - d - 1) for i in range(d))
            entries.append((point, vertices.setdefault(key, len(vertices)), barycentric[r]))
    lattice = np.zeros((len(vertices) + 1, values.shape[1]))  # last row: absent neighbours
    for point, vertex, weight in entries:
        lattice[vertex] += weight * values[point]
    for j in range(d + 1):
        blurred = lattice.copy()
        for key, vertex in vertices.items():
            down = tuple(k + d if i == j else k - 1 for i, k in enumerate(key))
            up = tuple(k - d if i == j else k + 1 for i, k in enumerate(key))
            blurred[vertex] += 0.5 * (lattice[vertices.get(down, -1)] + lattice[vertices.get(up, -1)])
        lattice = blurred
    out = np.zeros_like(values, dtype=np.float64)
    for point, vertex, weight in entries:
        out[point] += weight * lattice[vertex]
    return out / (1 + 2.0**-d)


@pytest.mark.parametrize("d", [1, 2, 3, 5])
def test_lattice_equals_the_reference_lattice(d):
    gen = torch.Generator().manual_seed(d)
    features = torch.rand(60, d, generator=gen) * 3
    values = torch.rand(60, 2, generator=gen)
    want = reference_lattice_filter(features.double().numpy(), values.double().numpy())
    got = PermutohedralLattice(features).filter(values).double().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_lattice_groups_filter_each_group_alone():
    gen = torch.Generator().manual_seed(0)
    features, values = torch.rand(80, 5, generator=gen) * 3, torch.rand(80, 2, generator=gen)
    groups = torch.arange(80) % 2
    got = PermutohedralLattice(features, groups).filter(values)
    for group in (0, 1):
        alone = PermutohedralLattice(features[groups == group]).filter(values[groups == group])
        assert_close(got[groups == group], alone, atol=1e-5, rtol=1e-5)


def test_groups_keep_images_apart():
    colors, probs = scene(0)
    colors2, probs2 = scene(1)
    unary = -torch.cat([probs, probs2]).clamp_min(1e-5).log()
    # A batch at once (as on CUDA) and image by image (as dense_crf on CPU) agree.
    batched = _mean_field(torch.cat([colors, colors2]), unary, DEFAULT_PARAMS)
    assert_close(batched[:1], dense_crf(colors, probs), atol=1e-5, rtol=0)
    assert_close(batched[1:], dense_crf(colors2, probs2), atol=1e-5, rtol=0)


def test_one_label_is_certain():
    colors, probs = scene()
    assert torch.equal(dense_crf(colors, probs[:, :1]), torch.ones_like(probs[:, :1]))


def test_labels_not_allowed_equal_a_crf_without_them():
    colors, probs = scene(labels=3)
    allowed = torch.tensor([[True, False, True]])
    restricted = dense_crf(colors, probs[:, [0, 2]])
    got = dense_crf(colors, probs, allowed=allowed)
    assert torch.equal(got[:, 1], torch.zeros_like(got[:, 1]))
    assert_close(got[:, [0, 2]], restricted, atol=1e-5, rtol=0)


def test_bad_inputs_name_what_is_wrong():
    colors, probs = scene()
    with pytest.raises(ValueError, match="colors must be"):
        dense_crf(colors[0], probs)
    with pytest.raises(ValueError, match="at least one label"):
        dense_crf(colors, probs, allowed=torch.zeros(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="pseudo.crf_iterations"):
        CRFParams(iterations=-1)
    with pytest.raises(ValueError, match="pseudo.crf_bilateral_downsample"):
        CRFParams(bilateral_downsample=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_cpu():
    colors, probs = scene()
    assert_close(dense_crf(colors.cuda(), probs.cuda()).cpu(), dense_crf(colors, probs),
                 atol=1e-4, rtol=0)


def test_matches_pydensecrf_with_the_same_parameters():
    pytest.importorskip("pydensecrf.densecrf", reason="needs the crf extra (pydensecrf2)")
    for seed in range(3):
        colors, probs = scene(seed)
        want = crf_refine(colors[0].numpy().astype(np.uint8), probs[0].double().numpy())
        got = dense_crf(colors.round(), probs).argmax(1)[0].numpy()
        assert (got == want).mean() >= 0.97
