"""Speed switches against the plain path: bf16 autocast, torch.compile, activation checkpointing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import attnmaps.engine.train as engine
from attnmaps.checkpoint import load_weights
from attnmaps.config import ModelConfig, TrainConfig, load_config
from attnmaps.data.synthetic import write_synthetic_voc
from attnmaps.engine.acceleration import autocast, compile_module
from attnmaps.engine.objective import WSSSObjective
from attnmaps.engine.train import TrainStep, train
from attnmaps.models import vit
from attnmaps.models.factory import create_model

SMALL = ["model.img_size=32,32", "model.patch_size=8", "model.embed_dim=16", "model.depth=2",
         "model.num_heads=2", "train.batch_size=8", "train.epochs=1", "train.log_every=1",
         "train.warmup_epochs=0.5", "model.attn_blocks=last2", "train.device=cpu"]
# inductor needs minutes to compile on a busy CPU; aot_eager traces the same graphs (dynamo and
# AOTAutograd) and runs them with eager kernels.
TEST_BACKEND = "aot_eager"


pytestmark = pytest.mark.usefixtures("one_thread")


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
    return create_model(ModelConfig(img_size=[32, 32], patch_size=8, embed_dim=32, depth=2,
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
                 create_model(load_config(None, SMALL).model, num_classes=4))


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


def test_build_model_passes_class_blocks_checkpointing_and_kernel() -> None:
    cfg = ModelConfig(img_size=[32, 32], patch_size=8, embed_dim=16, depth=3, num_heads=2,
                      class_blocks=2, grad_checkpointing=True, attention_kernel="explicit")
    model = create_model(cfg, num_classes=3)
    assert model.class_blocks == 2 and model.grad_checkpointing
    assert {block.attn.kernel for block in model.blocks} == {"explicit"}


def test_attention_kernel_key_rejects_unknown_value() -> None:
    with pytest.raises(ValueError, match="attention_kernel"):
        load_config(None, ["model.attention_kernel=flash"])


def numpy_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> np.ndarray:
    """softmax(q k^T / sqrt(d)) v, one query row at a time in float64 numpy."""
    q, k, v = (t.double().numpy() for t in (q, k, v))
    out = np.zeros(q.shape)
    for index in np.ndindex(*q.shape[:3]):
        scores = k[index[:2]] @ q[index] / math.sqrt(q.shape[-1])
        weights = np.exp(scores - scores.max())
        out[index] = weights / weights.sum() @ v[index[:2]]
    return out


@pytest.mark.parametrize("kernel", vit.ATTENTION_KERNELS)
def test_attention_kernels_equal_a_row_by_row_softmax(kernel: str) -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 4, generator=gen) * 2 for _ in range(3))
    expected = numpy_attention(q, k, v)
    assert np.allclose(vit.attention(q, k, v, kernel).numpy(), expected, atol=1e-5)
    bf16 = vit.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), kernel).float().numpy()
    assert np.allclose(bf16, expected, atol=0.1)


def test_auto_kernel_is_explicit_for_bf16_on_cpu_and_fused_for_fp32(
        monkeypatch: pytest.MonkeyPatch) -> None:
    fused_calls: list[torch.dtype] = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        fused_calls.append(q.dtype)
        return original(q, k, v)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    q = torch.randn(1, 2, 5, 4)
    vit.attention(q, q, q)
    vit.attention(q.bfloat16(), q.bfloat16(), q.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model = vit.ClassTokenViT(num_classes=2, img_size=(16, 16), patch_size=8, embed_dim=8,
                                  depth=1, num_heads=2)
        model(torch.randn(1, 3, 16, 16))
    assert fused_calls == [torch.float32]
    with pytest.raises(ValueError, match="'flash'"):
        vit.attention(q, q, q, "flash")
    with pytest.raises(ValueError, match="attention_kernel='flash'"):
        vit.GatedAttention(8, 2, kernel="flash")


def test_explicit_kernel_model_gives_the_fused_losses_and_gradients() -> None:
    grads = {}
    for kernel in ("fused", "explicit"):
        torch.manual_seed(0)
        model = vit.ClassTokenViT(num_classes=3, img_size=(16, 24), patch_size=8, embed_dim=16,
                                  depth=2, num_heads=2, attention_kernel=kernel).train()
        torch.manual_seed(1)
        labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
        logits = model(torch.randn(2, 3, 16, 24), labels)
        torch.nn.functional.binary_cross_entropy_with_logits(logits, labels).backward()
        grads[kernel] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads["fused"].keys() == grads["explicit"].keys()
    for name, grad in grads["fused"].items():
        torch.testing.assert_close(grads["explicit"][name], grad, rtol=1e-4, atol=1e-6,
                                   msg=name)
