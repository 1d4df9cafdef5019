"""The metrics: exactly the names deploy/ relies on, Prometheus naming rules, the endpoint."""

from __future__ import annotations

import re
import shutil
import subprocess
import urllib.request

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import Metrics, MetricsServer, observe_zeros

# name (as exposed, without _bucket/_count/_sum) -> (type, labels); from COMMON.md.
EXPECTED = {
    "rnnlm_requests_total": ("counter", {"method", "model", "code"}),
    "rnnlm_request_duration_seconds": ("histogram", {"method", "model"}),
    "rnnlm_time_to_first_token_seconds": ("histogram", {"model"}),
    "rnnlm_inter_token_latency_seconds": ("histogram", {"model"}),
    "rnnlm_queue_wait_seconds": ("histogram", {"model"}),
    "rnnlm_batch_size": ("histogram", {"model"}),
    "rnnlm_generated_tokens_total": ("counter", {"model"}),
    "rnnlm_scored_tokens_total": ("counter", {"model"}),
    "rnnlm_active_streams": ("gauge", {"model"}),
    "rnnlm_queue_depth": ("gauge", {"model"}),
    "rnnlm_state_cache_hits_total": ("counter", {"model"}),
    "rnnlm_state_cache_misses_total": ("counter", {"model"}),
    "rnnlm_state_cache_evictions_total": ("counter", {"model"}),
    "rnnlm_state_cache_bytes": ("gauge", {"model"}),
    "rnnlm_recall_cache_hits_total": ("counter", {"model"}),
    "rnnlm_recall_cache_misses_total": ("counter", {"model"}),
    "rnnlm_recall_cache_evictions_total": ("counter", {"model"}),
    "rnnlm_recall_cache_bytes": ("gauge", {"model"}),
    "rnnlm_model_info": ("gauge", {"model", "version", "provider", "cell"}),
    "rnnlm_model_load_failures_total": ("counter", {"model"}),
    "rnnlm_model_bundles_failing": ("gauge", set()),
    "rnnlm_gc_pause_seconds": ("histogram", {"generation"}),
}


def _exercise(metrics: Metrics) -> None:
    """Touch every metric once so that each has a sample to expose."""
    metrics.requests.labels(method="Score", model="m", code="OK").inc()
    metrics.request_duration.labels(method="Score", model="m").observe(0.01)
    metrics.time_to_first_token.labels(model="m").observe(0.01)
    metrics.inter_token_latency.labels(model="m").observe(0.001)
    metrics.generated_tokens.labels(model="m").inc(3)
    metrics.scored_tokens.labels(model="m").inc(5)
    metrics.active_streams.labels(model="m").inc()
    metrics.set_model_info("m", "1", "CPUExecutionProvider", "lstm")
    metrics.model_load_failures.labels(model="m").inc()
    engine = metrics.engine_metrics("m", "1")
    engine.observe_batch(4)
    engine.observe_queue_wait(0.0002)
    engine.set_queue_depth(2)
    for cache in (engine.state_cache, engine.recall_cache):
        cache.cache_hit()
        cache.cache_miss()
        cache.cache_evict()
        cache.set_cache_bytes(1024)


