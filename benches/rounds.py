"""The timing discipline every benchmark here shares: contenders interleaved round by round (so
machine noise hits each alike), warm-up calls first, no garbage collection while timing, the
median of the rounds.

A sample is the mean of back-to-back calls of one contender lasting about ``sample_s`` in all.
Timed alone, a few-millisecond call pays for whatever the contender before it did to the caches
(a dense one evicts its inputs; one on the same inputs leaves them warm), so its time would hang
on its place in the round rather than on its own work."""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable


def wall(call: Callable[[], object]) -> float:
    """Seconds ``call()`` takes on the wall clock."""
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def interleaved(
    calls: dict,
    rounds: int,
    timer: Callable = wall,
    warmups: int = 1,
    sample_s: float = 0.025,
) -> dict[str, float]:
    """Median seconds per call of ``calls`` (name -> zero-argument callable) over ``rounds``
    rounds, each round taking one sample of every call with ``timer``."""
    for call in calls.values():
        for _ in range(warmups - 1):
            call()
    samplers = {name: repeated(call, timer, sample_s) for name, call in calls.items()}
    samples = {name: [] for name in calls}
    # As timeit does: no collection inside the timed rounds (a full collection after importing
    # torch takes over 100 ms, and would land on whichever contender is running).
    gc.collect()
    gc.disable()
    try:
        for _ in range(rounds):
            for name, sample in samplers.items():
                samples[name].append(sample())
    finally:
        gc.enable()
    return {name: statistics.median(ts) for name, ts in samples.items()}


def repeated(call: Callable[[], object], timer: Callable, sample_s: float) -> Callable[[], float]:
    """A sampler of ``call``: times as many back-to-back calls as fill about ``sample_s``
    (judged by one warm-up call, itself timed) and returns the seconds per call."""
    count = max(1, math.ceil(sample_s / max(timer(call), 1e-9)))

    def calls() -> None:
        for _ in range(count):
            call()

    return lambda: timer(calls) / count
