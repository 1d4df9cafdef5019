"""The server under load: `rnnlm serve` in a child process, driven by a grpc.aio client.

The server is started on 127.0.0.1 with free ports (its log says which), once with batching on
and once with `--no-batching`. With batching on it is measured for `PredictNext` latency at
concurrency 1, `PredictNext` extending cached contexts of several lengths, `Score` throughput on
the long document, and `Generate` throughput at each concurrency; with batching off, `Generate`
only. Its resident memory is read from /proc after loading and after the load.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks import bare
from benchmarks.echo import OWN_CONNECTION
from benchmarks.process import ChildServer
from benchmarks.timing import BenchError, latency, over_trials
from benchmarks.workload import LONG_TOKENS, SENTENCE_TOKENS, Plan, Workload, generate_seed
from rnnlm.v1 import language_model_pb2 as pb
from rnnlm.v1 import language_model_pb2_grpc as pb_grpc

PORT_RE = r"gRPC listening on \S*:(\d+)"
READY_SECONDS = 120.0
# Extra deadline on every call beyond what the measurement itself allows.
CALL_SLACK_SECONDS = 60.0
MAX_MESSAGE_BYTES = 64 * 2**20
PREDICT_K = 5


async def run(
    bundle_dir: Path, workload: Workload, plan: Plan, say: Callable[[str], None]
) -> dict[str, Any]:
    """Every server measurement, batching on then off; `say` reports progress."""
    on = await _measure_server(bundle_dir, workload, plan, say, batching=True)
    off = await _measure_server(bundle_dir, workload, plan, say, batching=False)
    return {"batching_on": on, "batching_off": off}


def serve_args(
    bundle_dir: Path, batching: bool, extra: tuple[str, ...], provider: str = "cpu"
) -> list[str]:
    return [
        "serve",
        "--models",
        str(bundle_dir),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--log-level",
        "info",
        "--grace-seconds",
        "1",
        "--batching" if batching else "--no-batching",
        "--provider",
        provider,
        # Score sends the whole document in one call: bounded by the message size alone.
        "--max-text-chars",
        str(16 * 2**20),
        *extra,
    ]


async def _measure_server(
    bundle_dir: Path,
    workload: Workload,
    plan: Plan,
    say: Callable[[str], None],
    *,
    batching: bool,
) -> dict[str, Any]:
    args = serve_args(bundle_dir, batching, plan.server_args, plan.provider)
    child = ChildServer("rnnlm", args, PORT_RE, start_seconds=READY_SECONDS)
    out: dict[str, Any] = {"command": "rnnlm " + " ".join(args)}
    try:
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # A connection of this channel's own, closed with it before the server stops
            # (a shared one outlives it, and grpc logs the stopping server's GOAWAY).
            *OWN_CONNECTION,
        ]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{child.port}", options=options) as ch:
            stub = pb_grpc.LanguageModelStub(ch)
            await wait_serving(ch, child)
            info = await stub.GetModel(pb.GetModelRequest(), timeout=CALL_SLACK_SECONDS)
            out["model"] = {
                "name": info.name,
                "version": info.version,
                "provider": info.provider,
                "precision": info.precision,
                "continuous_cache": info.HasField("continuous_cache"),
            }
            out["rss_mb_after_load"] = child.rss_mb()
            mode = "batching on" if batching else "batching off"
            if batching:
                say(f"server ({mode}): PredictNext at concurrency 1")
                out["predict_c1"] = await predict_c1(stub, workload, plan)
                cached = info.HasField("continuous_cache")
                lengths = ", ".join(str(n) for n in plan.context_lengths)
                also = " (and with the continuous cache)" if cached else ""
                say(f"server ({mode}): PredictNext extending {lengths}-token contexts{also}")
                out["predict_context"], out["predict_context_cached"] = await _predict_contexts(
                    stub, workload, plan, cached
                )
                longest = max(plan.context_lengths)
                say(f"server ({mode}): PredictNext on fresh {longest}-token contexts")
                out["predict_fresh"] = await _predict_fresh(stub, workload, plan, longest)
                also = " (trials alternating with the continuous cache)" if cached else ""
                say(f"server ({mode}): Score, {plan.score_tokens} tokens{also}")
                out["score"], out["score_cached"] = await _score(stub, workload, plan, cached)
            if batching:
                streams = plan.large_batch
                say(f"server ({mode}): PredictNext and a new stream under {streams} long Generates")
                out["under_load"] = await under_load(stub, workload, plan, streams)
            out["generate"] = {}
            for c in plan.concurrency:
                say(f"server ({mode}): Generate, {c} streams")
                out["generate"][str(c)] = await generate(stub, child, plan, c)
            child.check_alive()
            out["rss_mb_after_load_test"] = child.rss_mb()
    except grpc.aio.AioRpcError as e:
        raise BenchError(
            f"the server ({out['command']}) failed a call: {e.code().name} {e.details()}; "
            f"its log:\n{child.log_tail()}"
        ) from e
    finally:
        child.stop()
    return out


async def wait_serving(channel: grpc.aio.Channel, child: ChildServer) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + READY_SECONDS
    while time.monotonic() < deadline:
        child.check_alive()
        try:
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.aio.AioRpcError:
            pass  # still starting
        await asyncio.sleep(0.1)
    raise BenchError(f"the server did not report SERVING in {READY_SECONDS:.0f} s")


# -- PredictNext ---------------------------------------------------------------------------


async def _extensions(
    stub: pb_grpc.LanguageModelStub, texts: list[str], count: int, end: float, cached: bool
) -> tuple[list[float], list[int]]:
    """Send texts[0] untimed (it warms the state cache), then time each following text.

    Each text is the one before it plus one token, so each timed call extends a cached context
    by one token (`cached`: with the continuous cache). Returns the latencies and the context
    lengths the server reported.
    """
    await stub.PredictNext(
        pb.PredictNextRequest(context=texts[0], k=PREDICT_K, continuous_cache=cached),
        timeout=CALL_SLACK_SECONDS,
    )
    samples, lengths = [], []
    for text in texts[1 : count + 1]:
        request = pb.PredictNextRequest(context=text, k=PREDICT_K, continuous_cache=cached)
        start = time.perf_counter()
        reply = await stub.PredictNext(request, timeout=CALL_SLACK_SECONDS)
        now = time.perf_counter()
        samples.append(now - start)
        lengths.append(reply.context_tokens)
        if now >= end:
            break
    return samples, lengths


def _prefixes(workload: Workload, first: int, count: int) -> tuple[np.ndarray, list[str]]:
    """A fresh stretch of `first` + `count` stream tokens and the texts of its prefixes of
    `first`, `first` + 1, ... `first` + `count` tokens."""
    ids = workload.fresh(first + count)
    return ids, [workload.text(ids[: first + k]) for k in range(count + 1)]


async def predict_c1(
    stub: pb_grpc.LanguageModelStub, workload: Workload, plan: Plan
) -> dict[str, Any]:
    """Concurrency 1, the typing pattern: sentences grown one token per call, each call a step.

    A short context can repeat one sent before (a common opening of a line); the server then
    answers it from the cache without a step. Such calls are counted in `repeated_contexts`.
    """
    seen: set[tuple[int, ...]] = set()
    trials = []
    for _ in range(plan.trials):
        samples: list[float] = []
        repeated = 0
        end = time.perf_counter() + plan.budget_s
        while len(samples) < plan.predict_calls and time.perf_counter() < end:
            ids, texts = _prefixes(workload, 1, SENTENCE_TOKENS - 1)
            got, _ = await _extensions(stub, texts, plan.predict_calls - len(samples), end, False)
            for k in range(2, len(got) + 2):
                key = tuple(ids[:k].tolist())
                repeated += key in seen
                seen.add(key)
            samples += got
        trial = latency(samples)
        trial["repeated_contexts"] = float(repeated)
        trials.append(trial)
    summary = over_trials(trials)
    summary["context_tokens"] = f"2 to {SENTENCE_TOKENS}"
    return summary


async def _predict_contexts(
    stub: pb_grpc.LanguageModelStub, workload: Workload, plan: Plan, with_cache: bool
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]] | None]:
    """Extending a cached context of each of `plan.context_lengths` tokens by one token per
    call; the lengths take turns trial by trial, so their ratio compares like conditions. With
    `with_cache`, each length also takes a turn with the continuous cache (the second result,
    else None)."""
    variants = (False, True) if with_cache else (False,)
    trials: dict[tuple[int, bool], list[dict[str, float]]] = {
        (n, cached): [] for n in plan.context_lengths for cached in variants
    }
    for _ in range(plan.trials):
        for (length, cached), done in trials.items():
            _, texts = _prefixes(workload, length, plan.context_calls)
            end = time.perf_counter() + plan.budget_s
            samples, lengths = await _extensions(stub, texts, plan.context_calls, end, cached)
            trial = latency(samples)
            trial["context_tokens_min"] = float(min(lengths))
            trial["context_tokens_max"] = float(max(lengths))
            done.append(trial)
    results = [
        {str(n): over_trials(trials[(n, cached)]) for n in plan.context_lengths}
        for cached in variants
    ]
    return results[0], results[1] if with_cache else None


async def _predict_fresh(
    stub: pb_grpc.LanguageModelStub, workload: Workload, plan: Plan, length: int
) -> dict[str, Any]:
    """PredictNext on a context of `length` tokens that nothing cached: the whole context is
    prefilled (the first call of a typing session with a long document before the cursor)."""
    trials = []
    for _ in range(plan.trials):
        samples: list[float] = []
        end = time.perf_counter() + plan.budget_s
        while len(samples) < plan.fresh_calls and time.perf_counter() < end:
            context = workload.text(workload.fresh(length))
            request = pb.PredictNextRequest(context=context, k=PREDICT_K)
            start = time.perf_counter()
            await stub.PredictNext(request, timeout=CALL_SLACK_SECONDS)
            samples.append(time.perf_counter() - start)
        trials.append(latency(samples, tokens_per_call=length))
    summary = over_trials(trials)
    summary["context_tokens"] = length
    return summary


# -- Score ---------------------------------------------------------------------------------


async def _score(
    stub: pb_grpc.LanguageModelStub, workload: Workload, plan: Plan, with_cache: bool
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """One Score call with the whole document per trial; tokens/s as the client sees it, and
    before each trial bare onnxruntime scoring the same document in this process
    (`bare_tokens_per_s`: the two alternate, so their ratio compares like machine conditions).
    With `with_cache`, each trial also scores it with the continuous cache, and the second
    summary is that (else None)."""
    bundle = workload.bundle
    graph = bare.session(bundle, "score" if bundle.score_graph is not None else "step", plan)
    ids = workload.score_ids(plan.score_tokens)
    text = workload.text(ids)
    warm = workload.text(ids[: plan.score_chunk * 2])
    bare.score_trial(graph, bundle, ids[: plan.score_chunk * 2], plan.score_chunk, 1.0)
    variants = (False, True) if with_cache else (False,)
    for cached in variants:
        request = pb.ScoreRequest(texts=[warm], continuous_cache=cached)
        await stub.Score(request, timeout=CALL_SLACK_SECONDS)
    # One call cannot stop early: it gets ten times the in-process scoring budget.
    timeout = max(CALL_SLACK_SECONDS, 10 * plan.score_budget_s)
    trials: dict[bool, list[dict[str, float]]] = {cached: [] for cached in variants}
    for _ in range(plan.trials):
        floor = bare.score_trial(graph, bundle, ids, plan.score_chunk, plan.score_budget_s)
        for cached in variants:
            request = pb.ScoreRequest(texts=[text], continuous_cache=cached)
            start = time.perf_counter()
            reply = await stub.Score(request, timeout=timeout)
            seconds = time.perf_counter() - start
            result = reply.results[0]
            trials[cached].append(
                {
                    "seconds": seconds,
                    "tokens": float(result.num_tokens),
                    "tokens_per_s": result.num_tokens / seconds,
                    "log_prob": result.log_prob,
                    "bare_tokens_per_s": floor["tokens_per_s"],
                }
            )
    summaries = {c: {**over_trials(t), "text_chars": len(text)} for c, t in trials.items()}
    return summaries[False], summaries.get(True)


# -- Under load ----------------------------------------------------------------------------


async def under_load(
    stub: pb_grpc.LanguageModelStub, workload: Workload, plan: Plan, streams: int
) -> dict[str, Any]:
    """While `streams` long Generate streams run: PredictNext latency (`predict`), and the
    time to the first token of one stream more (`first_token`), one call at a time, a
    trial's calls spaced by a short pause."""
    stop = asyncio.Event()
    started: set[int] = set()

    async def long_stream(i: int) -> None:
        call_index = 0
        while not stop.is_set():
            seed = generate_seed(plan.trials + 1, i, call_index)
            call_index += 1
            request = pb.GenerateRequest(max_tokens=LONG_TOKENS, seed=seed)
            call = stub.Generate(request, timeout=plan.budget_s * 4 * plan.trials + 60)
            try:
                async for _ in call:
                    started.add(i)
                    if stop.is_set():
                        call.cancel()
                        break
                await call.code()
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.CANCELLED:
                    raise

    tasks = [asyncio.ensure_future(long_stream(i)) for i in range(streams)]
    try:
        end = time.perf_counter() + CALL_SLACK_SECONDS
        while len(started) < streams and time.perf_counter() < end:
            await asyncio.sleep(0.01)
        predict, first = [], []
        for _ in range(plan.trials):
            predict.append(latency(await _predict_samples(stub, workload, plan)))
            first.append(latency(await _first_token_samples(stub, plan)))
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    return {"streams": streams, "predict": over_trials(predict), "first_token": over_trials(first)}


