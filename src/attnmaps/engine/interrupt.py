"""Stop a long loop cleanly on Ctrl-C (SIGINT) or SIGTERM: the handler only records the signal,
the loop checks :attr:`StopRequest.signal` at a safe point (a step boundary), saves and raises
:class:`Interrupted`.

Example::

    with StopRequest() as stop:
        for batch in loader:
            step(batch)
            if stop.signal:
                save()
                raise Interrupted(stop.signal, "saved at step 12")
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

from ..errors import AttnmapsError

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Interrupted(AttnmapsError):
    """The run stopped on a signal after saving its state; ``exit_code`` is 128 + signal."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = EXIT_CODES.get(signum, 128 + signum)


class StopRequest:
    """Context manager that turns SIGINT / SIGTERM into a flag (``signal``: the first signal
    number received, 0 before). A second Ctrl-C stops at once (KeyboardInterrupt). Outside the
    main thread, where handlers cannot be installed, it never fires."""

    def __init__(self) -> None:
        self.signal = 0
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = self.signal or signum

    def __enter__(self) -> StopRequest:  # noqa: PYI034 (typing.Self needs Python 3.11)
        if threading.current_thread() is threading.main_thread():
            for signum in EXIT_CODES:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
