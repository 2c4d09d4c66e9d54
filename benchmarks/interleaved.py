"""One job: time several candidates on a shared machine, interleaved round by round."""
from __future__ import annotations

import time
from typing import Callable

import torch


def interleaved_min(fns: dict[str, Callable[[], object]], rounds: int, repeat: int = 1,
                    before: Callable[[], object] | None = None) -> dict[str, float]:
    """Min wall time (s) of each fn over ``rounds`` rounds, candidates interleaved per round, after
    one warm-up call each (thread pools, first-call allocations): load on a shared machine hits
    every candidate alike, and the minimum is the least noisy statistic.  With ``repeat`` > 1 a
    round times that many calls in a row and counts their mean (for calls of a fraction of a
    millisecond, where one call's time is mostly timer and scheduling noise; the candidates
    then run with their own data in cache, as a server answering requests one by one does).
    ``before``, when given, runs untimed before every timed call (e.g. a ``CacheEvictor``, so that
    every candidate starts from the same cache state instead of the one its predecessor left).
    The order rotates by one candidate per round, so that none always runs right after the same
    other one (whatever state a predecessor leaves, every candidate meets it in some rounds)."""
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    order = list(fns.items())
    for round_index in range(rounds):
        shift = round_index % len(order)
        for name, fn in order[shift:] + order[:shift]:
            if before is not None:
                before()
            start = time.perf_counter()
            for _ in range(repeat):
                fn()
            best[name] = min(best[name], (time.perf_counter() - start) / repeat)
    return best


class CacheEvictor:
    """Calling it reads a buffer larger than the last-level cache, so that whatever a candidate
    reads next comes from memory: the state a layer's weights are in when the rest of a model ran
    in between.  64 MiB covers the 32 MiB L3 of the EPYC parts this project runs on.  It reads
    rather than writes: written lines are dirty, and writing them back would take memory
    bandwidth from the candidate that follows (measured: a 2 MiB packed GEMV took 0.24-0.28 ms
    after a 64 MiB write, 0.17-0.20 ms after a 64 MiB read)."""

    def __init__(self, size_bytes: int = 64 << 20):
        self._buffer = torch.ones(size_bytes // 4, dtype=torch.float32)

    def __call__(self) -> None:
        self._buffer.sum()
