"""Whole-run training progress: a bar on a terminal, a plain line every N seconds otherwise.

One `RunProgress` spans the whole run (not one epoch), so its ETA is the whole run's:
  total  = the step the run stops at (epochs x steps per epoch, or max_steps when that is smaller)
  n_0    = the step the run starts from (the resumed step; 0 for a fresh run), so a resumed run's
           bar starts at its resumed position
  rate r = (n - n_0) / elapsed   steps per second of wall clock in this process since the start,
                                 evaluations included (they are part of what the rest will cost)
  ETA    = (total - n) / r
  img/s  = images / (elapsed - time spent in `paused()` blocks)   the training throughput
On a terminal tqdm draws the bar (smoothing=0: tqdm's rate and ETA are then the same whole-run
figures) and console log records are routed through tqdm so they do not tear the bar. Otherwise
(a log file, CI) no carriage returns are written at all: every `log_interval` seconds one INFO line
  "epoch 3/100 | step 1200/39000 (3.1%) | 1523 img/s | elapsed 0:02:10 | ETA 1:10:05 | loss 1.234"
goes to the `qat` logger (under Hydra: the console and the run's train.log).
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Any, Callable, Iterable

from tqdm import tqdm

log = logging.getLogger(__name__)


def format_seconds(seconds: float) -> str:
    """H:MM:SS (days folded into hours), '?' for an unknown or infinite duration."""
    if seconds is None or not seconds >= 0 or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _prints_to_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) in (sys.stdout, sys.stderr)


class RunProgress:
    """Progress of one training run; see the module docstring for the figures it shows.

    enabled: False shows nothing. interactive: None = whether `stream` (default sys.stderr) is a
    terminal. refresh_interval: the bar's minimum redraw interval (seconds). log_interval: seconds
    between plain lines when not interactive (0 = a line at every step). clock: for tests.
    unit: the label of what `update` counts (img; tok for a language model).
    """

    def __init__(self, total: int, initial: int = 0, *, enabled: bool = True, interactive: bool | None = None,
                 refresh_interval: float = 0.5, log_interval: float = 30.0, stream=None,
                 clock: Callable[[], float] = time.monotonic, unit: str = "img"):
        if not log_interval >= 0:
            raise ValueError(f"trainer.progress_log_interval must be >= 0 seconds, got {log_interval!r}")
        self.initial = int(initial)
        self.total = max(int(total), self.initial)
        self.n = self.initial
        self.enabled = bool(enabled)
        self.stream = stream if stream is not None else sys.stderr
        if interactive is None:
            interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interactive = self.enabled and interactive
        self.log_interval = float(log_interval)
        self.clock = clock
        self.started = self.last_line = clock()
        self.paused_seconds = 0.0
        self.images = 0
        self.unit = unit  # what `update` counts, in the rate's label: img (images), tok (tokens)
        self.description = ""
        self.postfix: dict[str, str] = {}
        self.bar = None
        self._redirect = contextlib.ExitStack()
        if self.interactive:
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(total=self.total, initial=self.initial, unit="step", smoothing=0,
                            dynamic_ncols=True, mininterval=float(refresh_interval), file=self.stream)
            # only loggers that print to the console (tqdm would add a handler to the others)
            consoles = [logger for logger in (logging.getLogger(), logging.getLogger("qat"))
                        if any(_prints_to_console(handler) for handler in logger.handlers)]
            if consoles:
                self._redirect.enter_context(logging_redirect_tqdm(consoles, tqdm_class=tqdm))

    # ----------------------------------------------------------------------------- the figures
    def elapsed(self) -> float:
        return self.clock() - self.started

    def steps_per_second(self) -> float | None:
        elapsed = self.elapsed()
        return (self.n - self.initial) / elapsed if elapsed > 0 and self.n > self.initial else None

    def images_per_second(self) -> float | None:
        training = self.elapsed() - self.paused_seconds
        return self.images / training if training > 0 and self.images else None

    def eta(self) -> float | None:
        rate = self.steps_per_second()
        return (self.total - self.n) / rate if rate else None

    def line(self) -> str:
        parts = [self.description] if self.description else []
        share = self.n / self.total if self.total else 1.0
        parts.append(f"step {self.n}/{self.total} ({share:.1%})")
        images_per_second = self.images_per_second()
        parts.append(f"{images_per_second:.0f} {self.unit}/s" if images_per_second else f"? {self.unit}/s")
        parts.append(f"elapsed {format_seconds(self.elapsed())}")
        parts.append(f"ETA {format_seconds(self.eta())}")
        parts.extend(f"{key} {value}" for key, value in self.postfix.items())
        return " | ".join(parts)

    # ----------------------------------------------------------------------------- updates
    def set_description(self, text: str) -> None:
        self.description = text
        if self.bar is not None:
            self.bar.set_description_str(text, refresh=False)

    def update(self, images: int, **postfix: Any) -> None:
        """One optimizer step on `images` images; postfix values (loss, lr) are shown as given."""
        self.n += 1
        self.images += int(images)
        if postfix:
            self.postfix.update({key: str(value) for key, value in postfix.items()})
        if not self.enabled:
            return
        if self.bar is not None:
            rate = self.images_per_second()
            self.bar.set_postfix_str(", ".join([*(f"{k}={v}" for k, v in self.postfix.items()),
                                                f"{rate:.0f} {self.unit}/s" if rate else f"? {self.unit}/s"]),
                                     refresh=False)
            self.bar.update(1)
            return
        now = self.clock()
        if now - self.last_line >= self.log_interval:
            self.last_line = now
            log.info(self.line())

    @contextlib.contextmanager
    def paused(self):
        """A block (evaluation) whose time counts towards the ETA but not towards img/s."""
        start = self.clock()
        try:
            yield
        finally:
            self.paused_seconds += self.clock() - start

    def wrap(self, iterable: Iterable, desc: str) -> Iterable:
        """A transient sub-bar over `iterable` (evaluation batches) on a terminal; as is otherwise."""
        if not self.interactive:
            return iterable
        return tqdm(iterable, desc=desc, leave=False, unit="batch", dynamic_ncols=True, file=self.stream)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self._redirect.close()
