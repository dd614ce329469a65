"""One training process per run directory.

Two processes that train into the same ``out_dir`` (a second ``--resume`` started by mistake, two
benchmark workers given the same run) would overwrite each other's checkpoints and cut each
other's logs. :func:`run_lock` holds an exclusive, non-blocking ``flock`` on ``out_dir/.lock``
for the whole training; a second process fails at once with :class:`RunInUse`, naming the
directory and the holder's process id. The operating system releases the lock when its holder
exits, however it exits, so a killed run never leaves a stale lock. On systems without
``fcntl`` (Windows) no lock is taken.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import RunInUse

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK_NAME = ".lock"


@contextmanager
def run_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold the lock of ``run_dir`` (created if missing) while the block runs; raises
    :class:`RunInUse` if another process holds it. A path that is a file is left to the run's
    own checks."""
    run_dir = Path(run_dir)
    if fcntl is None or run_dir.is_file():
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK_NAME, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise RunInUse(f"{run_dir} is in use by another training process (pid {holder}); "
                           "wait for it to end, stop it, or set out_dir to another "
                           "directory") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
