import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from attnmaps.config import PseudoMaskConfig
from attnmaps.conventions import min_max_normalize
from attnmaps.engine.evaluate import PseudoMaskEvaluator
from attnmaps.pseudo.masks import (
    fill_unassigned,
    make_pseudo_masks,
    merge_masks,
    save_pseudo_masks,
    select_classes,
    selected_indices,
    upsample_maps,
)


def nearest_fill(labels: torch.Tensor) -> torch.Tensor:
    """Brute force, one image [H,W]: every -1 pixel takes the label of the assigned pixel at the
    smallest city-block distance, the smallest label among equally near ones; none: 0."""
    rows, cols = torch.meshgrid(
        torch.arange(labels.shape[0]), torch.arange(labels.shape[1]), indexing="ij"
    )
    assigned = labels >= 0
    if not assigned.any():
        return torch.zeros_like(labels)
    seeds = torch.stack([rows[assigned], cols[assigned]], 1)
    pixels = torch.stack([rows.flatten(), cols.flatten()], 1)
    dist = (pixels[:, None] - seeds[None]).abs().sum(-1)
    nearest = dist == dist.min(1, keepdim=True).values
    seed_labels = labels[assigned].expand_as(dist)
    best = torch.where(nearest, seed_labels, labels.max() + 1).min(1).values
    return best.view_as(labels)


def test_min_max_normalize_min_max_and_constant():
    maps = torch.tensor([[[[2.0, 4.0], [6.0, 10.0]], [[3.0, 3.0], [3.0, 3.0]]]])
    out = min_max_normalize(maps)
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


def test_merge_by_map_gives_each_pixel_its_highest_claimed_map():
    maps = torch.tensor([[[[0.9, 0.6, 0.2, 0.7]], [[0.5, 0.8, 0.9, 0.7]], [[1.0, 1.0, 1.0, 1.0]]]])
    probs = torch.tensor([[0.3, 0.2, 0.99]])  # class 2 most probable but not selected
    selected = torch.tensor([[True, True, False]])
    out = merge_masks(maps, probs, selected, 0.55, has_background=True, rule="map")
    # pixel 2: class 0 below the threshold -> class 1; pixel 3: a tie -> the lower index
    assert out.tolist() == [[[1, 2, 2, 1]]]
    by_probability = merge_masks(maps, probs, selected, 0.55, has_background=True)
    assert by_probability.tolist() == [[[1, 1, 2, 1]]]


def test_the_three_merge_rules_on_a_hand_example():
    maps = torch.tensor([[[[0.5, 0.8]], [[1.0, 1.0]]]])
    probs, selected = torch.tensor([[0.9, 0.6]]), torch.ones(1, 2, dtype=torch.bool)
    expected = {"probability": [1, 1], "map": [2, 2],
                "weighted": [2, 1]}  # 0.45 < 0.6, then 0.72 > 0.6
    for rule, labels in expected.items():
        assert merge_masks(maps, probs, selected, 0.4, True, rule=rule).tolist() == [[labels]]


@pytest.mark.parametrize("rule", ["map", "weighted"])
def test_merge_by_map_equals_a_per_pixel_loop(rule):
    torch.manual_seed(0)
    maps, probs = torch.rand(3, 4, 5, 6), torch.rand(3, 4)
    selected = torch.rand(3, 4) < 0.6
    out = merge_masks(maps, probs, selected, 0.4, has_background=True, rule=rule)
    for b in range(3):
        for i in range(5):
            for j in range(6):
                weight = [probs[b, c].item() if rule == "weighted" else 1.0 for c in range(4)]
                claims = [(maps[b, c, i, j].item() * weight[c], -c) for c in range(4)
                          if selected[b, c] and maps[b, c, i, j] >= 0.4]
                assert out[b, i, j] == (1 - max(claims)[1] if claims else 0)


def test_merge_ranks_low_precision_maps_in_float32():
    maps = torch.tensor([[[[0.5004]], [[0.5]]]], dtype=torch.bfloat16)  # both round to 0.5
    probs = torch.tensor([[0.5, 0.5002]])
    out = merge_masks(maps, probs, torch.ones(1, 2, dtype=torch.bool), 0.4, True, rule="weighted")
    assert out.item() == 2  # equal bf16 maps: the higher probability decides, no bf16 tie


