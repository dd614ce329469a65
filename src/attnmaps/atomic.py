"""Atomic file writes: a file is either fully replaced or left as it was."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path


def atomic_write(writers: Mapping[Path, Callable[[Path], object]], durable: bool = True,
                 before_replace: Callable[[], object] | None = None) -> None:
    """Write several files so that each is either fully replaced or left as it was.

    Each writer fills a temporary sibling of its target; once all are written (and, when
    ``durable``, fsynced) ``before_replace()`` runs, if given, and the files are
    moved into place with ``os.replace`` in the given order. On any error the temporary files are
    removed and the targets keep their previous content. Parent directories are created.
    """
    temps: dict[Path, Path] = {}
    try:
        for target, write in writers.items():
            target.parent.mkdir(parents=True, exist_ok=True)
            temps[target] = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
            write(temps[target])
            if durable:
                with open(temps[target], "rb") as f:
                    os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        for target in list(temps):
            os.replace(temps[target], target)
            del temps[target]
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
    if durable:
        for directory in {target.parent for target in writers}:
            _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    """Persist renames inside ``directory`` (POSIX only; a no-op elsewhere)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
