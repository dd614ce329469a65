"""End-to-end: training, resume, CLI stages and their errors, on a tiny synthetic set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from attnmaps.cli import main
from attnmaps.config import config_to_dict, load_config
from attnmaps.data.synthetic import CLASS_NAMES, write_synthetic_voc
from attnmaps.engine.resume import config_differences
from attnmaps.engine.train import train

TINY = ["model.img_size=32,32", "model.patch_size=8", "model.embed_dim=16", "model.depth=2",
        "model.num_heads=2", "train.batch_size=8", "train.epochs=2", "train.log_every=1",
        "train.warmup_epochs=0.5", "model.attn_blocks=last2", "train.device=cpu"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_voc(tmp_path_factory.mktemp("synth"), num_train=24, num_val=8,
                               size=(32, 32), seed=3)


def tiny_config(data_root: Path, out_dir: Path, *extra: str):
    return load_config(None, [*TINY, f"data.root={data_root}", f"out_dir={out_dir}", *extra])


def step_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


class Interrupt(Exception):
    pass


def test_resume_continues_the_same_run(data_root: Path, tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    train(tiny_config(data_root, straight))

    def stop_after_first_epoch(epoch: int, metrics: dict) -> None:
        raise Interrupt

    broken = tmp_path / "broken"
    with pytest.raises(Interrupt):
        train(tiny_config(data_root, broken), on_epoch=stop_after_first_epoch)
    first = step_losses(broken)
    train(tiny_config(data_root, broken), resume=True)

    expected, resumed = step_losses(straight), step_losses(broken)
    assert set(resumed) == set(expected) and max(first) < max(expected)
    for step, loss in expected.items():
        assert resumed[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), step
    a, b = load_file(straight / "last.safetensors"), load_file(broken / "last.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_eval_every_scores_every_nth_and_the_last_epoch(data_root: Path, tmp_path: Path) -> None:
    seen: dict[int, dict] = {}
    run = tmp_path / "run"
    final = train(tiny_config(data_root, run, "train.epochs=5", "train.eval_every=2"),
                  on_epoch=lambda epoch, metrics: seen.setdefault(epoch, metrics))
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "eval" in r] == [1, 3, 4]
    assert [sorted(seen[e]) for e in (0, 2)] == [["images_per_second"]] * 2
    assert "map" in seen[1] and final is seen[4] and "map" in final
    every = tmp_path / "every"
    train(tiny_config(data_root, every, "train.epochs=5"))
    a, b = load_file(run / "last.safetensors"), load_file(every / "last.safetensors")
    assert all(torch.equal(a[name], b[name]) for name in a)  # evaluation draws no random numbers


def test_resume_accepts_another_evaluation_cadence_but_not_another_learning_rate(
        data_root: Path, tmp_path: Path) -> None:
    stored = yaml.safe_load(yaml.safe_dump(config_to_dict(tiny_config(data_root, tmp_path))))
    changed = tiny_config(data_root, tmp_path, "train.eval_every=5", "train.lr=0.5")
    assert config_differences(stored, changed) == {"train.lr": (stored["train"]["lr"], 0.5)}


def test_existing_run_needs_resume(data_root: Path, tmp_path: Path) -> None:
    cfg = tiny_config(data_root, tmp_path / "run", "train.epochs=1")
    train(cfg)
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg)


def test_cli_pipeline_end_to_end(data_root: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    overrides = [*TINY, f"data.root={data_root}", f"out_dir={run}", "train.epochs=1"]
    assert main(["train", *overrides]) == 0
    saved = load_config(run / "config.yaml")
    assert saved.model.embed_dim == 16 and saved.data.root == str(data_root)
    masks = tmp_path / "masks"
    assert main(["pseudo-masks", "--run", str(run), "--out", str(masks)]) == 0
    ids = (data_root / "ImageSets/Segmentation/val.txt").read_text().split()
    assert sorted(p.stem for p in masks.glob("*.png")) == sorted(ids)
    # The full mask folder holds train images too: evaluation names the missing predictions.
    assert main(["evaluate", "--pred", str(masks), "--gt", str(data_root / "SegmentationClass"),
                 "--classes", str(data_root / "classes.txt")]) == 2
    assert "synth_000000" in capsys.readouterr().err
    gt_val = tmp_path / "gt_val"
    gt_val.mkdir()
    for sample_id in ids:
        source = data_root / "SegmentationClass" / f"{sample_id}.png"
        (gt_val / source.name).write_bytes(source.read_bytes())
    assert main(["evaluate", "--pred", str(masks), "--gt", str(gt_val), "--classes",
                 str(data_root / "classes.txt"), "--out", str(tmp_path / "m.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert {"miou", "pixel_acc", "per_class_iou"} <= set(metrics)
    assert len(metrics["per_class_iou"]) == len(CLASS_NAMES) and 0.0 <= metrics["miou"] <= 1.0


def test_demo_writes_metrics_and_picture(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--num-train", "16", "--num-val", "8",
                 "--from-scratch", *TINY,
                 "train.epochs=1", "model.img_size=64,64"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("miou", "miou_true_labels", "miou_multi_class", "class_map_correlation",
                "floor_miou", "map", "head_sparsity", "protocol", "stages"):
        assert key in metrics
    assert metrics["protocol"]["checkpoint_id"] and metrics["stages"][0]["stage"] == "raw"
    assert (out / "attention_grid.png").stat().st_size > 10_000
    cfg = load_config(out / "run" / "config.yaml")
    assert cfg.model.patch_head and cfg.train.patch_dropout == 0.5  # --from-scratch adds them


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "model.depht=3"], "model.depht"),
        (["train", "data.root=/nonexistent/voc", "data.name=voc"], "/nonexistent/voc"),
        (["train", "data.name=imagenet", "data.root=/tmp"], "imagenet"),
        (["pseudo-masks", "--run", "/nonexistent/run", "--out", "/tmp/x"], "config.yaml"),
    ],
)
def test_cli_errors_name_the_offender(args: list[str], message: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_input_not_divisible_by_patch_is_reported(data_root: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    args = ["train", *TINY, f"data.root={data_root}", f"out_dir={tmp_path / 'r'}",
            "data.image_size=30,30", "model.img_size=32,32"]
    assert main(args) == 2
    assert "not divisible by patch_size=8" in capsys.readouterr().err


def test_shipped_checkpoint_fits_the_demo_model() -> None:
    from attnmaps.checkpoint import load_weights
    from attnmaps.demo import demo_config_path, shipped_checkpoint_path
    from attnmaps.models.factory import create_model

    cfg = load_config(demo_config_path())
    model = create_model(cfg.model, num_classes=4).eval()
    load_weights(shipped_checkpoint_path(), model)
    logits, maps = model.predict(torch.zeros(2, 3, 64, 64), cfg.model.attn_blocks)
    assert logits.shape == (2, 4) and maps.shape == (2, 4, 8, 8)
    assert torch.isfinite(logits).all()
