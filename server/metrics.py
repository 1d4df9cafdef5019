"""The server's Prometheus metrics: one registry per server, the exact names deploy/ relies on.

Request metrics are recorded by the servicer; batching and state-cache metrics by the engine
through `EngineMetrics`, a small object already bound to one model version. Several versions of
one model share the `model` label, so the gauges an engine sets (queue depth, cache bytes) are
summed over the versions rather than overwritten by whichever engine set them last.
"""

from __future__ import annotations

import threading
from typing import NamedTuple
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)

from server.heap import GcPauses

# Recurrent steps take tens of microseconds to milliseconds, so the buckets start far below
# prometheus_client's defaults (5 ms).
REQUEST_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
)  # fmt: skip
TOKEN_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip
QUEUE_BUCKETS = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 1.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def observe_zeros(histogram: Histogram, times: int) -> None:
    """`times` observations of 0 at once, recorded as `times` calls of `observe(0.0)` record
    them: the tokens a Generate response carries after its first each observe an inter-token
    latency of 0, up to 16 a message, and `observe` costs about 1.3 us a call (a lock for the
    sum and one for the bucket). prometheus_client keeps a histogram as its sum and one count a
    bucket (`_sum`, `_buckets`, by `_upper_bounds`), cumulated when read; tests/test_metrics.py
    checks the exposition against repeated `observe` calls, so a change of those internals
    fails there."""
    if times <= 0:
        return
    for bucket, bound in zip(histogram._buckets, histogram._upper_bounds, strict=True):
        if bound >= 0.0:
            bucket.inc(times)
            return


class CacheFamily(NamedTuple):
    """One kind of cache's metrics, labelled by model: `rnnlm_<name>_{hits,misses,evictions}_total`
    and `rnnlm_<name>_bytes`."""

    hits: Counter
    misses: Counter
    evictions: Counter
    size: Gauge


def _cache_family(
    r: CollectorRegistry, name: str, *, hits: str, misses: str, evictions: str, size: str
) -> CacheFamily:
    return CacheFamily(
        Counter(f"rnnlm_{name}_hits_total", hits, ["model"], registry=r),
        Counter(f"rnnlm_{name}_misses_total", misses, ["model"], registry=r),
        Counter(f"rnnlm_{name}_evictions_total", evictions, ["model"], registry=r),
        Gauge(f"rnnlm_{name}_bytes", size, ["model"], registry=r),
    )


class Metrics:
    """Every metric the server exports, registered in its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # `*_created` series would double the series count; nothing in deploy/ reads them.
        disable_created_metrics()
        self.registry = registry if registry is not None else CollectorRegistry()
        self._declare_requests(self.registry)
        self._declare_engines(self.registry)
        self._declare_models(self.registry)
        self._lock = threading.Lock()
        # (gauge, model) -> the gauge's child for the model and {version: value}, the
        # per-version parts it shows the sum of.
        self._parts: dict[tuple[Gauge, str], tuple[Gauge, dict[str, float]]] = {}
        # (method, model, code) -> the children `record_request` updates: `labels()` costs a
        # lock, a sort and a dictionary lookup on every call (bounded: methods, loaded models'
        # names and status codes).
        self._request_children: dict[tuple[str, str, str], tuple[Counter, Histogram]] = {}

    def _declare_requests(self, r: CollectorRegistry) -> None:
        """What the servicer records of each call: its outcome, duration and tokens."""
        self.requests = Counter(
            "rnnlm_requests_total",
            "RPCs answered, by method, model and gRPC status code.",
            ["method", "model", "code"],
            registry=r,
        )
        self.request_duration = Histogram(
            "rnnlm_request_duration_seconds",
            "Time from the start of an RPC to its last response.",
            ["method", "model"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "rnnlm_time_to_first_token_seconds",
            "Time from the start of a Generate call to its first generated token.",
            ["model"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "rnnlm_inter_token_latency_seconds",
            "Time between consecutive generated tokens of one Generate call.",
            ["model"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.generated_tokens = Counter(
            "rnnlm_generated_tokens_total",
            "Tokens generated by Generate.",
            ["model"],
            registry=r,
        )
        self.scored_tokens = Counter(
            "rnnlm_scored_tokens_total",
            "Tokens scored by Score.",
            ["model"],
            registry=r,
        )
        self.active_streams = Gauge(
            "rnnlm_active_streams",
            "Open Generate and TypingSession streams.",
            ["model"],
            registry=r,
        )

    def _declare_engines(self, r: CollectorRegistry) -> None:
        """What the engines record of their batches, queues and caches."""
        self.queue_wait = Histogram(
            "rnnlm_queue_wait_seconds",
            "Time a unit of work waited in the engine's queue before its batched run.",
            ["model"],
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "rnnlm_batch_size",
            "Requests per batched onnxruntime run.",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "rnnlm_queue_depth",
            "Requests waiting in the engine's queue.",
            ["model"],
            registry=r,
        )
        self.state_cache_family = _cache_family(
            r,
            "state_cache",
            hits="State-cache lookups that found a cached prefix state.",
            misses="State-cache lookups that found nothing to reuse.",
            evictions="States evicted from the state cache to keep it within its byte bound.",
            size="Bytes of hidden state held in the state cache.",
        )
        self.recall_cache_family = _cache_family(
            r,
            "recall_cache",
            hits="Cached next-token calls that found the features of a context they extend.",
            misses="Cached next-token calls that had to feed their context's window again.",
            evictions="Contexts evicted from the recall cache to keep it within its byte bound.",
            size="Bytes of states and features held in the recall cache.",
        )

    def _declare_models(self, r: CollectorRegistry) -> None:
        """What the repository records of the models it loads, and the process's pauses."""
        self.model_info = Gauge(
            "rnnlm_model_info",
            "A loaded model version (value 1), with its execution provider and cell.",
            ["model", "version", "provider", "cell"],
            registry=r,
        )
        self.model_load_failures = Counter(
            "rnnlm_model_load_failures_total",
            "Bundles a start or a reload could not load (the others, and the versions already "
            "loaded, kept serving).",
            ["model"],
            registry=r,
        )
        self.bundles_failing = Gauge(
            "rnnlm_model_bundles_failing",
            "Bundles in the model repository that are not served because they failed to load "
            "(at start, or at the last reload that tried them).",
            registry=r,
        )
        # rnnlm_gc_pause_seconds: the garbage collector's pauses, once the server starts it.
        self.gc_pauses = GcPauses(r)

    def engine_metrics(self, model: str, version: str) -> EngineMetrics:
        """The recorder an engine for `model` `version` reports its batching and cache to."""
        return EngineMetrics(self, model, version)

    def set_model_info(self, model: str, version: str, provider: str, cell: str) -> None:
        self.model_info.labels(model=model, version=version, provider=provider, cell=cell).set(1)

    def record_request(self, method: str, model: str, code: str, seconds: float) -> None:
        """Count one answered RPC by method, model and status code, and observe how long it
        took (`rnnlm_requests_total`, `rnnlm_request_duration_seconds`)."""
        key = (method, model, code)
        children = self._request_children.get(key)
        if children is None:
            children = (
                self.requests.labels(method=method, model=model, code=code),
                self.request_duration.labels(method=method, model=model),
            )
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def remove_model_info(self, model: str, version: str, provider: str, cell: str) -> None:
        """Forget an unloaded model version: its info series and its shares of the gauges."""
        self.model_info.remove(model, version, provider, cell)
        with self._lock:
            for (_, name), (child, parts) in self._parts.items():
                if name == model and parts.pop(version, None) is not None:
                    child.set(sum(parts.values()))

    def set_version_part(self, gauge: Gauge, model: str, version: str, value: float) -> None:
        """Set one version's share of a per-model gauge; the gauge shows the sum of the shares."""
        with self._lock:
            known = self._parts.get((gauge, model))
            if known is None:
                known = self._parts[(gauge, model)] = (gauge.labels(model=model), {})
            child, parts = known
            if parts.get(version) == value:
                return  # unchanged (a full cache's insert evicts as many bytes as it adds)
            parts[version] = value
            child.set(sum(parts.values()))


