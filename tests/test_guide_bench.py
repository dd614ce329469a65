"""The mask-guided attention benchmark: cue data, the GAP network, methods, statistics, a tiny run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from scipy import stats as scipy_stats

from attnmaps.guide.bench import METRICS, BenchConfig, run_guide_bench, summarise
from attnmaps.guide.cue_data import CUE_COLOR, MEAN, STD, cue_box, make_cue_split
from attnmaps.guide.gap_net import GAPConvNet
from attnmaps.guide.methods import METHODS, method_loss
from attnmaps.guide.stats import best_method, welch_t_test
from attnmaps.losses import CAMALLoss


def test_cue_tracks_the_class_in_training_and_not_in_test() -> None:
    train = make_cue_split(200, size=32, seed=3, cue_agreement=1.0)
    test = make_cue_split(400, size=32, seed=4, cue_agreement=0.0)
    assert torch.equal(train.cue, train.labels)
    agreement = (test.cue == test.labels).float().mean().item()
    assert 0.15 < agreement < 0.35  # a uniformly random corner agrees 1 time in 4
    assert set(test.cue.tolist()) == {0, 1, 2, 3}


def test_mark_is_drawn_in_its_corner_and_is_never_part_of_the_mask() -> None:
    split = make_cue_split(12, size=32, seed=0, cue_agreement=1.0, cue_size=4)
    color = (torch.tensor(CUE_COLOR).view(3, 1, 1) - MEAN) / STD
    for image, mask, corner in zip(split.images, split.masks, split.cue):
        rows, cols = cue_box(int(corner), 32, 4)
        assert (image[:, rows, cols] - color).abs().max() < 0.03 * 4 / STD + 1e-6
        assert not mask[rows, cols].any()
        assert mask.sum() > 30  # the shape itself is there
    assert cue_box(3, 32, 4) == (slice(27, 31), slice(27, 31))


def test_splits_are_deterministic_and_arguments_are_checked() -> None:
    a, b = make_cue_split(6, seed=9), make_cue_split(6, seed=9)
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    with pytest.raises(ValueError, match="cue_agreement"):
        make_cue_split(4, cue_agreement=1.5)
    with pytest.raises(ValueError, match="too small"):
        make_cue_split(4, size=12)


def test_gap_net_cam_averages_to_the_logits() -> None:
    torch.manual_seed(0)
    net = GAPConvNet(num_classes=4).eval()
    logits, maps = net.forward_with_maps(torch.randn(3, 3, 32, 32))
    torch.testing.assert_close(maps.mean(dim=(2, 3)), logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(net(torch.zeros(1, 3, 32, 32)),
                               net.forward_with_maps(torch.zeros(1, 3, 32, 32))[0])


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_gives_finite_losses_and_gradients(name: str) -> None:
    torch.manual_seed(1)
    net, data = GAPConvNet(num_classes=4), make_cue_split(6, seed=1)
    ce, guide = method_loss(name)(net, data.images, data.labels, data.masks,
                                  torch.ones(6, dtype=torch.bool))
    (ce + guide).backward()
    assert math.isfinite(ce.item()) and math.isfinite(guide.item())
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert (guide.item() == 0.0) is (name == "none")


def test_camal_method_guides_the_true_class_map() -> None:
    torch.manual_seed(2)
    net, data = GAPConvNet(num_classes=4).eval(), make_cue_split(5, seed=2)
    has_mask = torch.tensor([True, False, True, True, False])
    _, guide = method_loss("camal")(net, data.images, data.labels, data.masks, has_mask)
    _, maps = net.forward_with_maps(data.images)
    expected = CAMALLoss()(maps[torch.arange(5), data.labels], data.masks, has_mask)
    torch.testing.assert_close(guide, expected)
    with pytest.raises(ValueError, match="unknown guidance method"):
        method_loss("camel")


def test_welch_t_test_matches_the_formula() -> None:
    a, b = [0.61, 0.64, 0.58, 0.70, 0.66], [0.40, 0.52, 0.47, 0.31]
    n1, n2 = len(a), len(b)
    m1, m2 = sum(a) / n1, sum(b) / n2
    v1 = sum((x - m1) ** 2 for x in a) / (n1 - 1)
    v2 = sum((x - m2) ** 2 for x in b) / (n2 - 1)
    t = (m1 - m2) / math.sqrt(v1 / n1 + v2 / n2)
    df = (v1 / n1 + v2 / n2) ** 2 / ((v1 / n1) ** 2 / (n1 - 1) + (v2 / n2) ** 2 / (n2 - 1))
    p = 2 * scipy_stats.t.sf(abs(t), df)
    assert welch_t_test(a, b) == pytest.approx((t, p), rel=1e-9)
    assert math.isnan(welch_t_test([1.0], b)[1])


def test_best_method_respects_the_direction() -> None:
    samples = {"a": [0.2, 0.3], "b": [0.5, 0.6], "c": [math.nan, math.nan]}
    assert best_method(samples, ["a", "b", "c"], higher_is_better=True) == "b"
    assert best_method(samples, ["a", "b", "c"], higher_is_better=False) == "a"


def test_summary_compares_with_none_and_the_best_baseline() -> None:
    runs = {m: [dict.fromkeys(METRICS, v + 0.01 * s) for s in range(3)]
            for m, v in {"none": 0.1, "camal": 0.9, "l1": 0.5, "gain": 0.3}.items()}
    summary = summarise(runs, list(runs))
    entry = summary["camal"]["accuracy"]
    assert entry["mean"] == pytest.approx(0.91) and entry["std"] == pytest.approx(0.01)
    assert entry["best_baseline"] == "l1" and entry["p_vs_none"] < 1e-6
    assert summary["camal"]["deletion_auc"]["best_baseline"] == "gain"  # lower is better
    assert math.isnan(summary["none"]["accuracy"]["p_vs_none"])


def test_tiny_benchmark_writes_table_json_and_plot(tmp_path: Path) -> None:
    cfg = BenchConfig(methods=["none", "camal"], seeds=2, num_train=64, num_test=32,
                      num_faithfulness=4, epochs=1, batch_size=32)
    report = run_guide_bench(cfg, tmp_path)
    saved = json.loads((tmp_path / "guide_bench.json").read_text())
    assert set(saved["summary"]) == {"none", "camal"} and len(saved["runs"]["camal"]) == 2
    assert set(saved["summary"]["camal"]) == set(METRICS)
    assert (tmp_path / "guide_bench.png").stat().st_size > 0
    assert "| camal |" in (tmp_path / "guide_bench.md").read_text()
    assert report["summary"]["camal"]["accuracy"]["mean"] == pytest.approx(
        sum(r["accuracy"] for r in report["runs"]["camal"]) / 2)
    with pytest.raises(ValueError, match="unknown guidance methods"):
        run_guide_bench(BenchConfig(methods=["nope"]), tmp_path)


def test_welch_leaves_out_nan_and_constant_samples() -> None:
    a, b = [0.61, 0.64, math.nan, 0.58], [0.40, 0.52, 0.47]
    assert welch_t_test(a, b) == pytest.approx(welch_t_test([0.61, 0.64, 0.58], b))
    assert math.isnan(welch_t_test([1.0, 1.0], [0.0, 0.0])[1])


def test_gain_erased_pass_leaves_batchnorm_statistics_alone() -> None:
    from attnmaps.guide.methods import frozen_running_stats

    torch.manual_seed(3)
    net = GAPConvNet(num_classes=4).train()
    bn = net.features[1]
    before = bn.running_mean.clone()
    x = torch.randn(4, 3, 32, 32) + 5.0
    with frozen_running_stats(net):
        inside = net(x)
    assert torch.equal(bn.running_mean, before) and bn.momentum == 0.1
    torch.testing.assert_close(inside, net(x))  # still batch statistics, as in training
    assert not torch.equal(bn.running_mean, before)
