import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
from scipy.ndimage import distance_transform_edt

from attnmaps.conventions import min_max_normalize
from attnmaps.metrics.alignment import (
    AlignmentMetric,
    dilate,
    energy_pointing_game,
    pointing_game,
    relevance_rank_accuracy,
    roc_auc,
    thresholded_iou,
)

FUNCTIONS = (energy_pointing_game, pointing_game, thresholded_iou, roc_auc, relevance_rank_accuracy)


def square_mask(size: int = 8) -> torch.Tensor:
    mask = torch.zeros(1, size, size, dtype=torch.bool)
    mask[0, 5:7, 5:7] = True
    return mask


def random_case(seed: int = 0, batch: int = 4, levels: int = 4):
    """Maps with few distinct values (many ties) and random non-empty, non-full masks."""
    gen = torch.Generator().manual_seed(seed)
    maps = torch.randint(0, levels, (batch, 6, 7), generator=gen).float()
    masks = torch.rand(batch, 6, 7, generator=gen) < 0.4
    masks[:, 0, 0], masks[:, -1, -1] = True, False
    return maps, masks


def test_energy_pointing_game_all_and_half_the_mass():
    masks = square_mask()
    inside = masks.float() * 3.0
    assert energy_pointing_game(inside, masks).item() == 1.0
    half = inside.clone()
    half[0, 0, :3] = 4.0  # 12 outside, 4 * 3 = 12 inside
    assert energy_pointing_game(half, masks).item() == pytest.approx(0.5)
    negative_ignored = half.clone()
    negative_ignored[0, 1, 1] = -100.0
    assert energy_pointing_game(negative_ignored, masks).item() == pytest.approx(0.5)


def test_pointing_game_hand_grid_with_and_without_tolerance():
    masks = square_mask()  # nearest mask pixel to (1, 1) is (5, 5): distance sqrt(32) ~ 5.66
    maps = torch.zeros(1, 8, 8)
    maps[0, 1, 1] = 1.0
    assert pointing_game(maps, masks, tolerance=0).item() == 0.0
    assert pointing_game(maps, masks, tolerance=5).item() == 0.0
    assert pointing_game(maps, masks, tolerance=6).item() == 1.0
    maps[0, 6, 5] = 2.0
    assert pointing_game(maps, masks, tolerance=0).item() == 1.0
    maps[0, 0, 0] = 2.0  # a tie between a hit and a miss scores one half
    assert pointing_game(maps, masks, tolerance=0).item() == 0.5


def test_dilation_matches_distance_transform():
    gen = torch.Generator().manual_seed(1)
    masks = torch.rand(3, 9, 11, generator=gen) < 0.05
    masks[0, 4, 5] = True
    for radius in (0, 1, 2, 3, 20):
        for mask, dilated in zip(masks, dilate(masks, radius)):
            expected = distance_transform_edt(~mask.numpy()) <= radius
            assert np.array_equal(dilated.numpy(), expected), radius


def test_thresholded_iou_hand_example():
    maps = torch.arange(9.0).reshape(1, 3, 3) + 10  # normalized >= 0.5: values 14..18
    masks = torch.tensor([[[False, False, False], [True, False, False], [True, True, True]]])
    # prediction {(1,1),(1,2),(2,0),(2,1),(2,2)}, mask {(1,0),(2,0),(2,1),(2,2)}: 3 / 6
    assert thresholded_iou(maps, masks).item() == pytest.approx(0.5)
    assert thresholded_iou(maps, masks, threshold=0.9).item() == pytest.approx(1 / 4)


def brute_force_auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    pos, neg = scores[positive].tolist(), scores[~positive].tolist()
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_roc_auc_equals_pairwise_count_with_ties():
    maps, masks = random_case(levels=3)
    result = roc_auc(maps, masks)
    for index in range(maps.shape[0]):
        expected = brute_force_auc(maps[index].flatten(), masks[index].flatten())
        assert result[index].item() == pytest.approx(expected, abs=1e-12)