class EngineMetrics:
    """What one engine (one model version) records: batching, queueing and its two caches.

    The labelled children are looked up once here: the engine calls these on every step and
    every cache lookup, and `labels()` costs a lock and a dictionary lookup each time.
    """

    def __init__(self, metrics: Metrics, model: str, version: str) -> None:
        self.metrics, self.model, self.version = metrics, model, version
        self._batch_size = metrics.batch_size.labels(model=model)
        self._queue_wait = metrics.queue_wait.labels(model=model)
        self.state_cache = CacheRecorder(self, metrics.state_cache_family)
        self.recall_cache = CacheRecorder(self, metrics.recall_cache_family)
        # The load gauges exist from the start, so "at rest" reads 0 rather than no series.
        self.set_queue_depth(0)
        metrics.active_streams.labels(model=model)

    def observe_batch(self, size: int) -> None:
        self._batch_size.observe(size)

    def observe_no_wait(self, requests: int) -> None:
        """A queue wait of 0 for each of `requests` run at once on the caller's thread."""
        observe_zeros(self._queue_wait, requests)

    def observe_queue_wait(self, seconds: float) -> None:
        self._queue_wait.observe(seconds)

    def set_queue_depth(self, n: int) -> None:
        self.metrics.set_version_part(self.metrics.queue_depth, self.model, self.version, n)


class CacheRecorder:
    """What one of an engine's caches records (the `CacheMetrics` a `StateCache` reports to)."""

    def __init__(self, engine: EngineMetrics, family: CacheFamily) -> None:
        self._engine = engine
        self._hits = family.hits.labels(model=engine.model)
        self._misses = family.misses.labels(model=engine.model)
        self._evictions = family.evictions.labels(model=engine.model)
        self._size = family.size

    def cache_hit(self) -> None:
        self._hits.inc()

    def cache_miss(self) -> None:
        self._misses.inc()

    def cache_evict(self) -> None:
        self._evictions.inc()

    def set_cache_bytes(self, n: int) -> None:
        e = self._engine
        e.metrics.set_version_part(self._size, e.model, e.version, n)


class MetricsServer:
    """The /metrics HTTP endpoint, served from a daemon thread; port 0 picks a free port."""

    def __init__(self, metrics: Metrics | CollectorRegistry, host: str, port: int) -> None:
        registry = metrics if isinstance(metrics, CollectorRegistry) else metrics.registry
        self._httpd: WSGIServer
        self._thread: threading.Thread
        self._httpd, self._thread = start_http_server(port, addr=host, registry=registry)
        self.port: int = self._httpd.server_port

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
