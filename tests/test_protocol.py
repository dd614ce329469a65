"""The recorded evaluation protocol: its block, the metrics files of every command carrying it,
raw -> post-processed stages, the label-free threshold, and the global batch size."""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from test_sweep import run_dir  # noqa: F401  (the fixture: a tiny run directory)

from attnmaps.checkpoint import checkpoint_paths, read_metadata
from attnmaps.cli import main
from attnmaps.config import Config, PseudoMaskConfig, load_config
from attnmaps.data.registry import build_dataset
from attnmaps.engine.evaluate import SWEEP_NOTE, evaluate
from attnmaps.engine.stages import cumulative_settings, evaluate_stages
from attnmaps.engine.train import batch_layout
from attnmaps.pipeline import load_run
from attnmaps.protocol import (
    FIXED,
    USES_PIXEL_LABELS,
    build_protocol,
    code_version,
    format_protocol,
)
from attnmaps.pseudo.threshold import MapHistogram, otsu_threshold

PROTOCOL_KEYS = {"split", "num_images", "labels", "merge", "maps", "tta", "refinement",
                 "background_threshold", "precision", "global_batch_size", "seed", "code_version",
                 "checkpoint_id"}


def test_block_records_the_config():
    cfg = load_config(None, ["pseudo.use_true_labels=true", "pseudo.refine_iterations=5",
                             "pseudo.crf=true", "pseudo.crf_bilateral_srgb=5",
                             "pseudo.crf_bilateral_downsample=3",
                             "pseudo.tta_scales=0.5,1.0", "train.batch_size=48",
                             "train.seed=3", "train.precision=bf16", "pseudo.merge=weighted"])
    block = build_protocol(cfg, split="train", num_images=7)
    assert block["merge"] == "weighted"
    assert block["maps"] == "attention"
    assert build_protocol(Config(), split="val", num_images=1)["merge"] == "probability"
    assert PROTOCOL_KEYS <= set(block)
    assert (block["split"], block["num_images"], block["labels"]) == ("train", 7,
                                                                      "true image labels")
    assert block["refinement"]["pamr_iterations"] == 5
    assert block["refinement"]["crf"]["bilateral_srgb"] == 5.0
    assert block["refinement"]["crf"]["bilateral_downsample"] == 3
    assert block["refinement"]["crf"]["backend"] == "torch"
    assert block["tta"] == {"scales": [0.5, 1.0], "flip": False}
    assert block["background_threshold"] == {"value": 0.3, "chosen_by": FIXED}
    assert (block["global_batch_size"], block["seed"], block["precision"]) == (48, 3, "bf16")
    assert build_protocol(Config(), split="val", num_images=1)["refinement"]["crf"] is None
    text = format_protocol(block)
    assert "refinement.crf.bilateral_srgb" in text and "global_batch_size" in text


def test_code_version_without_git_is_the_package_version(monkeypatch):
    def no_git(*args, **kwargs):
        raise subprocess.CalledProcessError(128, "git")

    monkeypatch.setattr(subprocess, "run", no_git)
    assert code_version().startswith("attnmaps ")


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_global_batch_is_the_same_for_any_process_count(world_size):
    per_process, steps = batch_layout(32, 1000, world_size)
    assert per_process * world_size == 32 and steps == 1000 // 32


def test_every_command_writes_the_protocol(run_dir: Path, tmp_path: Path, capsys):  # noqa: F811
    cfg, _ = load_run(run_dir)
    weights, _ = checkpoint_paths(run_dir)
    checkpoint = read_metadata(weights)["checkpoint_id"]
    masks = tmp_path / "masks"
    assert main(["pseudo-masks", "--run", str(run_dir), "--out", str(masks),
                 "pseudo.refine_iterations=2"]) == 0
    printed = capsys.readouterr().out
    written = json.loads((masks / "metrics.json").read_text())
    assert "protocol:" in printed and "+PAMR" in printed
    assert [row["stage"] for row in written["stages"]] == ["raw", "+PAMR"]
    assert written["stages"][-1]["miou"] == written["miou"]
    assert main(["sweep", "--run", str(run_dir), "--thresholds", "0.2,0.5", "--label-free"]) == 0
    printed = capsys.readouterr().out
    swept = json.loads((run_dir / "sweep.json").read_text())
    assert USES_PIXEL_LABELS in printed and "label-free threshold" in printed
    assert USES_PIXEL_LABELS in swept["best_chosen_by"]
    assert USES_PIXEL_LABELS in swept["protocol"]["background_threshold"]["chosen_by"]
    assert 0.0 < swept["label_free"]["threshold"] < 1.0
    gt = tmp_path / "gt"
    gt.mkdir()
    for sample in (Path(cfg.data.root) / "ImageSets/Segmentation/val.txt").read_text().split():
        source = Path(cfg.data.root) / "SegmentationClass" / f"{sample}.png"
        (gt / source.name).write_bytes(source.read_bytes())
    assert main(["evaluate", "--pred", str(masks), "--gt", str(gt),
                 "--out", str(tmp_path / "scored.json")]) == 0
    assert "protocol:" in capsys.readouterr().out
    scored = json.loads((tmp_path / "scored.json").read_text())
    for block in (written["protocol"], swept["protocol"], scored["protocol"]):
        assert PROTOCOL_KEYS <= set(block)
        assert block["checkpoint_id"] == checkpoint and block["split"] == "val"
    assert written["protocol"]["refinement"]["pamr_iterations"] == 2
    assert scored["protocol"]["scored_by_attnmaps_evaluate"]["num_images"] == len(list(
        gt.glob("*.png")))


