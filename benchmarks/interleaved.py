"""One job: time several candidates on a shared machine, interleaved round by round."""
from __future__ import annotations

import time
from typing import Callable


def interleaved_min(fns: dict[str, Callable[[], object]], rounds: int, repeat: int = 1) -> dict[str, float]:
    """Min wall time (s) of each fn over ``rounds`` rounds, candidates interleaved per round, after
    one warm-up call each (thread pools, first-call allocations): load on a shared machine hits
    every candidate alike, and the minimum is the least noisy statistic.  With ``repeat`` > 1 a
    round times that many calls in a row and counts their mean (for calls of a fraction of a
    millisecond, where one call's time is mostly timer and scheduling noise; the candidates
    then run with their own data in cache, as a server answering requests one by one does)."""
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(repeat):
                fn()
            best[name] = min(best[name], (time.perf_counter() - start) / repeat)
    return best
