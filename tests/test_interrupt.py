"""Interrupted training loses nothing: Ctrl-C / SIGTERM save at the next step boundary, a
SIGKILL loses at most ``train.checkpoint_every`` steps, and resuming repeats no step and ends
where the uninterrupted run ends."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from attnmaps.config import load_config
from attnmaps.data.synthetic import write_synthetic_voc
from attnmaps.engine import train as engine
from attnmaps.engine.interrupt import Interrupted
from attnmaps.engine.train import train

# 24 images in batches of 4: 6 steps an epoch, 12 in all.
TINY = ["model.img_size=32,32", "model.patch_size=8", "model.embed_dim=16", "model.depth=2",
        "model.num_heads=2", "train.batch_size=4", "train.epochs=2", "train.log_every=1",
        "train.warmup_epochs=0.5", "train.device=cpu", "train.checkpoint_every=1"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_voc(tmp_path_factory.mktemp("synth"), num_train=24, num_val=4,
                               size=(32, 32), seed=7)


@pytest.fixture(scope="module")
def straight(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("straight")
    train(load_config(None, [*TINY, f"data.root={data_root}", f"out_dir={out}"]))
    return out


def _config(data_root: Path, out: Path):
    return load_config(None, [*TINY, f"data.root={data_root}", f"out_dir={out}"])


def _step_losses(run_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def _assert_same_run(resumed: Path, straight: Path) -> None:
    got, want = _step_losses(resumed), _step_losses(straight)
    assert [step for step, _ in got] == [step for step, _ in want]  # no step repeated or lost
    for (step, loss), (_, expected) in zip(got, want):
        assert loss == pytest.approx(expected, rel=1e-5, abs=1e-6), step
    a, b = load_file(resumed / "last.safetensors"), load_file(straight / "last.safetensors")
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_sigterm_mid_epoch_saves_at_the_step_boundary(data_root: Path, straight: Path,
                                                      tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_forward = engine.TrainStep.forward

    def forward_then_signal(self, batch):
        calls.append(1)
        if len(calls) == 4:  # batch 4 of epoch 1
            os.kill(os.getpid(), signal.SIGTERM)
        return real_forward(self, batch)

    monkeypatch.setattr(engine.TrainStep, "forward", forward_then_signal)
    with pytest.raises(Interrupted, match="stopped at step 4") as stop:
        train(_config(data_root, tmp_path))
    assert stop.value.exit_code == 143
    monkeypatch.undo()
    state = torch.load(tmp_path / "last.state.pt", weights_only=True)
    assert (state["epoch"], state["batches_done"], state["step"]) == (0, 4, 4)
    train(_config(data_root, tmp_path), resume=True)
    _assert_same_run(tmp_path, straight)


def test_sigkill_of_a_subprocess_loses_nothing_on_resume(data_root: Path, straight: Path,
                                                         tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "attnmaps", "train", *TINY, f"data.root={data_root}",
            f"out_dir={tmp_path}"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and len(log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    train(_config(data_root, tmp_path), resume=True)
    _assert_same_run(tmp_path, straight)


def test_resume_from_the_previous_pair_after_a_kill_inside_a_save(data_root: Path,
                                                                  straight: Path,
                                                                  tmp_path: Path) -> None:
    # A save killed between moving last.* aside and moving the new pair in leaves last.prev.*
    # only; --resume must start from it, not refuse.
    shutil.copytree(straight, tmp_path, dirs_exist_ok=True)
    for suffix in (".safetensors", ".state.pt"):
        (tmp_path / f"last{suffix}").unlink()
    with pytest.raises(FileExistsError, match="already holds a checkpoint"):
        train(_config(data_root, tmp_path))
    train(_config(data_root, tmp_path), resume=True)
    _assert_same_run(tmp_path, straight)