def _families(metrics: Metrics) -> dict:
    from prometheus_client import generate_latest

    text = generate_latest(metrics.registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def _exposed_name(family) -> str:  # type: ignore[no-untyped-def]
    # The parser strips _total from counter family names.
    return family.name + "_total" if family.type == "counter" else family.name


def test_exactly_the_documented_metrics_with_their_labels() -> None:
    metrics = Metrics()
    _exercise(metrics)
    families = _families(metrics)
    exposed = {_exposed_name(f): f for f in families.values() if f.name.startswith("rnnlm_")}
    assert set(exposed) == set(EXPECTED)
    for name, (kind, labels) in EXPECTED.items():
        family = exposed[name]
        assert family.type == kind, name
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == labels, (name, sample.labels)


def test_zeros_observed_at_once_read_as_observed_one_by_one() -> None:
    """`observe_zeros` (the inter-token latencies of a response's later tokens) leaves the
    histogram as that many `observe(0.0)` calls would: the same buckets, count and sum."""
    m = Metrics()
    one_by_one = m.inter_token_latency.labels(model="a")
    at_once = m.inter_token_latency.labels(model="b")
    for child in (one_by_one, at_once):
        child.observe(0.003)
    for _ in range(7):
        one_by_one.observe(0.0)
    observe_zeros(at_once, 7)
    observe_zeros(at_once, 0)

    def series(model: str) -> dict[tuple[str, str], float]:
        return {
            (s.name, s.labels.get("le", "")): s.value
            for family in text_string_to_metric_families(generate_latest(m.registry).decode())
            if family.name == "rnnlm_inter_token_latency_seconds"
            for s in family.samples
            if s.labels.get("model") == model
        }

    assert series("a") == series("b")
    assert series("b")[("rnnlm_inter_token_latency_seconds_count", "")] == 8


def test_names_follow_prometheus_conventions() -> None:
    """What `promtool check metrics` checks: snake_case, _total only on counters, base units."""
    metrics = Metrics()
    _exercise(metrics)
    for family in _families(metrics).values():
        name = _exposed_name(family)
        assert re.fullmatch(r"[a-z][a-z0-9_]*", name), name
        assert name.endswith("_total") == (family.type == "counter"), name
        assert "_total" not in name.removesuffix("_total"), name
        assert not re.search(r"_(milliseconds|ms|microseconds|kilobytes|megabytes)", name), name
        assert family.documentation, f"{name} has no help text"
        if family.type == "histogram" and name != "rnnlm_batch_size":
            assert name.endswith("_seconds"), name


def test_engine_gauges_sum_over_versions_of_a_model() -> None:
    metrics = Metrics()
    v1, v2 = metrics.engine_metrics("m", "1"), metrics.engine_metrics("m", "2")
    v1.set_queue_depth(3)
    v2.set_queue_depth(4)
    v1.state_cache.set_cache_bytes(100)
    v2.state_cache.set_cache_bytes(50)
    v1.recall_cache.set_cache_bytes(7)
    v1.set_queue_depth(1)
    assert metrics.registry.get_sample_value("rnnlm_queue_depth", {"model": "m"}) == 5
    assert metrics.registry.get_sample_value("rnnlm_state_cache_bytes", {"model": "m"}) == 150
    assert metrics.registry.get_sample_value("rnnlm_recall_cache_bytes", {"model": "m"}) == 7
    v1.state_cache.cache_hit()
    v2.state_cache.cache_hit()
    assert metrics.registry.get_sample_value("rnnlm_state_cache_hits_total", {"model": "m"}) == 2


def test_a_version_part_set_again_or_removed_keeps_the_sum() -> None:
    """A part set to the value it holds changes nothing; a removed version leaves the rest."""
    metrics = Metrics()
    v1, v2 = metrics.engine_metrics("m", "1"), metrics.engine_metrics("m", "2")
    v1.state_cache.set_cache_bytes(100)
    v2.state_cache.set_cache_bytes(50)
    v1.state_cache.set_cache_bytes(100)
    assert metrics.registry.get_sample_value("rnnlm_state_cache_bytes", {"model": "m"}) == 150
    metrics.remove_model_info("m", "1", "CPUExecutionProvider", "lstm")
    assert metrics.registry.get_sample_value("rnnlm_state_cache_bytes", {"model": "m"}) == 50
    v2.state_cache.set_cache_bytes(50)
    assert metrics.registry.get_sample_value("rnnlm_state_cache_bytes", {"model": "m"}) == 50


def test_record_request_counts_each_label_set_apart() -> None:
    metrics = Metrics()
    metrics.record_request("PredictNext", "m", "OK", 0.002)
    metrics.record_request("PredictNext", "m", "OK", 0.003)
    metrics.record_request("PredictNext", "m", "INVALID_ARGUMENT", 0.001)
    metrics.requests.labels(method="PredictNext", model="m", code="OK").inc()  # the same child
    sample = metrics.registry.get_sample_value
    ok = {"method": "PredictNext", "model": "m", "code": "OK"}
    assert sample("rnnlm_requests_total", ok) == 3
    assert sample("rnnlm_requests_total", {**ok, "code": "INVALID_ARGUMENT"}) == 1
    labels = {"method": "PredictNext", "model": "m"}
    assert sample("rnnlm_request_duration_seconds_count", labels) == 3
    assert sample("rnnlm_request_duration_seconds_sum", labels) == pytest.approx(0.006)
    assert sample("rnnlm_request_duration_seconds_bucket", {**labels, "le": "0.001"}) == 1


def test_a_loaded_engine_reports_its_load_gauges_at_zero() -> None:
    """Before any request: alerts and dashboards see 0, not a missing series."""
    metrics = Metrics()
    metrics.engine_metrics("m", "1")
    for gauge in ("rnnlm_queue_depth", "rnnlm_active_streams"):
        assert metrics.registry.get_sample_value(gauge, {"model": "m"}) == 0


def test_registries_are_independent() -> None:
    """Two servers in one process (as in the tests) must not share or clash on metrics."""
    a, b = Metrics(), Metrics()
    a.generated_tokens.labels(model="m").inc(7)
    assert b.registry.get_sample_value("rnnlm_generated_tokens_total", {"model": "m"}) is None


def test_the_endpoint_serves_the_registry_on_a_free_port() -> None:
    metrics = Metrics()
    _exercise(metrics)
    server = MetricsServer(metrics, "127.0.0.1", 0)
    try:
        assert server.port > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as r:
            text = r.read().decode()
    finally:
        server.close()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    assert samples[("rnnlm_generated_tokens_total", (("model", "m"),))] == 3
    info = (
        ("cell", "lstm"),
        ("model", "m"),
        ("provider", "CPUExecutionProvider"),
        ("version", "1"),
    )
    assert samples[("rnnlm_model_info", info)] == 1


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_finds_nothing_to_complain_about() -> None:
    """The real linter, where it is installed (Debian's `prometheus` package has it)."""
    from prometheus_client import generate_latest

    metrics = Metrics()
    _exercise(metrics)
    result = subprocess.run(
        ["promtool", "check", "metrics"],
        input=generate_latest(metrics.registry),
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert result.stdout.strip() == b"", result.stdout.decode()
