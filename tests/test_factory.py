"""models.factory: one way to build a model, checkpoints that rebuild their model alone, and
checkpoints written under the old parameter names still loading."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from attnmaps.checkpoint import load_weights, read_metadata
from attnmaps.config import load_config
from attnmaps.data.synthetic import CLASS_NAMES, write_synthetic_voc
from attnmaps.demo import demo_config_path, shipped_checkpoint_path
from attnmaps.engine.train import train
from attnmaps.models.factory import create_model, is_attnmaps_checkpoint, load_model
from attnmaps.models.vit import ClassTokenViT

TINY = ["model.img_size=32,32", "model.patch_size=8", "model.embed_dim=16", "model.depth=2",
        "model.num_heads=2", "model.head=per_token", "train.batch_size=8", "train.epochs=2",
        "train.warmup_epochs=0.5", "train.device=cpu"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = write_synthetic_voc(tmp_path_factory.mktemp("synth"), num_train=16, num_val=4,
                               size=(32, 32), seed=5)
    out = tmp_path_factory.mktemp("run")
    train(load_config(None, [*TINY, f"data.root={data}", f"out_dir={out}"]))
    return out


def test_weights_file_alone_rebuilds_the_model(run_dir: Path) -> None:
    weights = run_dir / "last.safetensors"
    metadata = read_metadata(weights)
    assert metadata["num_classes"] == "4"
    assert json.loads(metadata["class_names"]) == list(CLASS_NAMES)
    assert json.loads(metadata["model_config"])["head"] == "per_token"
    model, names = load_model(weights)
    assert names == list(CLASS_NAMES) and not model.training
    stored = load_file(weights)
    assert stored.keys() == model.state_dict().keys()
    for name, value in model.state_dict().items():
        assert torch.equal(value, stored[name]), name
    assert is_attnmaps_checkpoint(weights)


def test_load_model_names_a_file_without_metadata(tmp_path: Path) -> None:
    path = tmp_path / "bare.safetensors"
    save_file({"x": torch.zeros(1)}, str(path))
    with pytest.raises(ValueError, match="bare.safetensors carries no attnmaps model metadata"):
        load_model(path)


def test_legacy_parameter_names_load(tmp_path: Path) -> None:
    """Checkpoints written before the timm names (cls_tokens, reg_tokens, mlp.0 / mlp.2)."""
    model = ClassTokenViT(num_classes=3, img_size=(16, 16), patch_size=8, embed_dim=16, depth=2,
                          num_heads=2)
    legacy = {}
    for name, value in model.state_dict().items():
        name = name.replace("cls_token", "cls_tokens").replace("reg_token", "reg_tokens")
        legacy[name.replace("mlp.fc1.", "mlp.0.").replace("mlp.fc2.", "mlp.2.")] = value
    assert "blocks.1.mlp.2.weight" in legacy and "cls_tokens" in legacy
    path = tmp_path / "legacy.safetensors"
    save_file(legacy, str(path))
    assert is_attnmaps_checkpoint(path)
    fresh = ClassTokenViT(num_classes=3, img_size=(16, 16), patch_size=8, embed_dim=16, depth=2,
                          num_heads=2)
    load_weights(path, fresh)
    for name, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name


def test_the_shipped_demo_checkpoint_still_loads() -> None:
    cfg = load_config(demo_config_path())
    model = create_model(cfg.model, len(CLASS_NAMES) - 1, init_from=shipped_checkpoint_path())
    assert "cls_tokens" in load_file(shipped_checkpoint_path())  # written under the old names
    assert torch.equal(model.cls_token, load_file(shipped_checkpoint_path())["cls_tokens"])


def test_training_logs_one_line_per_epoch_without_a_terminal(
        run_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture) -> None:
    data = write_synthetic_voc(tmp_path / "synth", num_train=16, num_val=4, size=(32, 32))
    with caplog.at_level(logging.INFO, logger="attnmaps"):
        train(load_config(None, [*TINY, f"data.root={data}", f"out_dir={tmp_path / 'run'}"]))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert [line.split(":")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"]
    captured = capsys.readouterr()
    assert "\r" not in captured.out + captured.err  # no progress-bar fragments
