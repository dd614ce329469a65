"""The training step's host side: loss read-back every ``train.log_every`` steps, loader options
per device, uint8 batches normalised on the device, fused AdamW state, graph breaks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import SequentialSampler

import attnmaps.engine.train as engine
from attnmaps.config import DataConfig, ModelConfig, TrainConfig, load_config
from attnmaps.data.registry import build_dataset
from attnmaps.data.synthetic import write_synthetic_voc
from attnmaps.engine.acceleration import graph_breaks
from attnmaps.engine.objective import WSSSObjective
from attnmaps.engine.optim import build_optimizer, load_optimizer_state, param_groups
from attnmaps.engine.train import (
    TrainStep,
    batch_to_device,
    make_loader,
    pixel_stats,
    train,
)
from attnmaps.errors import TrainingDiverged
from attnmaps.models.factory import create_model

# 24 images in batches of 4: 6 steps an epoch, 12 in all; no checkpoint inside an epoch.
TINY = ["model.img_size=32,32", "model.patch_size=8", "model.embed_dim=16", "model.depth=2",
        "model.num_heads=2", "train.batch_size=4", "train.epochs=2", "train.warmup_epochs=0.5",
        "train.device=cpu", "train.checkpoint_every=0", "data.crop_scale=0.5,1.0"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_voc(tmp_path_factory.mktemp("synth"), num_train=24, num_val=4,
                               size=(32, 32), seed=11)


def _logged(run_dir: Path) -> dict[int, dict]:
    """The run's logged step records by step."""
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if "loss" in r}


def _train(data_root: Path, out: Path, *extra: str) -> dict[int, dict]:
    """Train TINY into ``out``; the logged step records by step."""
    train(load_config(None, [*TINY, f"data.root={data_root}", f"out_dir={out}", *extra]))
    return _logged(out)


