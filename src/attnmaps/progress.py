"""Progress reporting: the ``attnmaps`` logger for lines, a tqdm bar only on a terminal.

Library code never prints: it logs to ``logging.getLogger("attnmaps")`` (the command line shows
INFO records on stdout) and wraps long loops in :func:`progress`, whose bar is drawn only when
stderr is a terminal, so that a redirected log holds whole lines, not carriage-return fragments.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable

from tqdm import tqdm

logger = logging.getLogger("attnmaps")


def progress(iterable: Iterable, desc: str, enabled: bool = True,
             total: int | None = None) -> tqdm:
    """``iterable`` wrapped in a progress bar that shows only when ``enabled`` and stderr is a
    terminal (the returned object iterates and takes ``set_postfix`` either way); ``total``
    for iterators without a length."""
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True,
                mininterval=2.0, disable=not (enabled and sys.stderr.isatty()))


def log_to_stdout(level: int = logging.INFO) -> None:
    """Show the ``attnmaps`` logger's records of ``level`` and above on stdout, message only
    (what the command line does; a handler the user installed is left alone)."""
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
