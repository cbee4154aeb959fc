"""Turn launcher signals (SIGTERM, SIGUSR2 on SLURM preemption) into a flag the loop polls.

The handler only sets a flag: writing a checkpoint inside a signal handler would race with
the optimizer step. The loop checks the flag after every step, checkpoints, and stops.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterable

log = logging.getLogger(__name__)


class StopRequest:
    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def request(self, reason: str) -> None:
        self.signal_name = reason
        self._event.set()

    def install(self, names: Iterable[str]) -> None:
        """Install handlers (main thread only; elsewhere, e.g. Ray worker threads, skip)."""
        if threading.current_thread() is not threading.main_thread():
            log.info("not on the main thread: signal checkpointing left to the launcher")
            return
        for name in names:
            signum = getattr(signal, name)
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if not self.requested:
            log.warning("received %s: checkpointing after the current step, then stopping", name)
        self.request(name)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous.clear()