def test_merge_rejects_an_unknown_rule():
    with pytest.raises(ValueError, match="pseudo.merge"):
        merge_masks(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2), torch.ones(1, 2), 0.3, True,
                    rule="order")


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
    # Nearest assigned pixel in city-block distance, ties to the smaller label:
    #   (0,2): 0 and 2 at 1 -> 0      (1,1): 0, 0 and 1 at 1 -> 0
    #   (1,2): 2 at 1 -> 2            (2,2): 1 at 1, 2 at 2 -> 1     (2,3): 2 at 1 -> 2
    expected = [
        [
            [0, 0, 0, 2],
            [0, 0, 2, 2],
            [1, 1, 1, 2],
        ]
    ]
    assert fill_unassigned(labels, num_labels=3).tolist() == expected


def test_fill_far_seeds_and_empty_image():
    labels = torch.full((2, 5, 9), -1)
    labels[1, 0, 0], labels[1, 4, 8], labels[1, 0, 8] = 2, 1, 4
    out = fill_unassigned(labels, num_labels=5)
    assert out[0].eq(0).all()  # nothing assigned at all
    # (4,0) is 4 from 2 and 8 from 1 and 4; (2,4) is 6 from 2, 6 from 1 and 6 from 4 -> 1
    assert out[1, 4, 0] == 2 and out[1, 2, 4] == 1 and out[1, 0, 5] == 4
    assert torch.equal(out[1], nearest_fill(labels[1]))


@pytest.mark.parametrize("seed", range(12))
def test_fill_matches_brute_force(seed):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(3, 6, 7), (2, 1, 13), (2, 11, 1), (4, 9, 5)]
    num_labels = [2, 4, 150][seed % 3]
    labels = torch.randint(0, num_labels, shapes[seed % 4], generator=generator)
    unassigned_rate = [0.3, 0.7, 0.95, 0.995][seed % 4]
    labels[torch.rand(labels.shape, generator=generator) < unassigned_rate] = -1
    if seed % 2:
        labels[-1] = -1
    out = fill_unassigned(labels, num_labels)
    assert torch.equal(out, torch.stack([nearest_fill(image) for image in labels]))


def test_fill_images_are_independent():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (4, 8, 8), generator=generator)
    labels[torch.rand(labels.shape, generator=generator) < 0.9] = -1
    out = fill_unassigned(labels, 3)
    changed = labels.clone()
    changed[0] = -1
    changed[0, 7, 7] = 2
    out_changed = fill_unassigned(changed, 3)
    assert out_changed[0].eq(2).all()
    assert torch.equal(out_changed[1:], out[1:])
    for index in range(4):
        assert torch.equal(fill_unassigned(labels[index : index + 1], 3)[0], out[index])


def test_fill_keeps_dtype_and_input():
    labels = torch.tensor([[[1, -1, -1, 0]]], dtype=torch.int32)
    before = labels.clone()
    out = fill_unassigned(labels, num_labels=2)
    assert out.dtype == torch.int32 and out.device == labels.device
    assert out.tolist() == [[[1, 1, 0, 0]]]
    assert torch.equal(labels, before)
    full = torch.tensor([[[1, 0]]])
    assert fill_unassigned(full, 2).tolist() == [[[1, 0]]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fill_on_cuda_equals_cpu():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (3, 40, 30), generator=generator)
    labels[torch.rand(labels.shape, generator=generator) < 0.97] = -1
    out = fill_unassigned(labels.cuda(), 5)
    assert out.is_cuda
    assert torch.equal(out.cpu(), fill_unassigned(labels, 5))


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
    # Row 0 is [0, 1, 1]; row 1 is unassigned and takes the label just above each pixel.
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


def test_selected_indices_lists_selected_classes_in_order():
    selected = torch.tensor([[False, True, False, True], [True, False, False, False]])
    classes, valid = selected_indices(selected)
    assert classes.tolist() == [[1, 3], [0, 0]]
    assert valid.tolist() == [[True, True], [True, False]]
    classes, valid = selected_indices(torch.zeros(0, 4, dtype=torch.bool))
    assert classes.shape == valid.shape == (0, 1)


def painted_masks(maps, probs, image_size, threshold, has_background, labels=None):
    """Image by image, class by class: paint every selected class's upsampled, min-max
    normalized map where it is >= threshold, in order of increasing probability (equal
    probabilities: higher class first, so the lower class wins); then fill or shift."""
    out = []
    for index, (image_maps, image_probs) in enumerate(zip(maps, probs)):
        present = labels[index] > 0.5 if labels is not None else image_probs >= 0.5
        chosen = present.nonzero().flatten().tolist() or [int(image_probs.argmax())]
        painted = torch.full(image_size, -1)
        for c in sorted(chosen, key=lambda c: (float(image_probs[c]), -c)):
            full = image_maps[c][None, None]
            if full.shape[-2:] != image_size:
                full = F.interpolate(full, size=image_size, mode="bilinear", align_corners=False)
            full = full[0, 0]
            low, high = full.min(), full.max()
            full = (full - low) / (high - low) if high > low else torch.zeros_like(full)
            painted[full >= threshold] = c
        out.append(painted + 1 if has_background else nearest_fill(painted))
    return torch.stack(out)


