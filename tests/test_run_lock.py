"""One training process per run directory (engine/run_lock.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from attnmaps.engine.run_lock import run_lock
from attnmaps.errors import RunInUse

pytest.importorskip("fcntl")

HOLD = ("import sys, time\nfrom attnmaps.engine.run_lock import run_lock\n"
        "with run_lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(120)\n")


def test_a_second_holder_is_refused_until_the_first_lets_go(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with run_lock(run_dir), pytest.raises(RunInUse, match="run is in use"), run_lock(run_dir):
        pass
    with run_lock(run_dir):  # released on exit
        pass


def test_training_into_a_directory_another_process_trains_into_fails_at_once(
        tmp_path: Path) -> None:
    from attnmaps.config import load_config
    from attnmaps.engine.train import train

    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunInUse, match=f"pid {holder.pid}"):  # before any data is read
            train(load_config(None, [f"out_dir={run_dir}"]))
        assert not (run_dir / "last.safetensors").exists()
    finally:
        holder.kill()
        holder.wait()
    with run_lock(run_dir):  # the killed holder left no stale lock
        pass
