"""SIGTERM / SIGINT for the lifetime of a run: stop within seconds, leaving a resumable state.

`engine.train` enters `RunSignals` for the whole run and leaves it (restoring the previous handlers)
when the run ends, however it ends. Two ways of stopping, chosen by where the run is:
- inside `deferred()` (the step loop, including its checkpoint saves) a signal only sets `signum`; the
  loop finishes the step, all ranks agree, a checkpoint is saved and the run stops;
- anywhere else (data preparation, cache build, model set-up, export, evaluation) the handler raises
  `StopRequested` at once. Everything those stages write is atomic, verified on reuse, and resumed
  by `--checkpoint.resume auto`, so stopping mid-stage loses only the unfinished piece of work.
A second SIGINT (Ctrl-C twice) kills the process at once: the first restores the default action.
"""

from __future__ import annotations

import contextlib
import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequested(BaseException):
    """A stop signal arrived. A BaseException, like KeyboardInterrupt, so `except Exception` never swallows it."""

    def __init__(self, signum: int, stage: str):
        self.signum, self.stage = signum, stage
        super().__init__(f"stopped by {signal.Signals(signum).name} during {stage}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention for "terminated by signal N"


class RunSignals:
    """Context manager owning SIGTERM and SIGINT while a run is in progress (main thread only)."""

    def __init__(self):
        self.signum: int | None = None
        self.stage = "start-up"
        self._deferred = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> RunSignals:
        # Handlers can only be set from the main thread; elsewhere the caller keeps its own.
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def stop(self) -> bool:
        return self.signum is not None

    @contextlib.contextmanager
    def deferred(self, stage: str):
        """Within the block a signal only sets the flag; the code polls `stop` at safe points."""
        self.stage, self._deferred = stage, True
        try:
            yield
        finally:
            self._deferred = False

    def enter(self, stage: str) -> None:
        """Name the stage now running (for the stop message); raise at once if a stop is already pending."""
        self.stage = stage
        if self.signum is not None:
            raise StopRequested(self.signum, stage)

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # the next Ctrl-C terminates without any handler
        if not self._deferred:
            raise StopRequested(self.signum, self.stage)
