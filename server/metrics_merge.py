"""The one /metrics of `rnnlm serve --processes N`: the workers' metrics read and combined.

Each worker serves its own registry on a loopback port; at every scrape the supervisor reads
them all and combines each series (same name, same labels) over the workers by `combine_rule`:
counters and histograms (buckets, counts, sums) and gauges are summed, so the pod reads as one
server, except the info-like gauges in `MAX_FAMILIES`, which every worker reports alike. Two
series of its own say what it read: `rnnlm_worker_up{worker,pid}` (1 when that worker's
/metrics answered this scrape) and `rnnlm_worker_requests_total{worker}` (its RPCs answered).
"""

from __future__ import annotations

import logging
import operator
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)

# Families whose value is the same in every worker (what is loaded, what failed to load).
MAX_FAMILIES = frozenset({"rnnlm_model_info", "rnnlm_model_bundles_failing"})
REQUESTS_FAMILY = "rnnlm_requests"  # rnnlm_requests_total, as the parser names the family
READ_SECONDS = 5.0

Combine = Callable[[float, float], float]
SeriesKey = tuple[str, tuple[tuple[str, str], ...]]


def combine_rule(family: str) -> Combine:
    """How one family's series combine over the workers: the one table of rules."""
    return max if family in MAX_FAMILIES else operator.add


@dataclass(frozen=True)
class WorkerTarget:
    index: int
    pid: int
    metrics_port: int


def merge(texts: Iterable[str]) -> list[Metric]:
    """Combine Prometheus text expositions into families, in the order first seen."""
    families: dict[str, Metric] = {}
    series: dict[str, dict[SeriesKey, tuple[dict[str, str], float]]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type)
                series[family.name] = {}
            combine, found = combine_rule(family.name), series[family.name]
            for s in family.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                old = found.get(key)
                found[key] = (s.labels, s.value if old is None else combine(old[1], s.value))
    for name, metric in families.items():
        for (sample_name, _), (labels, value) in series[name].items():
            metric.add_sample(sample_name, labels, value)
    return list(families.values())


def requests_answered(text: str) -> float:
    """The sum of one worker's rnnlm_requests_total series."""
    for family in text_string_to_metric_families(text):
        if family.name == REQUESTS_FAMILY:
            return sum(s.value for s in family.samples if s.name == REQUESTS_FAMILY + "_total")
    return 0.0


def read(target: WorkerTarget) -> str | None:
    """One worker's /metrics, or None (logged) when it does not answer."""
    url = f"http://127.0.0.1:{target.metrics_port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=READ_SECONDS) as reply:
            text: str = reply.read().decode("utf-8")
            return text
    except OSError as e:
        log.warning("worker %d (pid %d): /metrics not read: %s", target.index, target.pid, e)
        return None


class WorkersCollector:
    """A prometheus_client collector: at each collect, the workers' metrics merged."""

    def __init__(self, targets: Callable[[], Sequence[WorkerTarget]]) -> None:
        self._targets = targets

    def collect(self) -> Iterator[Metric]:
        targets = self._targets()
        texts = [read(t) for t in targets]
        yield from merge(t for t in texts if t is not None)
        up = Metric(
            "rnnlm_worker_up", "A worker process whose /metrics answered (1) or not.", "gauge"
        )
        answered = Metric(
            "rnnlm_worker_requests", "RPCs answered by each worker process.", "counter"
        )
        for target, text in zip(targets, texts, strict=True):
            worker = str(target.index)
            up.add_sample(
                "rnnlm_worker_up",
                {"worker": worker, "pid": str(target.pid)},
                float(text is not None),
            )
            if text is not None:
                answered.add_sample(
                    "rnnlm_worker_requests_total", {"worker": worker}, requests_answered(text)
                )
        yield up
        yield answered
