"""One training process per run directory (engine/run_lock.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from attnmaps.engine import run_lock as run_lock_module
from attnmaps.engine.run_lock import run_lock
from attnmaps.errors import RunInUse

pytest.importorskip("fcntl")

HOLD = ("import sys, time\nfrom attnmaps.engine.run_lock import run_lock\n"
        "with run_lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(120)\n")


def hold_in_another_process(run_dir: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_the_lock_is_re_entrant_within_a_process(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with run_lock(run_dir), run_lock(run_dir):  # a nested acquire by the holder succeeds
        assert (run_dir / ".lock").read_text() == str(os.getpid())
    assert not run_lock_module._held


def test_training_into_a_directory_another_process_trains_into_fails_at_once(
        tmp_path: Path) -> None:
    from attnmaps.config import load_config
    from attnmaps.engine.train import train

    run_dir = tmp_path / "run"
    holder = hold_in_another_process(run_dir)
    try:
        with pytest.raises(RunInUse, match=f"pid {holder.pid}"):
            train(load_config(None, [f"out_dir={run_dir}", "train.epochs=1"]))
        assert not (run_dir / "config.yaml").exists()  # stopped before the run was set up
    finally:
        holder.kill()
        holder.wait()
    with run_lock(run_dir):  # the killed holder left no stale lock
        pass


def test_a_filesystem_without_locks_trains_unlocked(tmp_path: Path, monkeypatch) -> None:
    def refuse(handle, operation):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(run_lock_module.fcntl, "flock", refuse)
    entered = False
    with pytest.warns(UserWarning, match="does not support file locks"), run_lock(tmp_path / "r"):
        entered = True
    assert entered
