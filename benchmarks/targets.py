"""The issue's targets, as ratios of figures from one run, each PASS, FAIL or n/a.

A target is n/a when the run did not measure what it needs (no `--checkpoint`, no
`--int8-bundle`, no /proc); its `detail` says what is missing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

RSS_LIMIT_MB = 300.0


@dataclass(frozen=True)
class Target:
    key: str
    rule: str  # the target in words
    value: float | None  # the measured ratio (or figure); None when not measured
    op: str  # "<=" or ">="
    threshold: float
    detail: str  # how the value was computed, with the figures

    @property
    def status(self) -> str:
        if self.value is None:
            return "n/a"
        ok = self.value <= self.threshold if self.op == "<=" else self.value >= self.threshold
        return "PASS" if ok else "FAIL"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "status": self.status}


def _get(data: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


@dataclass(frozen=True)
class Diagnostic:
    """A ratio with no threshold that explains where a target's figure comes from."""

    key: str
    what: str
    value: float | None
    detail: str


def _quotient(
    num: float | None, den: float | None, formula: str, missing: str
) -> tuple[float | None, str]:
    """num / den and how it was computed; None and what is missing when either is."""
    if num is None or den is None or den == 0:
        return None, f"not measured: {missing}"
    return num / den, f"{formula} = {num:.4g} / {den:.4g}"


def _ratio(
    key: str,
    rule: str,
    op: str,
    threshold: float,
    num: float | None,
    den: float | None,
    formula: str,
    missing: str,
) -> Target:
    """A target on the ratio num / den (n/a when either is missing)."""
    value, detail = _quotient(num, den, formula, missing)
    return Target(key, rule, value, op, threshold, detail)


def compute(results: dict[str, Any]) -> list[Target]:
    """Every target from a run's results (the structure `benchmarks.cli` writes to JSON)."""

    get = functools.partial(_get, results)
    return [
        *_cpu_targets(get),
        *_latency_targets(get),
        *_server_ratio_targets(get),
        *_int8_and_memory_targets(get),
    ]


def _cpu_targets(get: Callable[..., Any]) -> list[Target]:
    on = ("server", "batching_on")
    engine = [
        _ratio(
            f"engine_vs_bare_{n}",
            f"the engine in-process, Generate at {n} streams >= 0.9 x bare batch-{n} step "
            "throughput",
            ">=",
            0.9,
            get("engine", "generate", str(n), "tokens_per_s"),
            get("engine", "generate", str(n), "bare_tokens_per_s"),
            f"engine tokens/s / bare batch-{n} tokens/s, trials alternating",
            f"needs the in-process engine and a batch-{n} step",
        )
        for n in (64, 256)
    ]
    return [
        _ratio(
            "server_cpu_per_token",
            "server CPU per generated token at 64 streams <= 1.25 x bare onnxruntime's at "
            "batch 64 on one thread",
            "<=",
            1.25,
            get(*on, "generate", "64", "server_cpu_us_per_token"),
            get("bare", "step_b64", "cpu_us_per_token"),
            "server CPU us/token / bare CPU us/token",
            "needs /proc and 64 streams",
        ),
        *engine,
    ]


def _latency_targets(get: Callable[..., Any]) -> list[Target]:
    on = ("server", "batching_on")
    idle, echo = get("bare", "step_b1_after_idle", "p50_ms"), get("echo", "p50_ms")
    floor = None if idle is None or echo is None else idle + echo
    under = ("under_load", "predict", "p99_ms"), ("under_load", "first_token", "p99_ms")
    predict_load, first_load = (get(*on, *path) for path in under)
    return [
        _ratio(
            "predict_next_latency",
            "PredictNext p50 at concurrency 1 <= 1.2 x (bare batch-1 step after a 1 ms idle "
            "gap p50 + echo p50)",
            "<=",
            1.2,
            get(*on, "predict_c1", "p50_ms"),
            floor,
            "PredictNext p50 ms / (bare step after idle p50 ms + echo p50 ms)",
            "needs the server, bare and echo runs",
        ),
        Target(
            "predict_under_load",
            "PredictNext while 64 long Generate streams run answered within 50 ms (p99, ms)",
            predict_load,
            "<=",
            50.0,
            "p99 ms of PredictNext calls one at a time under the load"
            if predict_load is not None
            else "not measured: needs the server under load",
        ),
        Target(
            "first_token_under_load",
            "a 65th Generate stream gets its first token within 50 ms (p99, ms)",
            first_load,
            "<=",
            50.0,
            "p99 ms to the first token of a new stream beside 64 long ones"
            if first_load is not None
            else "not measured: needs the server under load",
        ),
    ]


