"""Speed switches against the plain path: bf16 autocast, torch.compile, activation checkpointing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import attnmaps.engine.train as engine
from attnmaps.config import ModelConfig, TrainConfig, load_config
from attnmaps.data.synthetic import write_synthetic_voc
from attnmaps.engine.acceleration import autocast, compile_module
from attnmaps.engine.checkpoint import load_weights
from attnmaps.engine.objective import WSSSObjective
from attnmaps.engine.train import TrainStep, build_model, train
from attnmaps.models import vit

SMALL = ["model.img_size=32,32", "model.patch_size=8", "model.embed_dim=16", "model.depth=2",
         "model.num_heads=2", "train.batch_size=8", "train.epochs=1", "train.log_every=1",
         "train.warmup_epochs=0.5", "model.attn_blocks=last2", "train.device=cpu"]
# inductor needs minutes to compile on a busy CPU; aot_eager traces the same graphs (dynamo and
# AOTAutograd) and runs them with eager kernels.
TEST_BACKEND = "aot_eager"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run several times faster on one thread than on two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_voc(tmp_path_factory.mktemp("synth"), num_train=16, num_val=4,
                               size=(32, 32), seed=5)


def run(data_root: Path, out_dir: Path, *extra: str) -> dict[int, float]:
    """Train one small epoch; the logged loss of every step."""
    train(load_config(None, [*SMALL, f"data.root={data_root}", f"out_dir={out_dir}", *extra]))
    records = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def small_model() -> vit.ClassTokenViT:
    torch.manual_seed(0)
    return build_model(ModelConfig(img_size=[32, 32], patch_size=8, embed_dim=32, depth=2,
                                   num_heads=2), num_classes=4)


def batch() -> dict:
    generator = torch.Generator().manual_seed(1)
    return {"image": torch.randn(4, 3, 32, 32, generator=generator),
            "labels": (torch.rand(4, 4, generator=generator) < 0.5).float()}


def test_bf16_step_loss_is_close_to_fp32() -> None:
    model = small_model().train()
    objective = WSSSObjective(TrainConfig(), [1], has_background=True)
    losses = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(2)  # the same gate noise and class-token masking
        parts = TrainStep(model, objective, torch.device("cpu"), precision)(batch())
        assert all(value.dtype == torch.float32 for value in parts.values())
        losses[precision] = parts["loss"].item()
    assert losses["bf16"] != losses["fp32"]  # autocast did run in bf16
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=2e-2)


def test_autocast_rejects_unknown_precision() -> None:
    with pytest.raises(ValueError, match="train.precision"):
        autocast("fp16", torch.device("cpu"))
    with autocast("bf16", torch.device("cpu")):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def test_bf16_training_run_finishes(data_root: Path, tmp_path: Path) -> None:
    losses = run(data_root, tmp_path / "bf16", "train.precision=bf16")
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses.values())


def test_compiled_model_matches_eager() -> None:
    model = small_model().eval()
    compiled = compile_module(model, torch.device("cpu"), backend=TEST_BACKEND)
    assert compiled is not model
    images = batch()["image"]
    with torch.no_grad():
        torch.testing.assert_close(compiled(images), model(images), rtol=1e-5, atol=1e-5)


def test_compile_falls_back_to_eager_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    def unavailable(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", unavailable)
    model = small_model()
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found.*runs eagerly"):
        assert compile_module(model, torch.device("cpu")) is model


@pytest.mark.slow
def test_compiled_training_matches_eager_and_saves_plain_keys(
        data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def compile_for_test(module, device):
        calls.append(type(module).__name__)
        compiled = compile_module(module, device, backend=TEST_BACKEND)
        assert compiled is not module  # compiled, not the eager fallback
        return compiled

    eager = run(data_root, tmp_path / "eager")
    monkeypatch.setattr(engine, "compile_module", compile_for_test)
    compiled = run(data_root, tmp_path / "compiled", "train.compile=true")
    assert calls == ["TrainStep"]
    assert compiled == pytest.approx(eager, rel=1e-5)
    weights = load_file(tmp_path / "compiled" / "last.safetensors")
    assert not any("_orig_mod" in name for name in weights)
    load_weights(tmp_path / "compiled" / "last.safetensors",
                 build_model(load_config(None, SMALL).model, num_classes=4))


def test_grad_checkpointing_gives_the_same_losses(data_root: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def counted_checkpoint(*args, **kwargs):
        calls.append(1)
        return torch.utils.checkpoint.checkpoint(*args, **kwargs)

    monkeypatch.setattr(vit, "checkpoint", counted_checkpoint)
    plain = run(data_root, tmp_path / "plain", "train.mask_fraction=0.5")
    assert not calls
    checkpointed = run(data_root, tmp_path / "ckpt", "train.mask_fraction=0.5",
                       "model.grad_checkpointing=true")
    assert len(calls) == 2 * 2  # 2 blocks in each of 2 steps; none in evaluation
    assert checkpointed == pytest.approx(plain, rel=1e-6)
    a, b = load_file(tmp_path / "plain" / "last.safetensors"), load_file(
        tmp_path / "ckpt" / "last.safetensors")
    for name, value in a.items():
        torch.testing.assert_close(b[name], value, rtol=1e-5, atol=1e-6)


def test_build_model_passes_class_blocks_and_checkpointing() -> None:
    cfg = ModelConfig(img_size=[32, 32], patch_size=8, embed_dim=16, depth=3, num_heads=2,
                      class_blocks=2, grad_checkpointing=True)
    model = build_model(cfg, num_classes=3)
    assert model.class_blocks == 2 and model.grad_checkpointing
