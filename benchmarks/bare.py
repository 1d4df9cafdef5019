"""Bare onnxruntime in this process: the floor the server's engine is measured against.

Sessions are made with the servers' engine's session options (`server.engine.session_options`
of `Plan.engine`: by default one intra-op and one inter-op thread, sequential execution, all
graph optimizations, spinning off) and execution provider, so the only difference from the
server is everything around `InferenceSession.run`.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import onnxruntime as ort

from benchmarks.timing import BenchError, latency, over_trials, time_calls
from benchmarks.workload import Plan, Workload
from server.bundle import Bundle
from server.engine import providers_for, session_options
from server.sampling import log_softmax

WARMUP_CALLS = 5
# The idle gap before each call of the "after idle" batch-1 step: about what a
# request/response client leaves the server between two calls (the echo round trip is
# 0.7 to 0.9 ms here). A tight loop of steps keeps the weights in the CPU's caches; a server
# answering one client at a time does not, and this measures what that costs the step.
IDLE_GAP_S = 0.001


def session(bundle: Bundle, graph: str, plan: Plan) -> ort.InferenceSession:
    options = session_options(plan.engine)
    return bundle.open_session(graph, options, providers_for(plan.provider))


def session_settings(step: ort.InferenceSession, plan: Plan) -> dict[str, Any]:
    """The engine settings the bare sessions copy, and the provider `step` runs on."""
    c = plan.engine
    return {
        "intra_op_threads": c.intra_op_threads,
        "inter_op_threads": c.inter_op_threads,
        "allow_spinning": c.allow_spinning,
        "execution_mode": "sequential",
        "graph_optimization_level": "ORT_ENABLE_ALL",
        "provider": step.get_providers()[0],
    }


def carried_trial(
    graph: ort.InferenceSession,
    bundle: Bundle,
    inputs: list[np.ndarray],
    calls: int,
    seconds: float,
    pause: float = 0.0,
) -> dict[str, float]:
    """One trial of `graph` runs on `inputs` (`[batch, T]` token arrays, taken in turn), the
    state carried from run to run and every output fetched, as the engine does (`pause`
    seconds idle before each, see `IDLE_GAP_S`)."""
    names = [s.input for s in bundle.state]
    count = len(bundle.state)
    batch, length = inputs[0].shape
    state: list[np.ndarray] = list(bundle.zero_state(batch))

    def call(i: int) -> None:
        nonlocal state
        feeds = dict(zip(names, state, strict=True))
        feeds["tokens"] = inputs[i % len(inputs)]
        state = graph.run(None, feeds)[-count:]

    for i in range(WARMUP_CALLS):
        call(calls + i)
    cpu = time.process_time()
    samples = time_calls(call, calls, seconds, pause)
    out = latency(samples, tokens_per_call=batch * length)
    # This process's CPU time a token (one intra-op thread: the step's own cost).
    out["cpu_us_per_token"] = (time.process_time() - cpu) / (len(samples) * batch * length) * 1e6
    return out


def step_trial(
    step: ort.InferenceSession,
    bundle: Bundle,
    tokens: np.ndarray,
    batch: int,
    calls: int,
    seconds: float,
    pause: float = 0.0,
) -> dict[str, float]:
    """One trial of single-token steps at `batch` rows (see `carried_trial`)."""
    columns = step_columns(tokens, batch, calls + WARMUP_CALLS)
    return carried_trial(step, bundle, columns, calls, seconds, pause)


def score_trial(
    graph: ort.InferenceSession, bundle: Bundle, ids: np.ndarray, chunk: int, seconds: float
) -> dict[str, float]:
    """Score `ids` (conditioned on eos), `chunk` tokens a run with the state carried.

    Stops early, after the chunk that passes `seconds`; `tokens` says how many were scored.
    """
    tokens = np.concatenate([[bundle.eos_id], ids[:-1]]).astype(np.int64)[None, :]
    targets = ids.astype(np.int64)[None, :]
    names = [s.input for s in bundle.state]
    has_targets = any(i.name == "targets" for i in graph.get_inputs())
    wanted = ["target_logprobs", *(s.output for s in bundle.state)]  # not the features
    state: list[np.ndarray] = list(bundle.zero_state(1))
    total, n = 0.0, 0
    start = time.perf_counter()
    for i in range(0, tokens.shape[1], chunk):
        feeds = dict(zip(names, state, strict=True))
        feeds["tokens"] = tokens[:, i : i + chunk]
        want = targets[:, i : i + chunk]
        if has_targets:
            feeds["targets"] = want
            picked, *state = graph.run(wanted, feeds)
        else:  # a bundle without score.onnx: reduce the step graph's logits, as the engine does
            logits, _, *state = graph.run(None, feeds)
            picked = np.take_along_axis(log_softmax(logits), want[..., None], axis=-1)[..., 0]
        total += float(np.sum(picked, dtype=np.float64))
        n += picked.shape[1]
        if time.perf_counter() - start >= seconds:
            break
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "tokens": float(n), "tokens_per_s": n / elapsed, "log_prob": total}


def steps(bundle: Bundle, workload: Workload, plan: Plan, idle: bool = False) -> dict[str, Any]:
    """Batch-1 and large-batch (`large_batch` and every `engine_streams`) step latency,
    throughput and CPU time a token over `plan.trials` trials; with
    `idle`, also batch-1 steps each after an idle gap (`step_b1_after_idle`)."""
    step = session(bundle, "step", plan)
    out: dict[str, Any] = {}
    batches = sorted({plan.large_batch, *plan.engine_streams})
    runs = [("step_b1", 1, plan.step_calls, 0.0)]
    runs += [(f"step_b{b}", b, plan.large_step_calls, 0.0) for b in batches]
    if idle:
        runs.append(("step_b1_after_idle", 1, plan.step_calls, IDLE_GAP_S))
    for key, batch, calls, pause in runs:
        out[key] = over_trials(
            [
                step_trial(step, bundle, workload.ids, batch, calls, plan.budget_s, pause)
                for _ in range(plan.trials)
            ]
        )
    return out


def prefill_chunks(bundle: Bundle, workload: Workload, plan: Plan) -> dict[str, Any] | None:
    """A prompt chunk of `plan.score_chunk` tokens at batch 1 on the step graph (logits and
    all, as bundles without a prefill graph feed prompts) and on the prefill graph, trials
    alternating; None for a bundle without a prefill graph."""
    if bundle.prefill_graph is None:
        return None
    graphs = {graph: session(bundle, graph, plan) for graph in ("step", "prefill")}
    size = plan.score_chunk
    ids = workload.ids.astype(np.int64)
    chunks = [ids[None, i : i + size] for i in range(0, len(ids) - size + 1, size)]
    trials: dict[str, list[dict[str, float]]] = {graph: [] for graph in graphs}
    for _ in range(plan.trials):
        for graph, s in graphs.items():
            trials[graph].append(
                carried_trial(s, bundle, chunks, plan.large_step_calls, plan.budget_s)
            )
    out: dict[str, Any] = {graph: over_trials(t) for graph, t in trials.items()}
    out["chunk"] = plan.score_chunk
    return out


def run(bundle: Bundle, workload: Workload, plan: Plan) -> dict[str, Any]:
    """Steps at batch 1 (also after idle gaps) and 64, prompt chunks on the step and prefill
    graphs, and scoring the document with score.onnx (or model.onnx)."""
    out = steps(bundle, workload, plan, idle=True)
    out["prefill_chunk"] = prefill_chunks(bundle, workload, plan)
    graph = session(bundle, "score" if bundle.score_graph is not None else "step", plan)
    ids = workload.score_ids(plan.score_tokens)
    score_trial(graph, bundle, ids[: plan.score_chunk * 2], plan.score_chunk, plan.score_budget_s)
    out["score"] = over_trials(
        [
            score_trial(graph, bundle, ids, plan.score_chunk, plan.score_budget_s)
            for _ in range(plan.trials)
        ]
    )
    out["score"]["graph"] = "score.onnx" if bundle.score_graph is not None else "model.onnx"
    out["score"]["chunk"] = plan.score_chunk
    out["session"] = session_settings(graph, plan)
    return out


def step_columns(tokens: np.ndarray, batch: int, count: int) -> list[np.ndarray]:
    """`count` token columns `[batch, 1]`, read from the stream in order (wrapping)."""
    n = len(tokens)
    return [
        tokens[(np.arange(batch) + i * batch) % n].astype(np.int64).reshape(batch, 1)
        for i in range(count)
    ]


def int8(
    int8_bundle: Bundle, fp32_bundle: Bundle, workload: Workload, plan: Plan
) -> dict[str, Any]:
    """The int8 bundle's steps side by side with the fp32 bundle's, and the quality figures
    its exporter recorded in the manifest.

    fp32 and int8 trials alternate (`fp32_step_*` and `step_*`), so the speedup compares steps
    taken under the same machine conditions, not minutes apart as the bare rows and these are.
    """
    where = f"--int8-bundle {int8_bundle.path}"
    if int8_bundle.precision != "int8":
        raise BenchError(f"{where}: its precision is {int8_bundle.precision!r}, not 'int8'")
    ours, theirs = int8_bundle.manifest["architecture"], fp32_bundle.manifest["architecture"]
    if ours != theirs:
        raise BenchError(
            f"{where}: architecture {ours} is not that of --bundle {fp32_bundle.path} ({theirs})"
        )
    quality = int8_bundle.manifest.get("quantization", {}).get("quality")
    if not isinstance(quality, dict) or "perplexity_change_percent" not in quality:
        raise BenchError(f"{where}: the manifest has no quantization.quality figures")
    sides = {
        "fp32_": (fp32_bundle, session(fp32_bundle, "step", plan)),
        "": (int8_bundle, session(int8_bundle, "step", plan)),
    }
    out: dict[str, Any] = {}
    for key, batch, calls in (
        ("step_b1", 1, plan.step_calls),
        (f"step_b{plan.large_batch}", plan.large_batch, plan.large_step_calls),
    ):
        trials: dict[str, list[dict[str, float]]] = {prefix: [] for prefix in sides}
        for _ in range(plan.trials):
            for prefix, (bundle, step) in sides.items():
                trials[prefix].append(
                    step_trial(step, bundle, workload.ids, batch, calls, plan.budget_s)
                )
        for prefix, figures in trials.items():
            out[prefix + key] = over_trials(figures)
    out["perplexity_change_percent"] = float(quality["perplexity_change_percent"])
    out["quality"] = quality
    return out