def _server_ratio_targets(get: Callable[..., Any]) -> list[Target]:
    on = ("server", "batching_on")
    score = get(*on, "score", "tokens_per_s")
    alternating = get(*on, "score", "bare_tokens_per_s")  # bare beside each server trial
    return [
        _ratio(
            "generate_vs_no_batching",
            "Generate at 64 streams >= 3 x the same server with batching off",
            ">=",
            3.0,
            get(*on, "generate", "64", "tokens_per_s"),
            get("server", "batching_off", "generate", "64", "tokens_per_s"),
            "batching on tokens/s / batching off tokens/s",
            "needs 64 streams with batching on and off",
        ),
        _ratio(
            "score_vs_bare",
            "Score >= 0.8 x bare onnxruntime scoring of the same document",
            ">=",
            0.8,
            score,
            alternating if alternating is not None else get("bare", "score", "tokens_per_s"),
            "server Score tokens/s / bare tokens/s"
            + (", trials alternating" if alternating is not None else ""),
            "needs the server and bare scoring",
        ),
        _ratio(
            "score_vs_torch",
            "Score >= 1.5 x the better PyTorch eager (oneDNN on or off)",
            ">=",
            1.5,
            score,
            get("torch", "best", "score", "tokens_per_s"),
            "server Score tokens/s / PyTorch eager tokens/s",
            "give --checkpoint to measure PyTorch eager",
        ),
        _ratio(
            "cached_context",
            "PredictNext extending a cached 1000-token context <= 1.3 x a 10-token one",
            "<=",
            1.3,
            get(*on, "predict_context", "1000", "p50_ms"),
            get(*on, "predict_context", "10", "p50_ms"),
            "p50 ms at 1000 tokens / p50 ms at 10 tokens",
            "needs context lengths 10 and 1000",
        ),
    ]


def _int8_and_memory_targets(get: Callable[..., Any]) -> list[Target]:
    on = ("server", "batching_on")
    change = get("int8", "perplexity_change_percent")
    rss = [v for v in (get(*on, "rss_mb_after_load"), get(*on, "rss_mb_after_load_test")) if v]
    return [
        _ratio(
            "int8_speedup",
            "int8 batch-1 step >= 2.5 x faster than fp32",
            ">=",
            2.5,
            get("int8", "fp32_step_b1", "p50_ms"),
            get("int8", "step_b1", "p50_ms"),
            "fp32 step p50 ms / int8 step p50 ms, trials alternating",
            "give --int8-bundle",
        ),
        Target(
            "int8_perplexity",
            "int8 perplexity within 1% of fp32 (as the exporter measured it)",
            None if change is None else abs(change),
            "<=",
            1.0,
            "not measured: give --int8-bundle"
            if change is None
            else f"|perplexity change %| from the int8 manifest = |{change:.4g}|",
        ),
        Target(
            "server_rss",
            f"server resident memory <= {RSS_LIMIT_MB:.0f} MB with the benchmarked model",
            max(rss) if rss else None,
            "<=",
            RSS_LIMIT_MB,
            "MiB (VmRSS), the larger of after load and after the load test"
            if rss
            else "not measured: needs /proc",
        ),
    ]


_Row = tuple[str, str, Any, Any, str, str]  # key, what, numerator, denominator, formula, missing


