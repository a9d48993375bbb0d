"""The timing discipline every benchmark here shares: contenders interleaved round by round (so
machine noise hits each alike), warm-up calls first, no garbage collection while timing, the
median of the rounds."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable


def wall(call: Callable[[], object]) -> float:
    """Seconds ``call()`` takes on the wall clock."""
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def interleaved(
    calls: dict, rounds: int, timer: Callable = wall, warmups: int = 1
) -> dict[str, float]:
    """Median seconds per call of ``calls`` (name -> zero-argument callable) over ``rounds``
    rounds, each round timing every call once with ``timer``."""
    for call in calls.values():
        for _ in range(warmups):
            call()
    samples = {name: [] for name in calls}
    # As timeit does: no collection inside the timed rounds (a full collection after importing
    # torch takes over 100 ms, and would land on whichever contender is running).
    gc.collect()
    gc.disable()
    try:
        for _ in range(rounds):
            for name, call in calls.items():
                samples[name].append(timer(call))
    finally:
        gc.enable()
    return {name: statistics.median(ts) for name, ts in samples.items()}
