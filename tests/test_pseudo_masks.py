import numpy as np
import pytest
import torch
from PIL import Image

from attnmaps.pseudo_masks import (
    fill_unassigned,
    make_pseudo_masks,
    merge_masks,
    normalize_maps,
    save_pseudo_masks,
    select_classes,
    upsample_maps,
)


def reference_fill(grid: list[list[int]], num_labels: int, max_iters: int | None = None):
    """Loop implementation of the synchronous 3x3 majority fill, for one image."""
    height, width = len(grid), len(grid[0])
    current = [row[:] for row in grid]
    iteration = 0
    while max_iters is None or iteration < max_iters:
        updated = [row[:] for row in current]
        changed = False
        for y in range(height):
            for x in range(width):
                if current[y][x] != -1:
                    continue
                counts = [0] * num_labels
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        ny, nx = y + dy, x + dx
                        if 0 <= ny < height and 0 <= nx < width and current[ny][nx] != -1:
                            counts[current[ny][nx]] += 1
                if max(counts) > 0:
                    updated[y][x] = counts.index(max(counts))
                    changed = True
        if not changed:
            break
        current = updated
        iteration += 1
    return [[max(value, 0) for value in row] for row in current]


def test_normalize_maps_min_max_and_constant():
    maps = torch.tensor([[[[2.0, 4.0], [6.0, 10.0]], [[3.0, 3.0], [3.0, 3.0]]]])
    out = normalize_maps(maps)
    torch.testing.assert_close(out[0, 0], torch.tensor([[0.0, 0.25], [0.5, 1.0]]))
    torch.testing.assert_close(out[0, 1], torch.zeros(2, 2))


def test_upsample_maps_bilinear_half_pixel():
    maps = torch.tensor([[[[0.0, 1.0]]]])
    out = upsample_maps(maps, (1, 4))
    torch.testing.assert_close(out, torch.tensor([[[[0.0, 0.25, 0.75, 1.0]]]]))
    assert upsample_maps(maps, (1, 2)) is maps


@pytest.mark.parametrize("probs, winner", [([0.9, 0.4], 0), ([0.4, 0.9], 1), ([0.6, 0.6], 0)])
def test_merge_highest_probability_wins_overlap(probs, winner):
    maps = torch.zeros(1, 2, 1, 3)
    maps[0, 0, 0, :2] = 1.0
    maps[0, 1, 0, 1:] = 1.0
    out = merge_masks(maps, torch.tensor([probs]), torch.ones(1, 2, dtype=torch.bool), 0.5, False)
    assert out.tolist() == [[[0, winner, 1]]]


def test_merge_threshold_boundary_and_selection():
    maps = torch.tensor([[[[0.5, 0.4999, 0.75]], [[1.0, 1.0, 1.0]]]])
    probs = torch.tensor([[0.9, 0.95]])
    selected = torch.tensor([[True, False]])
    out = merge_masks(maps, probs, selected, 0.5, has_background=True)
    assert out.tolist() == [[[1, 0, 1]]]


def test_merge_background_vs_no_background_labels():
    maps = torch.tensor([[[[1.0, 0.0, 0.0]], [[0.0, 0.0, 1.0]]]])
    probs = torch.tensor([[0.9, 0.8]])
    selected = torch.ones(1, 2, dtype=torch.bool)
    assert merge_masks(maps, probs, selected, 0.3, True).tolist() == [[[1, 0, 2]]]
    assert merge_masks(maps, probs, selected, 0.3, False).tolist() == [[[0, -1, 1]]]


def test_merge_rejects_mismatched_probs():
    with pytest.raises(ValueError, match="probs"):
        merge_masks(torch.zeros(1, 2, 2, 2), torch.zeros(1, 3), torch.ones(1, 2), 0.3, True)


def test_fill_hand_made_grid():
    labels = torch.tensor(
        [
            [
                [0, 0, -1, 2],
                [0, -1, -1, 2],
                [1, 1, -1, -1],
            ]
        ]
    )
    # One synchronous pass fills everything (counts over assigned 3x3 neighbours):
    #   (0,2): 0 x1, 2 x2 -> 2        (1,1): 0 x3, 1 x2 -> 0
    #   (1,2): 0 x1, 1 x1, 2 x2 -> 2  (2,2): 1 x1, 2 x1 -> tie -> lowest label 1
    #   (2,3): 2 x1 -> 2
    expected = [
        [
            [0, 0, 2, 2],
            [0, 0, 2, 2],
            [1, 1, 1, 2],
        ]
    ]
    assert fill_unassigned(labels, num_labels=3).tolist() == expected


def test_fill_all_unassigned_image_gets_zero_and_max_iters():
    labels = torch.full((2, 3, 5), -1)
    labels[1, 0, 0] = 2
    out = fill_unassigned(labels, num_labels=3)
    assert out[0].eq(0).all()
    assert out[1].eq(2).all()
    capped = fill_unassigned(labels, num_labels=3, max_iters=1)
    assert capped[1].tolist() == [[2, 2, 0, 0, 0], [2, 2, 0, 0, 0], [0, 0, 0, 0, 0]]


