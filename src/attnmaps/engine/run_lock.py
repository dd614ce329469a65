"""One training process per run directory.

Two processes that train into the same ``out_dir`` (a second ``--resume`` started by mistake, two
benchmark workers given the same run) would overwrite each other's checkpoints and cut each
other's logs. :func:`run_lock` holds an exclusive, non-blocking ``flock`` on ``out_dir/.lock``
for the whole training; a second process fails at once with :class:`RunInUse`, naming the
directory and the holder's process id. The operating system releases the lock when its holder
exits, however it exits, so a killed run never leaves a stale lock. Within one process the lock
is re-entrant. Where there is no ``fcntl`` (Windows) or the filesystem refuses ``flock`` (some
network filesystems), no lock is taken (with a warning in the second case).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import RunInUse

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK_NAME = ".lock"
_held: set[Path] = set()  # the run directories this process holds


@contextmanager
def run_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold the lock of ``run_dir`` (created if missing) while the block runs; raises
    :class:`RunInUse` if another process holds it. A path that is a file is left to the run's
    own checks."""
    run_dir = Path(run_dir)
    key = run_dir.resolve()
    if fcntl is None or run_dir.is_file() or key in _held:
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
        except OSError as error:
            warnings.warn(f"{run_dir}: this filesystem does not support file locks ({error}); "
                          "training without the run-directory lock", stacklevel=3)
            yield
            return
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        _held.add(key)
        try:
            yield
        finally:
            _held.discard(key)
            fcntl.flock(handle, fcntl.LOCK_UN)
