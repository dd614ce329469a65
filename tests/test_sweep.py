"""Background-threshold sweep of a run, and the metrics file of written pseudo masks.

The run directory is written directly (config and randomly initialised weights, as ``attnmaps
train`` lays them out) to keep the tests fast; nothing here depends on training.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from attnmaps.checkpoint import save_checkpoint
from attnmaps.config import load_config, save_config
from attnmaps.data.registry import build_dataset
from attnmaps.data.synthetic import CLASS_NAMES, SHAPE_NAMES, write_synthetic_voc
from attnmaps.engine.evaluate import evaluate
from attnmaps.metrics.report import evaluate_directories, to_jsonable
from attnmaps.models.factory import create_model
from attnmaps.pipeline import load_run, sweep_thresholds, write_pseudo_masks

TINY = ["model.img_size=32,32", "model.patch_size=8", "model.embed_dim=16", "model.depth=2",
        "model.num_heads=2", "train.batch_size=8", "train.epochs=1", "train.log_every=1",
        "train.warmup_epochs=0.5", "model.attn_blocks=last2"]
THRESHOLDS = [0.2, 0.3, 0.5, 0.65]  # 0.3 is the default pseudo.threshold


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = write_synthetic_voc(tmp_path_factory.mktemp("synth"), num_train=1, num_val=8,
                               size=(32, 32), seed=4)
    out = tmp_path_factory.mktemp("run") / "run"
    cfg = load_config(None, [*TINY, f"data.root={root}", f"out_dir={out}"])
    save_config(cfg, out / "config.yaml")
    torch.manual_seed(0)
    save_checkpoint(out, create_model(cfg.model, len(SHAPE_NAMES)), {})
    return out


@pytest.fixture(scope="module")
def single(run_dir: Path) -> dict[float, tuple[float, float]]:
    """mIoU from predicted and from true labels of evaluate() run at each single threshold."""
    cfg, model = load_run(run_dir, device="cpu")
    dataset = build_dataset(cfg.data, cfg.data.val_split, train=False)
    result = {}
    for t in THRESHOLDS:
        metrics = evaluate(model, dataset, replace(cfg.pseudo, threshold=t),
                           attn_blocks=cfg.model.attn_blocks)
        result[t] = (metrics["miou"], metrics["miou_true_labels"])
    assert any(pred != true for pred, true in result.values())  # the label source matters
    return result


@pytest.mark.parametrize("true_labels", [False, True])
def test_sweep_matches_single_threshold_evaluations(run_dir: Path, single: dict,
                                                    true_labels: bool):
    overrides = [f"pseudo.use_true_labels={str(true_labels).lower()}"]
    result = sweep_thresholds(run_dir, list(reversed(THRESHOLDS)), overrides=overrides)
    by_threshold = result["miou_by_threshold"]
    assert sorted(by_threshold) == THRESHOLDS
    for t in THRESHOLDS:
        assert by_threshold[t] == pytest.approx(single[t][int(true_labels)], abs=1e-12)
    best = max(THRESHOLDS, key=lambda t: (by_threshold[t], -t))
    assert result["best_threshold"] == best and result["best_miou"] == by_threshold[best]
    assert len(set(by_threshold.values())) > 1  # the thresholds do change the masks
    saved = json.loads((run_dir / "sweep.json").read_text())
    assert saved["best_threshold"] == best and saved["use_true_labels"] == true_labels
    assert saved["miou_by_threshold"] == {str(t): v for t, v in by_threshold.items()}


@pytest.mark.parametrize("thresholds", [[], [0.3, 1.5], [-0.1]])
def test_sweep_rejects_bad_thresholds(run_dir: Path, thresholds: list[float]):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sweep_thresholds(run_dir, thresholds)


@pytest.mark.parametrize("true_labels", [False, True])
def test_pseudo_masks_metrics_file_scores_the_written_masks(run_dir: Path, single: dict,
                                                            tmp_path: Path, true_labels: bool):
    out = tmp_path / "masks"
    overrides = [f"pseudo.use_true_labels={str(true_labels).lower()}"]
    metrics = write_pseudo_masks(run_dir, out, overrides=overrides)
    saved = json.loads((out / "metrics.json").read_text())
    cfg, _ = load_run(run_dir)
    assert saved["miou"] == pytest.approx(single[cfg.pseudo.threshold][int(true_labels)],
                                          abs=1e-12)
    assert saved["class_names"] == list(CLASS_NAMES)
    # The saved confusion matrix is that of the PNGs on disk against the ground truth.
    root = Path(cfg.data.root)
    gt_dir = tmp_path / "gt"
    gt_dir.mkdir()
    for sample_id in (root / "ImageSets/Segmentation/val.txt").read_text().split():
        source = root / "SegmentationClass" / f"{sample_id}.png"
        (gt_dir / source.name).write_bytes(source.read_bytes())
    from_disk = evaluate_directories(out, gt_dir, class_names=list(CLASS_NAMES))
    assert saved["confusion"] == from_disk["confusion"]
    assert saved["per_class_iou"] == from_disk["per_class_iou"]
    assert saved["per_class_iou"] == to_jsonable(metrics["per_class_iou"])
    assert saved["masks_from"] == ("true image labels" if true_labels else "predictions")


def test_sweep_command_prints_every_threshold_and_marks_the_best(run_dir: Path, capsys):
    from attnmaps.cli import main

    assert main(["sweep", "--run", str(run_dir), "--thresholds", "0.2,0.5"]) == 0
    out = capsys.readouterr().out
    saved = json.loads((run_dir / "sweep.json").read_text())
    assert "threshold 0.20" in out and "threshold 0.50" in out and out.count("<- best") == 1
    assert f"threshold {saved['best_threshold']:.2f}" in out.split("<- best")[0].splitlines()[-1]
    assert main(["sweep", "--run", str(run_dir), "--thresholds", "1.5"]) == 2


def test_refining_only_the_selected_maps_scores_as_refining_all(
        run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """evaluate() refines only the predicted or true classes' maps; every score it reports
    (predicted labels, true labels, the threshold sweep) equals refining all K maps."""
    import attnmaps.engine.evaluate as evaluation
    from attnmaps.pseudo.pamr import pamr

    cfg, model = load_run(run_dir, device="cpu")
    dataset = build_dataset(cfg.data, cfg.data.val_split, train=False)
    settings = replace(cfg.pseudo, refine_iterations=3)

    def scores() -> tuple:
        metrics = evaluate(model, dataset, settings, attn_blocks=cfg.model.attn_blocks,
                           sweep=THRESHOLDS)
        return metrics["miou"], metrics["miou_true_labels"], metrics["miou_by_threshold"]

    selected_only = scores()
    monkeypatch.setattr(evaluation, "pamr",
                        lambda images, maps, iterations, selected: pamr(images, maps, iterations))
    assert selected_only == scores()