@pytest.mark.parametrize("seed", range(6))
def test_fill_matches_brute_force(seed):
    generator = torch.Generator().manual_seed(seed)
    num_labels = 4
    labels = torch.randint(0, num_labels, (3, 6, 7), generator=generator)
    unassigned_rate = [0.3, 0.7, 0.95][seed % 3]
    labels[torch.rand(labels.shape, generator=generator) < unassigned_rate] = -1
    labels[2] = -1 if seed % 2 else labels[2]
    max_iters = 2 if seed == 5 else None
    out = fill_unassigned(labels, num_labels, max_iters=max_iters)
    expected = [reference_fill(grid, num_labels, max_iters) for grid in labels.tolist()]
    assert out.tolist() == expected


def test_fill_many_labels():
    labels = torch.full((1, 4, 4), -1)
    labels[0, 0, 0] = 149
    labels[0, 3, 3] = 3
    out = fill_unassigned(labels, num_labels=150)
    expected = reference_fill(labels[0].tolist(), 150)
    assert out[0].tolist() == expected


def test_fill_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match="num_labels=3"):
        fill_unassigned(torch.tensor([[[0, 3]]]), num_labels=3)


def test_select_from_labels_probs_and_fallback():
    probs = torch.tensor([[0.6, 0.2, 0.7], [0.1, 0.4, 0.3]])
    assert select_classes(probs).tolist() == [[True, False, True], [False, True, False]]
    labels = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert select_classes(probs, labels).tolist() == [[False, True, False], [False, True, False]]
    assert select_classes(probs, prob_threshold=0.65).tolist() == [
        [False, False, True],
        [False, True, False],
    ]


def full_res_example():
    maps = torch.zeros(1, 3, 2, 3)
    maps[0, 0] = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    maps[0, 1] = torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    maps[0, 2] = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    return maps


def test_make_pseudo_masks_full_resolution_maps():
    maps = full_res_example()
    probs = torch.tensor([[0.6, 0.8, 0.1]])
    with_bg = make_pseudo_masks(maps, probs, (2, 3), has_background=True)
    assert with_bg.tolist() == [[[1, 2, 2], [0, 0, 0]]]
    labels = torch.tensor([[1.0, 0.0, 1.0]])
    seeds = make_pseudo_masks(maps, probs, (2, 3), has_background=True, labels=labels)
    assert seeds.tolist() == [[[1, 1, 0], [0, 0, 3]]]
    no_bg = make_pseudo_masks(maps, probs, (2, 3), has_background=False)
    # Row 0 is [0, 1, 1]; row 1 is unassigned: (1,0) sees 0,1 -> 0; (1,1), (1,2) see 1s.
    assert no_bg.tolist() == [[[0, 1, 1], [0, 1, 1]]]


def test_make_pseudo_masks_fallback_to_argmax():
    maps = full_res_example()
    probs = torch.tensor([[0.1, 0.2, 0.3]])
    out = make_pseudo_masks(maps, probs, (2, 3), has_background=True)
    assert out.tolist() == [[[0, 0, 0], [0, 0, 3]]]


@pytest.mark.parametrize("has_background", [True, False])
def test_batched_equals_per_image(has_background):
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(4, 5, 3, 4, generator=generator)
    probs = torch.rand(4, 5, generator=generator)
    batched = make_pseudo_masks(maps, probs, (12, 16), has_background=has_background)
    assert batched.shape == (4, 12, 16)
    for index in range(4):
        single = make_pseudo_masks(
            maps[index : index + 1],
            probs[index : index + 1],
            (12, 16),
            has_background=has_background,
        )
        assert torch.equal(batched[index], single[0])


def test_save_round_trip(tmp_path):
    pytest.importorskip("attnmaps.data.image_io")
    masks = torch.tensor([[[0, 1], [20, 255]], [[3, 3], [0, 1]]])
    paths = save_pseudo_masks(tmp_path / "out", ["a", "b_1"], masks)
    assert [path.name for path in paths] == ["a.png", "b_1.png"]
    for path, mask in zip(paths, masks):
        np.testing.assert_array_equal(np.array(Image.open(path)), mask.numpy().astype(np.uint8))


def test_save_rejects_unfilled_masks(tmp_path):
    pytest.importorskip("attnmaps.data.image_io")
    with pytest.raises(ValueError, match="0, 255"):
        save_pseudo_masks(tmp_path, ["a"], torch.tensor([[[0, -1]]]))
    with pytest.raises(ValueError, match="2 ids"):
        save_pseudo_masks(tmp_path, ["a", "b"], torch.zeros(1, 2, 2, dtype=torch.long))