def _transport_rows(get: Callable[..., Any]) -> list[_Row]:
    """What gRPC alone costs a server a generated token at 64 streams (the streaming echo's CPU
    a call and a message, at the batching server's messages and tokens a call), beside bare's
    CPU a token and the server's."""
    on = ("server", "batching_on", "generate", "64")
    call, message = get("echo_stream", "call_us"), get("echo_stream", "message_us")
    messages, tokens = get(*on, "messages_per_call"), get(*on, "tokens_per_call")
    transport = None
    if None not in (call, message, messages, tokens) and tokens:
        transport = float((call + messages * message) / tokens)
    missing = "needs the streaming echo, /proc and 64 streams"
    return [
        (
            "transport_vs_bare",
            "gRPC's own CPU a generated token at 64 streams (the streaming echo's, at the "
            "server's messages and tokens a call) / bare batch-64 step's",
            transport,
            get("bare", "step_b64", "cpu_us_per_token"),
            "echo (call + messages a call x message) / tokens a call, us / bare CPU us/token",
            missing,
        ),
        (
            "transport_vs_server",
            "the same / the server's CPU a generated token at 64 streams",
            transport,
            get(*on, "server_cpu_us_per_token"),
            "transport us/token / server CPU us/token",
            missing,
        ),
    ]


def diagnostics(results: dict[str, Any]) -> list[Diagnostic]:
    """Ratios that split the PredictNext and Generate figures into their causes."""

    get = functools.partial(_get, results)

    on = ("server", "batching_on")
    b1, idle = get("bare", "step_b1", "p50_ms"), get("bare", "step_b1_after_idle", "p50_ms")
    engine = get("engine", "generate", "64", "tokens_per_s")
    gen64 = get(*on, "generate", "64", "tokens_per_s")
    rows: list[_Row] = [
        *_transport_rows(get),
        (
            "generate_vs_bare",
            "server Generate at 64 streams / bare batch-64 step throughput",
            gen64,
            get("bare", "step_b64", "tokens_per_s"),
            "Generate@64 tokens/s / bare batch-64 tokens/s",
            "needs 64 streams and a batch-64 step",
        ),
        (
            "engine_cpu_per_token",
            "the engine in-process: CPU per token at 64 streams / bare batch-64 step's",
            get("engine", "generate", "64", "cpu_us_per_token"),
            get("engine", "generate", "64", "bare_cpu_us_per_token"),
            "engine CPU us/token / bare CPU us/token, trials alternating",
            "needs the in-process engine and a batch-64 step",
        ),
        (
            "step_after_idle",
            "bare batch-1 step after a 1 ms idle gap / back to back",
            idle,
            b1,
            "p50 ms after idle / p50 ms back to back",
            "needs the bare steps",
        ),
        (
            "score_with_cache",
            "server Score with the continuous cache / without (when the model has one)",
            get(*on, "score_cached", "tokens_per_s"),
            get(*on, "score", "tokens_per_s"),
            "tokens/s with / without, trials alternating",
            "the model has no continuous cache",
        ),
        (
            "server_vs_engine",
            "the server / the engine in-process, Generate at 64 streams",
            gen64,
            engine,
            "server tokens/s / engine tokens/s",
            "needs the server and the in-process engine at 64 streams",
        ),
        (
            "engine_python_flat",
            "the engine's own CPU a step (outside onnxruntime and the sampler) at 256 streams / "
            "at 1 stream",
            get("engine", "generate", "256", "step_engine_us"),
            get("engine", "generate", "1", "step_engine_us"),
            "us a step at 256 / us a step at 1 (flat: 1)",
            "needs the in-process engine at 1 and 256 streams",
        ),
        (
            "prefill_vs_step",
            "bare prompt chunk at batch 1 on the prefill graph / on the step graph",
            get("bare", "prefill_chunk", "prefill", "p50_ms"),
            get("bare", "prefill_chunk", "step", "p50_ms"),
            "p50 ms per chunk, trials alternating",
            "the bundle has no prefill graph",
        ),
    ]
    return [
        Diagnostic(key, what, *_quotient(num, den, formula, missing))
        for key, what, num, den, formula, missing in rows
    ]
