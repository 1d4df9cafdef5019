"""The server process's garbage collector: the objects of the served models kept out of its
collections, and the pauses of the collections that run, measured.

A served model brings tens of thousands of long-lived objects (its tokenizer's token texts, the
word indexes, the unknown words), and Python's oldest generation walks every one of them at each
full collection: 40 to 60 ms under 200 typists of the default word bundle, as long as ten
keystrokes' answers, during which nothing else runs; none of them ever found garbage there.
`settle()` collects once and moves what is alive to the permanent generation (`gc.freeze`), so
full collections walk only what came later (5 to 15 ms, the same load). The server settles when
it starts serving and whenever its models change (a reload that loads or unloads, a retired
version closed), unfreezing first, so that what an unloaded model leaves in reference cycles is
collected rather than kept.

`GcPauses` times every collection into the `rnnlm_gc_pause_seconds` histogram (by generation).
Its callback runs inside the collector, in whichever thread allocated: it takes no lock and
calls nothing that could, only counts; the registry reads the counts when scraped.
"""

from __future__ import annotations

import bisect
import gc
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

PAUSE_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
GENERATIONS = 3


def settle() -> float:
    """Collect everything, then freeze what is alive; the seconds it took (one full
    collection's pause, on the thread that calls it)."""
    start = time.perf_counter()
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    return time.perf_counter() - start


class GcPauses(Collector):
    """The collector's pauses in this process, by generation, as a Prometheus histogram in
    `registry` (all zero until `start()` hooks it into the collector; `stop()` unhooks it)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        registry.register(self)
        # Per generation: the count of pauses in each bucket (the last: above every bound),
        # and their sum in seconds.
        self._counts = [[0] * (len(PAUSE_BUCKETS) + 1) for _ in range(GENERATIONS)]
        self._sums = [0.0] * GENERATIONS
        self._began = 0.0

    def start(self) -> None:
        if self._observe not in gc.callbacks:
            gc.callbacks.append(self._observe)

    def stop(self) -> None:
        if self._observe in gc.callbacks:
            gc.callbacks.remove(self._observe)

    def _observe(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
            return
        generation = min(int(info["generation"]), GENERATIONS - 1)
        seconds = time.perf_counter() - self._began
        self._counts[generation][bisect.bisect_left(PAUSE_BUCKETS, seconds)] += 1
        self._sums[generation] += seconds

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(
            "rnnlm_gc_pause_seconds",
            "Pauses of Python's garbage collector in this process, by generation (nothing else "
            "runs meanwhile).",
            labels=["generation"],
        )
        for generation in range(GENERATIONS):
            counts = list(self._counts[generation])
            running, buckets = 0, []
            for bound, count in zip((*PAUSE_BUCKETS, float("inf")), counts, strict=True):
                running += count
                buckets.append((_bound(bound), running))
            family.add_metric([str(generation)], buckets, self._sums[generation])
        yield family


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)
