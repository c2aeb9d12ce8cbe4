"""Stopping a run cleanly: SIGINT or SIGTERM ends the current step, then the stage saves and stops."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM: the run finished its current step, saved a checkpoint there and stopped."""


class StopRequest:
    """Set by the signal handler; the step loop reads it between steps."""

    def __init__(self):
        self.signum: int | None = None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Catch SIGINT and SIGTERM while the loop runs (main thread only; elsewhere signals stay as they are)."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def note(signum, frame):
        request.signum = signum
    old = {s: signal.signal(s, note) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for s, h in old.items():
            signal.signal(s, h)