async def _predict_samples(
    stub: pb_grpc.LanguageModelStub, workload: Workload, plan: Plan
) -> list[float]:
    samples = []
    end = time.perf_counter() + plan.budget_s
    for _ in range(plan.under_load_calls):
        await asyncio.sleep(0.01)
        context = workload.text(workload.fresh(SENTENCE_TOKENS))
        start = time.perf_counter()
        await stub.PredictNext(
            pb.PredictNextRequest(context=context, k=PREDICT_K), timeout=CALL_SLACK_SECONDS
        )
        samples.append(time.perf_counter() - start)
        if time.perf_counter() >= end:
            break
    return samples


async def _first_token_samples(stub: pb_grpc.LanguageModelStub, plan: Plan) -> list[float]:
    samples = []
    end = time.perf_counter() + plan.budget_s
    for i in range(plan.under_load_calls):
        await asyncio.sleep(0.01)
        start = time.perf_counter()
        call = stub.Generate(
            pb.GenerateRequest(max_tokens=LONG_TOKENS, seed=i), timeout=CALL_SLACK_SECONDS
        )
        async for _ in call:
            samples.append(time.perf_counter() - start)
            call.cancel()
            break
        with contextlib.suppress(grpc.aio.AioRpcError):
            await call.code()
        if time.perf_counter() >= end:
            break
    return samples


