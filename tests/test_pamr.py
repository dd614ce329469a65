"""PAMR refinement: neighbour gathering, convex averaging, spreading within similar regions."""

from __future__ import annotations

import pytest
import torch

from attnmaps.pseudo.pamr import DILATIONS, neighbour_views, pamr, pixel_affinity


def test_neighbours_match_explicit_indexing_with_replicated_border() -> None:
    x = torch.arange(20.0).reshape(1, 1, 4, 5)
    near = list(neighbour_views(x, dilations=(1, 2)))
    assert len(near) == 16 and near[0].shape == (1, 1, 4, 5)
    offsets = [(dy, dx) for d in (1, 2) for dy in (-d, 0, d) for dx in (-d, 0, d) if dy or dx]
    for p, (dy, dx) in enumerate(offsets):
        for i in range(4):
            for j in range(5):
                ii, jj = min(max(i + dy, 0), 3), min(max(j + dx, 0), 4)
                assert near[p][0, 0, i, j] == x[0, 0, ii, jj]


def reference_pamr(images: torch.Tensor, maps: torch.Tensor, iterations: int,
                   dilations: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """PAMR as the paper writes it, by explicit (clamped) indexing: the affinity
    softmax_p(-mean_c |x_p - x| / (0.1 std_p(x_p))) over all neighbours p, and iterations of
    the affinity-weighted mean of the neighbours. Returns (affinity [B,P,H,W], refined maps)."""
    height, width = images.shape[-2:]
    rows, cols = torch.arange(height), torch.arange(width)
    offsets = [(dy, dx) for d in dilations for dy in (-d, 0, d) for dx in (-d, 0, d) if dy or dx]

    def gather(x: torch.Tensor) -> torch.Tensor:  # [B,C,H,W] -> [B,C,P,H,W]
        return torch.stack([x[..., (rows + dy).clamp(0, height - 1)[:, None],
                              (cols + dx).clamp(0, width - 1)[None, :]] for dy, dx in offsets],
                           dim=2)

    near = gather(images)
    distance = (near - images.unsqueeze(2)).abs() / (1e-8 + 0.1 * near.std(dim=2, keepdim=True))
    affinity = (-distance.mean(dim=1)).softmax(dim=1)
    for _ in range(iterations):
        maps = (gather(maps) * affinity.unsqueeze(1)).sum(dim=2)
    return affinity, maps


@pytest.mark.parametrize("dilations", [(1,), (1, 3), DILATIONS])
def test_pamr_equals_the_explicit_reference(dilations: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 13, 17, generator=gen)
    images[0, :, :5, :6] = 0.5  # a flat patch: zero spread among some neighbourhoods
    maps = torch.rand(2, 4, 13, 17, generator=gen)
    affinity, refined = reference_pamr(images, maps, 5, dilations)
    torch.testing.assert_close(pixel_affinity(images, dilations).squeeze(1), affinity)
    torch.testing.assert_close(pamr(images, maps, 5, dilations), refined)


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
