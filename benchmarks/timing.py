"""Bounded timing loops and the statistics every measurement reports.

Every loop stops at a call count or a time budget, whichever comes first (after at least one
call), so a slow or busy machine makes a run less precise, never endless. A measurement is
repeated in trials; each trial gives its own figures and the report shows the median of each
figure over the trials, with every trial kept in the JSON.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from statistics import median
from typing import Any

import numpy as np


class BenchError(Exception):
    """The benchmark cannot run as asked; the message names the option, file or process."""


def time_calls(
    fn: Callable[[int], object], count: int, seconds: float, pause: float = 0.0
) -> list[float]:
    """Seconds taken by each `fn(i)`, for up to `count` calls or `seconds` of calls.

    `pause`: seconds to sleep before each call (untimed), as a request/response client
    leaves the server idle between its calls.
    """
    samples: list[float] = []
    end = time.perf_counter() + seconds
    for i in range(count):
        if pause:
            time.sleep(pause)
        start = time.perf_counter()
        fn(i)
        now = time.perf_counter()
        samples.append(now - start)
        if now >= end:
            break
    return samples


async def time_calls_async(
    fn: Callable[[int], Awaitable[object]], count: int, seconds: float
) -> list[float]:
    """`time_calls` for coroutines: one call at a time (concurrency 1)."""
    samples: list[float] = []
    end = time.perf_counter() + seconds
    for i in range(count):
        start = time.perf_counter()
        await fn(i)
        now = time.perf_counter()
        samples.append(now - start)
        if now >= end:
            break
    return samples


def latency(samples: list[float], tokens_per_call: int = 0) -> dict[str, float]:
    """p50/p90/p99/mean in milliseconds, the sample count and, if given, tokens/s at p50."""
    if not samples:
        raise BenchError("a measurement produced no samples")
    ms = np.array(samples) * 1e3
    p50, p90, p99 = (float(v) for v in np.percentile(ms, [50, 90, 99]))
    out = {
        "n": float(len(ms)),
        "p50_ms": p50,
        "p90_ms": p90,
        "p99_ms": p99,
        "mean_ms": float(ms.mean()),
    }
    if tokens_per_call:
        out["tokens_per_s"] = tokens_per_call / (p50 / 1e3)
    return out


def over_trials(trials: list[dict[str, float]]) -> dict[str, Any]:
    """The median over trials of every figure, with the trials themselves under "trials"."""
    if not trials:
        raise BenchError("a measurement ran no trials")
    keys = [k for k in trials[0] if all(isinstance(t.get(k), int | float) for t in trials)]
    summary: dict[str, Any] = {k: float(median(float(t[k]) for t in trials)) for k in keys}
    summary["trials"] = trials
    return summary
