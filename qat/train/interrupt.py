"""Ctrl-C that stops training at the next batch boundary instead of mid-update.

A KeyboardInterrupt raised inside `optimizer.step()` would leave weights, optimizer state and step
counter out of step with each other, and the saved `last.pt` could not resume exactly. While
`DeferredInterrupt` is active the first SIGINT only sets `requested`; the loop checks it between
batches, saves `last.pt` and raises KeyboardInterrupt. A second SIGINT interrupts at once.
Outside the main thread (where signals cannot be caught) it does nothing.
The message goes to the `qat` logger (console and, under Hydra, the run's train.log).
"""
from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)


class StopRequested(KeyboardInterrupt):
    """Raised by the training loop at a batch boundary after a deferred Ctrl-C."""


class DeferredInterrupt:
    def __init__(self):
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, self._previous or signal.default_int_handler)
        log.warning("Ctrl-C: stopping after this batch and saving last.pt (Ctrl-C again to abort now, "
                    "losing the steps since the last checkpoint)")

    def __enter__(self) -> "DeferredInterrupt":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
