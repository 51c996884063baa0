"""Graceful stops: Ctrl-C or SIGTERM finish the current step, save a checkpoint, then exit.

The handler only records the signal; the training loop checks it after each optimizer step
(agreeing across processes, so every rank saves the same checkpoint) and raises
:class:`TrainingInterrupted`. A second Ctrl-C while that is pending aborts at once.
Exit codes follow the shell convention 128 + signal number: 130 for SIGINT, 143 for SIGTERM.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from peqa_cli.errors import PeqaError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(PeqaError):
    """The run stopped on a signal after saving a checkpoint (exit 128 + signal number)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


class StopRequest:
    """Set by a signal handler, read by the training loop."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now, without a checkpoint
        self.signum = signum

    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        """Install the handlers for the duration of training (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
        for s in STOP_SIGNALS:
            signal.signal(s, self._handle)
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name
