"""PAMR refinement: neighbour gathering, convex averaging, spreading within similar regions."""

from __future__ import annotations

import pytest
import torch

from attnmaps.pseudo.pamr import neighbours, pamr


def test_neighbours_match_explicit_indexing_with_replicated_border() -> None:
    x = torch.arange(20.0).reshape(1, 1, 4, 5)
    near = neighbours(x, dilations=(1,))
    assert near.shape == (1, 1, 8, 4, 5)
    offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
    for p, (dy, dx) in enumerate(offsets):
        for i in range(4):
            for j in range(5):
                ii, jj = min(max(i + dy, 0), 3), min(max(j + dx, 0), 4)
                assert near[0, 0, p, i, j] == x[0, 0, ii, jj]


def test_constant_map_stays_constant() -> None:
    torch.manual_seed(0)
    maps = torch.full((2, 3, 12, 12), 0.7)
    out = pamr(torch.rand(2, 3, 12, 12), maps, iterations=5)
    torch.testing.assert_close(out, maps)


def test_peak_spreads_within_its_region_not_across_an_edge() -> None:
    image = torch.zeros(1, 3, 16, 16)
    image[..., 8:] = 1.0  # left half dark, right half bright
    image += 0.01 * torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    maps = torch.zeros(1, 1, 16, 16)
    maps[0, 0, 8, 2] = 1.0
    out = pamr(image, maps, iterations=10)[0, 0]
    assert out[:, :8].sum() > 20 * out[:, 8:].sum()
    assert out[2, 6] > 0.01 * out.max()  # reached the far corner of its own region


def test_mismatched_sizes_are_reported() -> None:
    with pytest.raises(ValueError, match="height x width"):
        pamr(torch.rand(1, 3, 8, 8), torch.rand(1, 2, 4, 4))


def test_selected_maps_are_refined_as_in_the_full_pass_and_the_rest_kept() -> None:
    gen = torch.Generator().manual_seed(3)
    images, maps = torch.rand(3, 3, 16, 16, generator=gen), torch.rand(3, 5, 16, 16, generator=gen)
    selected = torch.zeros(3, 5, dtype=torch.bool)
    selected[0, [1, 4]] = True
    selected[1, 0] = True
    selected[2, [0, 2, 3]] = True
    out = pamr(images, maps, iterations=4, selected=selected)
    full = pamr(images, maps, iterations=4)
    torch.testing.assert_close(out[selected], full[selected])
    torch.testing.assert_close(out[~selected], maps[~selected])


def test_selection_of_the_wrong_shape_is_reported() -> None:
    with pytest.raises(ValueError, match=r"selected \(2, 3\) must be \[B,K\] = \(1, 2\)"):
        pamr(torch.rand(1, 3, 8, 8), torch.rand(1, 2, 8, 8), selected=torch.ones(2, 3, dtype=torch.bool))