# -- Generate ------------------------------------------------------------------------------


async def generate(
    stub: pb_grpc.LanguageModelStub, child: ChildServer, plan: Plan, concurrency: int
) -> dict[str, Any]:
    """Aggregate tokens/s of `concurrency` streams, each issuing Generate calls back to back."""
    await _generate_load(stub, concurrency, plan.warmup_s, plan.generate_max_tokens, seed=0)
    trials = []
    for trial in range(plan.trials):
        cpu_server, cpu_client = child.cpu_seconds(), time.process_time()
        start = time.perf_counter()
        tokens, calls, messages = await _generate_load(
            stub, concurrency, plan.duration_s, plan.generate_max_tokens, seed=trial + 1
        )
        elapsed = time.perf_counter() - start
        server_after = child.cpu_seconds()
        figures = {
            "tokens": float(tokens),
            "calls": float(calls),
            "tokens_per_call": tokens / max(1, calls),
            "messages_per_call": messages / max(1, calls),
            "tokens_per_s": tokens / plan.duration_s,
            "client_cpu_percent": 100 * (time.process_time() - cpu_client) / elapsed,
        }
        if cpu_server is not None and server_after is not None:
            figures["server_cpu_percent"] = 100 * (server_after - cpu_server) / elapsed
            figures["server_cpu_us_per_token"] = (server_after - cpu_server) / max(1, tokens) * 1e6
        trials.append(figures)
    summary = over_trials(trials)
    summary["max_tokens_per_call"] = plan.generate_max_tokens
    return summary


async def _generate_load(
    stub: pb_grpc.LanguageModelStub, concurrency: int, seconds: float, max_tokens: int, seed: int
) -> tuple[int, int, int]:
    """Tokens received before the deadline, calls started and response messages received,
    over all streams."""
    deadline = time.perf_counter() + seconds
    tokens = [0] * concurrency
    calls = [0] * concurrency
    messages = [0] * concurrency

    async def stream(i: int) -> None:
        while time.perf_counter() < deadline:
            request = pb.GenerateRequest(
                max_tokens=max_tokens, seed=generate_seed(seed, i, calls[i])
            )
            calls[i] += 1
            call = stub.Generate(request, timeout=seconds + CALL_SLACK_SECONDS)
            try:
                async for reply in call:
                    if time.perf_counter() >= deadline:
                        call.cancel()
                        break
                    tokens[i] += len(reply.token_ids)
                    messages[i] += 1
                # Wait until the cancellation is through, so that hundreds of them are not
                # still being processed when the next load starts its clock.
                await call.code()
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.CANCELLED:
                    raise

    await asyncio.gather(*(stream(i) for i in range(concurrency)))
    return sum(tokens), sum(calls), sum(messages)
