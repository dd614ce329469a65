"""Multi-process training: two gloo processes on CPU against single-process computations."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from attnmaps.checkpoint import load_weights
from attnmaps.config import load_config
from attnmaps.data.registry import build_dataset
from attnmaps.data.synthetic import write_synthetic_voc
from attnmaps.engine.distributed import (
    DistContext,
    cleanup,
    init_distributed,
    is_main_process,
    shard_indices,
)
from attnmaps.engine.evaluate import evaluate
from attnmaps.engine.interrupt import Interrupted
from attnmaps.engine.train import batch_layout, training_sampler
from attnmaps.metrics.alignment import AlignmentMetric
from attnmaps.metrics.classification import MultiLabelMetric
from attnmaps.metrics.segmentation import SegmentationMetric
from attnmaps.models.factory import create_model

WORLD = 2
TIMEOUT_S = 120
# 24 training images, a global batch of 8 (4 per process): 3 steps per epoch. Masks on half of
# them, so the guided loss (class maps) also runs through DistributedDataParallel. 7 validation
# images: the evaluation shards are uneven (4 and 3).
CONFIG = ["model.img_size=32,32", "model.patch_size=8", "model.embed_dim=16", "model.depth=2",
          "model.num_heads=2", "train.batch_size=8", "train.epochs=2", "train.log_every=1",
          "train.warmup_epochs=0.5", "model.attn_blocks=last2", "train.mask_fraction=0.5",
          "train.device=cpu"]
COMPARED = ("map", "per_class_ap", "exact_match", "label_accuracy", "f1", "miou", "pixel_acc",
            "mean_acc", "per_class_iou", "miou_true_labels", "miou_multi_class",
            "class_map_correlation", "head_sparsity")


class Interrupt(Exception):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(data_root: Path, out_dir: Path):
    return load_config(None, [*CONFIG, f"data.root={data_root}", f"out_dir={out_dir}"])


def _filled_metrics(ranks: list[int]) -> tuple:
    """Segmentation, multi-label and alignment metrics updated with the samples of ``ranks``
    (rank r holds 3 + r samples, so the processes' shares are uneven)."""
    seg, cls, align = SegmentationMetric(3), MultiLabelMetric(2), AlignmentMetric(tolerance=1)
    for rank in ranks:
        gen = torch.Generator().manual_seed(rank)
        n = 3 + rank
        seg.update(torch.randint(0, 3, (n, 4, 4), generator=gen),
                   torch.randint(0, 3, (n, 4, 4), generator=gen))
        cls.update(torch.rand(n, 2, generator=gen), torch.randint(0, 2, (n, 2), generator=gen))
        align.update(torch.rand(n, 4, 4, generator=gen), torch.rand(n, 4, 4, generator=gen) > 0.5)
    return seg, cls, align


def _stop_on_rank1(data_root: Path, out_dir: Path, rank: int) -> dict:
    """A run reading losses back every 2 steps whose rank 1 alone gets SIGTERM in its first
    step: where this rank stopped, and its exit code."""
    import attnmaps.engine.train as engine

    real_forward = engine.TrainStep.forward
    calls = []

    def forward_then_signal(self, batch):
        calls.append(1)
        if rank == 1 and len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_forward(self, batch)

    engine.TrainStep.forward = forward_then_signal
    try:
        engine.train(load_config(None, [*CONFIG, "train.log_every=2", f"data.root={data_root}",
                                        f"out_dir={out_dir}"]))
    except Interrupted as stop:
        return {"message": str(stop), "exit_code": stop.exit_code, "steps": len(calls)}
    finally:
        engine.TrainStep.forward = real_forward
    return {"message": "not stopped"}


def _worker(rank: int, ports: tuple[int, int], data_root: Path, out: Path) -> None:
    """One rank: an interrupted run (train owns the process group), then with a group opened
    here a straight run, the resume of the interrupted one and a sharded evaluation."""
    import attnmaps.engine.train as engine

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports[0]))
    record: dict = {"saves": 0, "states": []}
    real_evaluate, real_save = engine.evaluate, engine.save_checkpoint

    def evaluate_and_keep(model, *args, **kwargs):
        record["states"].append({k: v.clone() for k, v in model.state_dict().items()})
        return real_evaluate(model, *args, **kwargs)

    def counted_save(*args, **kwargs):
        record["saves"] += 1
        return real_save(*args, **kwargs)

    def stop(epoch: int, metrics: dict) -> None:
        raise Interrupt

    engine.evaluate, engine.save_checkpoint = evaluate_and_keep, counted_save
    try:
        engine.train(_config(data_root, out / "broken"), on_epoch=stop)
    except Interrupt:
        record["group_closed_after_error"] = not dist.is_initialized()
    os.environ["MASTER_PORT"] = str(ports[1])
    ctx = init_distributed(torch.device("cpu"), timeout=timedelta(seconds=TIMEOUT_S))
    assert ctx.owns_group
    record["metrics"] = engine.train(_config(data_root, out / "straight"))
    engine.train(_config(data_root, out / "broken"), resume=True)
    record["stop"] = _stop_on_rank1(data_root, out / "stopped", rank)
    cfg = _config(data_root, out / "straight")
    model = create_model(cfg.model, num_classes=4)
    load_weights(out / "straight" / "last.safetensors", model)
    ids: list[str] = []
    val = build_dataset(cfg.data, cfg.data.val_split, train=False)
    record["sharded"] = real_evaluate(model, val, cfg.pseudo, attn_blocks=cfg.model.attn_blocks,
                                      batch_size=1,
                                      on_batch=lambda batch, *_: ids.extend(batch["id"]))
    record["ids"] = ids
    metrics = _filled_metrics([rank])
    record["computed_twice"] = [[metric.compute() for metric in metrics] for _ in range(2)]
    cleanup()
    torch.save(record, out / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_voc(tmp_path_factory.mktemp("synth"), num_train=24, num_val=7,
                               size=(32, 32), seed=3)


@pytest.fixture(scope="module")
def ddp_run(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    """Run :func:`_worker` on two processes; the output folder and each rank's record."""
    out = tmp_path_factory.mktemp("ddp")
    context = multiprocessing.get_context("spawn")
    ports = (_free_port(), _free_port())
    procs = [context.Process(target=_worker, args=(rank, ports, data_root, out))
             for rank in range(WORLD)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(TIMEOUT_S)
    hung = [proc for proc in procs if proc.is_alive()]
    for proc in hung:
        proc.kill()
        proc.join()
    assert not hung, f"distributed workers still running after {TIMEOUT_S} s"
    assert [proc.exitcode for proc in procs] == [0] * WORLD, "a worker failed (see its stderr)"
    return out, [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)]


def _log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def _assert_metrics_equal(actual: dict, expected: dict, rel: float) -> None:
    for key in COMPARED:
        # The correlation is a float32 reduction whose rounding depends on the batch shapes.
        tolerance = max(rel, 1e-4) if key == "class_map_correlation" else rel
        assert actual[key] == pytest.approx(expected[key], rel=tolerance, abs=1e-12,
                                            nan_ok=True), key


@pytest.mark.slow
def test_ranks_stay_equal_and_only_rank0_writes(ddp_run: tuple[Path, list]) -> None:
    out, (rank0, rank1) = ddp_run
    assert rank0["group_closed_after_error"] and rank1["group_closed_after_error"]
    # Evaluated states: interrupted run (1 epoch), straight run (2), resumed run (1).
    assert len(rank0["states"]) == len(rank1["states"]) == 4
    for state0, state1 in zip(rank0["states"], rank1["states"]):
        for name, value in state0.items():
            assert torch.equal(value, state1[name]), name
    assert any("running_mean" in name for name in rank0["states"][0])  # BatchNorm stats too
    saved = load_file(out / "straight" / "last.safetensors")
    for name, value in saved.items():
        assert torch.equal(value, rank0["states"][2][name]), name
    # interrupted (1 epoch), straight (2), resumed (1), stopped by a signal (1)
    assert (rank0["saves"], rank1["saves"]) == (5, 0)
    records = _log(out / "straight")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["epoch"] for r in records if "eval" in r] == [0, 1]


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank_at_the_next_read_back(
        ddp_run: tuple[Path, list]) -> None:
    out, records = ddp_run
    for record in records:
        assert record["stop"]["exit_code"] == 143
        assert record["stop"]["steps"] == 2  # signal in step 1 of rank 1, read back after step 2
        assert record["stop"]["message"].startswith("stopped at step 2 (epoch 1, batch 2)")
    state = torch.load(out / "stopped" / "last.state.pt", weights_only=True)
    assert (state["epoch"], state["batches_done"], state["step"]) == (0, 2, 2)


def test_resume_under_ddp_continues_the_same_run(ddp_run: tuple[Path, list]) -> None:
    out, (rank0, _) = ddp_run
    straight = {r["step"]: r["loss"] for r in _log(out / "straight") if "loss" in r}
    resumed = {r["step"]: r["loss"] for r in _log(out / "broken") if "loss" in r}
    assert set(resumed) == set(straight)
    for step, loss in straight.items():
        assert resumed[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), step
    for name, value in rank0["states"][2].items():
        torch.testing.assert_close(rank0["states"][3][name], value, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_reduced_metrics_equal_single_process(ddp_run: tuple[Path, list], data_root: Path) -> None:
    out, records = ddp_run
    cfg = _config(data_root, out / "straight")
    model = create_model(cfg.model, num_classes=4)
    load_weights(out / "straight" / "last.safetensors", model)
    val = build_dataset(cfg.data, cfg.data.val_split, train=False)
    expected = evaluate(model, val, cfg.pseudo, attn_blocks=cfg.model.attn_blocks, batch_size=1)
    all_ids = [val[i]["id"] for i in range(len(val))]
    assert records[0]["ids"] == all_ids[0::2] and records[1]["ids"] == all_ids[1::2]
    for record in records:
        # Image by image, as in the single-process run: equal up to the float64 sum order.
        _assert_metrics_equal(record["sharded"], expected, rel=1e-12)
        # Batches of 4 (float32 results depend on the batch shape): the class-map correlation
        # of the near-uniform maps of this tiny model amplifies that rounding to ~1e-5.
        _assert_metrics_equal(record["metrics"], expected, rel=1e-4)


@pytest.mark.slow
def test_metrics_compute_twice_under_two_processes(ddp_run: tuple[Path, list]) -> None:
    """compute() reduces a copy of the state: both calls on both ranks give the metrics of all
    samples together, as one process holding them all computes them."""
    expected = [metric.compute() for metric in _filled_metrics(list(range(WORLD)))]
    for record in ddp_run[1]:
        for computed in record["computed_twice"]:
            for got, want in zip(computed, expected):
                assert got.keys() == want.keys()
                for key, value in want.items():
                    if isinstance(value, torch.Tensor):
                        assert torch.equal(got[key], value), key
                    else:
                        assert got[key] == pytest.approx(value, nan_ok=True), key


def _sampler(size: int, seed: int, rank: int = 0, world: int = 1, epoch: int = 0) -> list[int]:
    ctx = DistContext(rank, world, rank, torch.device("cpu"), False)
    sampler = training_sampler(list(range(size)), seed, ctx)
    sampler.set_epoch(epoch)
    return list(sampler)


def test_training_sampler_splits_one_permutation() -> None:
    size, seed, epoch, per_rank_batch = 12, 5, 3, 2
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    assert _sampler(size, seed, epoch=epoch) == order.tolist()
    for world in (2, 3, 4):
        shards = [_sampler(size, seed, rank, world, epoch) for rank in range(world)]
        assert all(len(shard) == size // world for shard in shards)
        assert sorted(i for shard in shards for i in shard) == list(range(size))
        # Step s of all ranks together is the single-process batch s.
        for s in range(size // (per_rank_batch * world)):
            together = sorted(i for shard in shards
                              for i in shard[s * per_rank_batch:(s + 1) * per_rank_batch])
            batch = order[s * per_rank_batch * world:(s + 1) * per_rank_batch * world]
            assert together == sorted(batch.tolist())
    uneven = [_sampler(10, seed, rank, 3) for rank in range(3)]
    assert all(len(shard) == 3 for shard in uneven)
    assert len({i for shard in uneven for i in shard}) == 9
    assert _sampler(size, seed, epoch=epoch + 1) != order.tolist()


def test_shard_indices_cover_every_sample_once() -> None:
    shards = [list(shard_indices(7, rank, 3)) for rank in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    assert list(shard_indices(7)) == list(range(7))  # no process group: everything


def test_batch_layout_splits_the_global_batch() -> None:
    assert batch_layout(8, 24, 1) == (8, 3)
    assert batch_layout(8, 24, 2) == (4, 3)
    assert batch_layout(64, 24, 4) == (6, 1)
    with pytest.warns(UserWarning, match="global batch of 4"):
        assert batch_layout(5, 24, 2) == (2, 6)
    with pytest.raises(ValueError, match="at least the number of processes"):
        batch_layout(1, 24, 2)


def test_init_without_torchrun_is_single_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    ctx = init_distributed(torch.device("cpu"))
    assert (ctx.rank, ctx.world_size, ctx.owns_group, ctx.device) == (0, 1, False,
                                                                     torch.device("cpu"))
    assert not dist.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="RANK, MASTER_ADDR, MASTER_PORT not set"):
        init_distributed(torch.device("cpu"))


def test_main_process_outside_a_group_follows_torchruns_rank(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """After training has left its process group, only rank 0 prints the run summary."""
    assert not dist.is_initialized()
    monkeypatch.delenv("RANK", raising=False)
    assert is_main_process()
    monkeypatch.setenv("RANK", "0")
    assert is_main_process()
    monkeypatch.setenv("RANK", "1")
    assert not is_main_process()
    assert list(shard_indices(5)) == [0, 1, 2, 3, 4]  # no group: every index, whatever RANK