@pytest.fixture(scope="module")
def every_step(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("every_step")
    _train(data_root, out, "train.log_every=1")
    return out


def _assert_same_weights(a: Path, b: Path) -> None:
    first, second = load_file(a / "last.safetensors"), load_file(b / "last.safetensors")
    for name, value in first.items():
        assert torch.equal(second[name], value), name


def test_read_back_every_k_steps_gives_the_same_run(data_root: Path, every_step: Path,
                                                    tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    reduced = []
    real = engine.all_reduce_mean

    def counted(values: torch.Tensor) -> torch.Tensor:
        reduced.append(values.numel())
        return real(values)

    monkeypatch.setattr(engine, "all_reduce_mean", counted)
    sparse = _train(data_root, tmp_path, "train.log_every=4")
    # read-backs at steps 4, 6 (epoch end), 8, 12 (epoch end): 4, 2, 2 and 4 steps of
    # (bce, l0, loss) plus the stop flag
    assert reduced == [4 * 3 + 1, 2 * 3 + 1, 2 * 3 + 1, 4 * 3 + 1]
    dense = _logged(every_step)
    assert sorted(sparse) == [4, 8, 12]
    for step, record in sparse.items():
        assert record == dense[step]
    _assert_same_weights(tmp_path, every_step)


def test_a_nan_loss_is_caught_at_the_next_read_back(data_root: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_forward = TrainStep.forward

    def nan_at_step_7(self, batch):
        calls.append(1)
        parts = real_forward(self, batch)
        if len(calls) == 7:
            parts["loss"] = parts["loss"] * float("nan")
        return parts

    monkeypatch.setattr(TrainStep, "forward", nan_at_step_7)
    with pytest.raises(TrainingDiverged, match=r"at step 7 \(found when steps 7-8 were read back"
                                               r"\); the last good checkpoint is kept \(epoch 1, "
                                               r"step 6") as error:
        _train(data_root, tmp_path, "train.log_every=4")
    assert "loss became nan" in str(error.value)
    assert len(calls) == 8  # stopped at the read-back after step 8
    state = torch.load(tmp_path / "last.state.pt", weights_only=True)
    assert state["step"] == 6
    assert all(torch.isfinite(v).all() for v in load_file(tmp_path / "last.safetensors").values())


def test_uint8_batches_normalised_on_the_device_give_the_same_run(data_root: Path,
                                                                  every_step: Path,
                                                                  tmp_path: Path) -> None:
    on_device = _train(data_root, tmp_path, "train.log_every=1", "data.normalize_on_device=true")
    assert on_device == _logged(every_step)
    _assert_same_weights(tmp_path, every_step)


def test_uint8_images_normalise_to_the_float_path_exactly(data_root: Path) -> None:
    cfg = DataConfig(name="voc", root=str(data_root), image_size=[32, 32], crop_scale=[0.5, 1.0],
                     mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    plain = build_dataset(cfg, "train", train=True)
    shipped = build_dataset(DataConfig(**{**vars(cfg), "normalize_on_device": True}), "train",
                            train=True)
    batches = []
    for dataset in (plain, shipped):
        torch.manual_seed(3)  # the same crops and flips
        batches.append(next(iter(make_loader(dataset, 8, SequentialSampler(dataset), cfg,
                                             torch.device("cpu")))))
    assert batches[1]["image"].dtype == torch.uint8
    assert batches[0]["image"].dtype == torch.float32
    device = torch.device("cpu")
    moved = batch_to_device(batches[1], device, pixel_stats(cfg, device))
    assert torch.equal(moved["image"], batches[0]["image"])
    assert torch.equal(moved["mask"], batches[0]["mask"])
    with pytest.raises(ValueError, match="mean and std"):
        batch_to_device(batches[1], device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_uint8_images_normalise_on_cuda_as_on_the_cpu() -> None:
    cfg = DataConfig(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    on_cpu = batch_to_device({"image": images}, cpu, pixel_stats(cfg, cpu))["image"]
    on_cuda = batch_to_device({"image": images.pin_memory()}, cuda, pixel_stats(cfg, cuda))
    torch.testing.assert_close(on_cuda["image"].cpu(), on_cpu, rtol=1e-6, atol=1e-6)


def test_color_jitter_cannot_run_on_uint8_images(data_root: Path) -> None:
    cfg = DataConfig(name="voc", root=str(data_root), color_jitter=0.2, normalize_on_device=True)
    with pytest.raises(ValueError, match="data.color_jitter=0"):
        build_dataset(cfg, "train", train=True)
    assert build_dataset(cfg, "val", train=False).uint8_images is False


@pytest.mark.parametrize(("device", "workers"), [("cpu", 0), ("cpu", 2), ("cuda", 2)])
def test_loader_options_follow_the_device_and_workers(data_root: Path, device: str,
                                                      workers: int) -> None:
    cfg = DataConfig(name="voc", root=str(data_root), num_workers=workers, prefetch_factor=3,
                     persistent_workers=True)
    dataset = build_dataset(cfg, "train", train=True)
    loader = make_loader(dataset, 4, SequentialSampler(dataset), cfg, torch.device(device))
    assert loader.pin_memory is (device == "cuda")
    assert loader.num_workers == workers and loader.drop_last
    assert loader.persistent_workers is bool(workers)
    assert loader.prefetch_factor == (3 if workers else None)


def _model_and_optimizer(device: torch.device) -> tuple[torch.nn.Module, torch.optim.AdamW]:
    torch.manual_seed(0)
    model = create_model(ModelConfig(img_size=[32, 32], patch_size=8, embed_dim=16, depth=1,
                                     num_heads=2), num_classes=3).to(device)
    return model, build_optimizer(model, 1e-3, 0.05, (0.9, 0.95))


def _one_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    images = torch.randn(2, 3, 32, 32, device=next(model.parameters()).device)
    model(images).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def test_optimizer_is_not_fused_on_cpu_and_keeps_that_on_a_fused_state() -> None:
    model, optimizer = _model_and_optimizer(torch.device("cpu"))
    assert all(not group["fused"] for group in optimizer.param_groups)
    fused = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3, fused=True)
    _one_step(model, fused)
    load_optimizer_state(optimizer, fused.state_dict())
    assert all(not group["fused"] for group in optimizer.param_groups)
    _one_step(model, optimizer)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_optimizer_is_fused_on_cuda_and_resumes_a_cpu_state() -> None:
    model, optimizer = _model_and_optimizer(torch.device("cpu"))
    _one_step(model, optimizer)
    state = optimizer.state_dict()
    model, optimizer = _model_and_optimizer(torch.device("cuda"))
    assert all(group["fused"] for group in optimizer.param_groups)
    load_optimizer_state(optimizer, state)
    assert all(group["fused"] for group in optimizer.param_groups)
    _one_step(model, optimizer)


def test_the_training_step_compiles_without_graph_breaks() -> None:
    torch.manual_seed(0)
    model = create_model(ModelConfig(img_size=[32, 32], patch_size=8, embed_dim=32, depth=2,
                                     num_heads=2), num_classes=4).train()
    step = TrainStep(model, WSSSObjective(TrainConfig(), [1], has_background=True),
                     torch.device("cpu"))
    batch = {"image": torch.randn(4, 3, 32, 32), "labels": (torch.rand(4, 4) < 0.5).float()}
    report = graph_breaks(step, batch)
    assert report == {"graphs": 1, "graph_breaks": 0, "reasons": []}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_run_trains_on_pinned_uint8_batches_with_fused_adamw(
        data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built = []

    def recorded(*args, **kwargs):
        built.append(build_optimizer(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(engine, "build_optimizer", recorded)
    logged = _train(data_root, tmp_path, "train.device=cuda", "train.log_every=2",
                    "data.num_workers=1", "data.normalize_on_device=true",
                    "train.precision=bf16")
    assert sorted(logged) == [2, 4, 6, 8, 10, 12]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in logged.values())
    assert all(group["fused"] for group in built[0].param_groups)