def test_roc_auc_hand_example_and_undefined_cases():
    maps = torch.tensor([[[0.1, 0.4, 0.35, 0.8]]])
    masks = torch.tensor([[[False, False, True, True]]])
    assert roc_auc(maps, masks).item() == pytest.approx(0.75)  # sklearn's documented example
    assert roc_auc(torch.ones(1, 2, 2), masks.view(1, 2, 2)).item() == 0.5
    full = torch.ones(1, 1, 4, dtype=torch.bool)
    assert math.isnan(roc_auc(maps, full).item())
    assert math.isnan(roc_auc(maps, ~full).item())


def test_relevance_rank_accuracy_hand_examples():
    masks = torch.tensor([[[True, False, True, False]]])
    assert relevance_rank_accuracy(torch.tensor([[[4.0, 3.0, 2.0, 1.0]]]), masks).item() == 0.5
    assert relevance_rank_accuracy(torch.tensor([[[4.0, 1.0, 3.0, 2.0]]]), masks).item() == 1.0
    # the top-2 places are shared by three tied pixels, two of them in the mask
    tied = torch.tensor([[[5.0, 5.0, 5.0, 1.0]]])
    assert relevance_rank_accuracy(tied, masks).item() == pytest.approx(2 / 3)
    assert relevance_rank_accuracy(torch.ones(1, 1, 4), masks).item() == 0.5


def test_empty_mask_is_nan_for_every_score():
    maps = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(2))
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[1, 2, 2] = True
    for function in FUNCTIONS:
        result = function(maps, masks)
        assert result.shape == (2,) and result.dtype == torch.float64
        assert math.isnan(result[0].item()) and not math.isnan(result[1].item()), function


def test_batch_equals_per_image():
    maps, masks = random_case(seed=3)
    for function in FUNCTIONS:
        batched = function(maps, masks)
        single = torch.cat([function(m[None], k[None]) for m, k in zip(maps, masks)])
        assert torch.equal(batched, single), function


def test_min_max_normalize_and_input_checks():
    assert min_max_normalize(torch.tensor([[[2.0, 4.0, 3.0]]])).tolist() == [[[0.0, 1.0, 0.5]]]
    with pytest.raises(ValueError, match="bool"):
        energy_pointing_game(torch.ones(1, 2, 2), torch.ones(1, 2, 2))
    with pytest.raises(ValueError, match=r"\[B,H,W\]"):
        roc_auc(torch.ones(2, 2), torch.ones(2, 2, dtype=torch.bool))


def test_metric_averages_defined_values_over_batches(tmp_path):
    maps, masks = random_case(seed=4)
    masks[1] = False  # undefined for every score
    metric = AlignmentMetric(tolerance=1)
    metric.update(maps[:3], masks[:3])
    metric.update(maps[3:], masks[3:])
    expected = metric.scores(maps, masks)
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        result = metric.compute()
        assert metric.compute() == pytest.approx(result, nan_ok=True)
    finally:
        dist.destroy_process_group()
    assert list(result) == list(AlignmentMetric.names)
    for name, row in zip(AlignmentMetric.names, expected):
        assert result[name] == pytest.approx(np.nanmean(row.numpy())), name
    metric.reset()
    assert all(math.isnan(value) for value in metric.compute().values())


def test_a_map_holding_nan_scores_nan_everywhere():
    """NaN relevance has no order: every score is NaN, not a number above 1 or a silent 0."""
    maps = torch.tensor([[[math.nan, 0.9, 0.3, 0.5, 0.2, 0.7]]])
    masks = torch.tensor([[[False, True, False, False, False, True]]])
    for score in (roc_auc, pointing_game, thresholded_iou, energy_pointing_game,
                  relevance_rank_accuracy):
        assert score(maps, masks).isnan().all(), score.__name__