@pytest.mark.parametrize("has_background", [True, False])
@pytest.mark.parametrize("true_labels", [False, True])
@pytest.mark.parametrize("full_resolution", [False, True])
def test_make_pseudo_masks_equals_class_by_class_painting(
    has_background, true_labels, full_resolution
):
    generator = torch.Generator().manual_seed(int(has_background) + 2 * int(true_labels))
    batch, classes, size = 5, 7, (12, 15)
    low_res = torch.rand(batch, classes, 3, 4, generator=generator)
    maps = upsample_maps(low_res, size) if full_resolution else low_res
    # quarter steps: many equal probabilities; the last image selects nothing (argmax fallback)
    probs = torch.randint(0, 4, (batch, classes), generator=generator) / 4
    probs[-1] = torch.rand(classes, generator=generator) * 0.4
    labels = (torch.rand(batch, classes, generator=generator) < 0.4).float() if true_labels else None
    if labels is not None:
        labels[0] = 0.0  # no true class: falls back to the most probable one
    out = make_pseudo_masks(
        maps, probs, size, threshold=0.4, has_background=has_background, labels=labels
    )
    expected = painted_masks(maps, probs, size, 0.4, has_background, labels)
    assert out.dtype == torch.int64
    assert torch.equal(out, expected)
    # the former path: merge all K maps with the unselected ones masked out
    everything = merge_masks(
        min_max_normalize(upsample_maps(maps, size)),
        probs,
        select_classes(probs, labels),
        0.4,
        has_background,
    )
    if not has_background:
        everything = fill_unassigned(everything, classes)
    assert torch.equal(out, everything)


@pytest.mark.parametrize("merge", ["probability", "map", "weighted"])
@pytest.mark.parametrize("has_background", [True, False])
def test_make_pseudo_masks_equals_merging_every_map_for_each_rule(has_background, merge):
    generator = torch.Generator().manual_seed(7)
    maps, probs = torch.rand(6, 5, 3, 4, generator=generator), torch.rand(6, 5, generator=generator)
    labels = (torch.rand(6, 5, generator=generator) < 0.5).float()
    size = (9, 10)
    out = make_pseudo_masks(maps, probs, size, threshold=0.3, has_background=has_background,
                            labels=labels, merge=merge)
    everything = merge_masks(min_max_normalize(upsample_maps(maps, size)), probs,
                             select_classes(probs, labels), 0.3, has_background, rule=merge)
    if not has_background:
        everything = fill_unassigned(everything, 5)
    assert torch.equal(out, everything)
    others = [make_pseudo_masks(maps, probs, size, threshold=0.3, labels=labels, merge=rule,
                                has_background=has_background)
              for rule in ("probability", "map", "weighted") if rule != merge]
    assert all(not torch.equal(out, other) for other in others)


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


@pytest.mark.parametrize(("merge", "expected"), [("probability", 0.5), ("map", 1.0),
                                                 ("weighted", 1.0)])
def test_evaluator_merges_with_the_configured_rule(merge, expected):
    # two objects side by side below a background row; each class's map covers both objects,
    # higher on its own: the paper's rule gives both to the more probable class
    maps = torch.zeros(1, 2, 4, 8)
    maps[0, 0, 1:, :4], maps[0, 0, 1:, 4:] = 1.0, 0.7
    maps[0, 1, 1:, :4], maps[0, 1, 1:, 4:] = 0.7, 1.0
    truth = torch.zeros(1, 4, 8, dtype=torch.int64)
    truth[0, 1:, :4], truth[0, 1:, 4:] = 1, 2
    evaluator = PseudoMaskEvaluator(2, PseudoMaskConfig(threshold=0.5, merge=merge))
    made = evaluator.update(torch.zeros(1, 3, 4, 8), torch.ones(1, 2), truth,
                            torch.tensor([[0.9, 0.8]]), maps)
    assert evaluator.compute()["miou_true_labels"] == pytest.approx(expected)
    assert torch.equal(made["true"], make_pseudo_masks(maps, torch.tensor([[0.9, 0.8]]), (4, 8),
                                                       threshold=0.5, has_background=True,
                                                       labels=torch.ones(1, 2), merge=merge))