def test_evaluate_of_foreign_masks_says_their_protocol_is_unknown(tmp_path: Path):
    from attnmaps.data.image_io import write_mask

    for folder in ("pred", "gt"):
        write_mask(tmp_path / folder / "a.png", torch.zeros(4, 4, dtype=torch.uint8).numpy())
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt")]) == 0
    block = json.loads((tmp_path / "pred" / "metrics.json").read_text())["protocol"]
    assert "unknown" in block["masks"]


def test_stages_are_cumulative_and_each_scores_as_its_own_evaluation(run_dir: Path):  # noqa: F811
    full = PseudoMaskConfig(refine_iterations=2, tta_scales=[1.0, 1.25], crf=True)
    stages = dict(cumulative_settings(full))
    assert list(stages) == ["raw", "+PAMR", "+TTA", "+CRF"] and stages["+CRF"] == full
    assert stages["raw"] == replace(full, refine_iterations=0, tta_scales=[1.0], crf=False)
    assert stages["+TTA"] == replace(full, crf=False)
    cfg, model = load_run(run_dir)
    dataset = build_dataset(cfg.data, cfg.data.val_split, train=False)
    settings = replace(cfg.pseudo, refine_iterations=2)
    rows = evaluate_stages(model, dataset, settings, attn_blocks=cfg.model.attn_blocks)
    for row, (_, stage) in zip(rows, cumulative_settings(settings)):
        want = evaluate(model, dataset, stage, attn_blocks=cfg.model.attn_blocks)
        assert (row["miou"], row["miou_true_labels"]) == (want["miou"], want["miou_true_labels"])


def test_sweep_output_is_marked_as_using_pixel_labels(run_dir: Path):  # noqa: F811
    cfg, model = load_run(run_dir)
    dataset = build_dataset(cfg.data, cfg.data.val_split, train=False)
    metrics = evaluate(model, dataset, cfg.pseudo, sweep=[0.3])
    assert metrics["miou_by_threshold_note"] == SWEEP_NOTE and "pixel labels" in SWEEP_NOTE
    assert "miou_by_threshold_note" not in evaluate(model, dataset, cfg.pseudo)


def test_otsu_threshold_by_hand():
    # Bin centres 1/8, 3/8, 5/8, 7/8. Split after bin 0: w = 3, 3, means 1/8 and 17/24,
    # 9 * (7/12)^2 = 3.06; after bin 1 (or the empty bin 2): w = 4, 2, means 3/16 and 7/8,
    # 8 * (11/16)^2 = 3.78, the largest, first at bin 1: threshold 2/4.
    assert otsu_threshold(torch.tensor([3.0, 1.0, 0.0, 2.0])) == 0.5
    assert otsu_threshold(torch.zeros(4)) == 0.5 and otsu_threshold(torch.tensor([0., 5.])) == 0.5


def test_otsu_threshold_maximises_the_between_class_variance_of_the_values():
    gen = torch.Generator().manual_seed(0)
    values = torch.cat([torch.rand(300, generator=gen) * 0.4,
                        0.55 + torch.rand(100, generator=gen) * 0.45])
    bins = 20
    centres = ((values * bins).floor().clamp_max(bins - 1) + 0.5) / bins

    def between(t: float) -> float:
        low, high = centres[centres < t], centres[centres >= t]
        return len(low) * len(high) * (low.mean() - high.mean()).item() ** 2

    candidates = [(k + 1) / bins for k in range(bins - 1)]
    best = max(candidates, key=lambda t: (between(t) if 0 < (centres < t).sum() < len(values)
                                          else -1.0, -t))
    counts = torch.histc(values, bins=bins, min=0.0, max=1.0)
    assert otsu_threshold(counts) == pytest.approx(best)


def test_map_histogram_counts_only_selected_maps_normalized():
    histogram = MapHistogram(bins=4)
    maps = torch.tensor([[[[2.0, 4.0], [4.0, 4.0]], [[9.0, 9.0], [9.0, 0.0]]]])
    histogram.update(maps, torch.tensor([[True, False]]))
    assert histogram.counts.tolist() == [1.0, 0.0, 0.0, 3.0]


def test_evaluate_ids_list_may_be_longer_than_a_class_list(tmp_path: Path):
    from attnmaps.data.image_io import write_mask

    ids = [f"img_{i:04d}" for i in range(300)]  # more than the 255 a class list may hold
    for image_id in [*ids, "not_listed"]:
        for folder in ("pred", "gt"):
            write_mask(tmp_path / folder / f"{image_id}.png", np.ones((2, 2), dtype=np.uint8))
    (tmp_path / "ids.txt").write_text("\n".join(ids) + "\n\n")
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"),
                 "--ids", str(tmp_path / "ids.txt")]) == 0
    assert json.loads((tmp_path / "pred" / "metrics.json").read_text())["num_images"] == 300
