"""The server's engine in this process, without gRPC: where Generate throughput goes.

The same load as the server's Generate rows (streams issuing 64-token generations back to
back, temperature 1, a distinct seed per call, `<unk>` banned as the servicer bans it) driven
straight into `server.engine.Engine`, configured as the servers' engine (`Plan.engine`). Next
to bare onnxruntime and the server it splits the server's distance from the bare step into the
engine's own share (batching, sampling, state bookkeeping) and the share of the transport and
servicer. Each trial also reads the engine's step accounting (`Engine.step_totals`): the rows a
step and the batching thread's CPU a step outside onnxruntime's runs and the sampler, the
engine's own Python, which issue 14 asks to stay flat from 1 to 256 rows.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from benchmarks import bare
from benchmarks.timing import over_trials
from benchmarks.workload import Plan, Workload, generate_seed
from server.bundle import Bundle
from server.engine import Engine, SamplingParams
from server.scheduler import StepTotals


async def _load(
    engine: Engine, bundle: Bundle, streams: int, seconds: float, max_tokens: int, seed: int
) -> int:
    """Tokens handed to all streams' consumers before the deadline."""
    unk = bundle.special_tokens.get("unk")
    banned = frozenset() if unk is None else frozenset({unk})
    deadline = time.perf_counter() + seconds
    tokens = [0] * streams

    async def stream(i: int) -> None:
        calls = 0
        while time.perf_counter() < deadline:
            calls += 1
            params = SamplingParams(seed=generate_seed(seed, i, calls), banned_ids=banned)
            generation = engine.generate([], max_tokens, params)
            try:
                async for _ in generation:
                    # Under load the engine hands tokens over a few at a time.
                    tokens[i] += 1 + len(generation.take_ready())
                    if time.perf_counter() >= deadline:
                        break
            finally:
                await generation.aclose()

    await asyncio.gather(*(stream(i) for i in range(streams)))
    return sum(tokens)


async def _measure(bundle: Bundle, workload: Workload, plan: Plan, streams: int) -> dict[str, Any]:
    """The engine's trials, each after a bare batch-`streams` step trial (alternating, so
    their ratio compares like machine conditions)."""
    engine = Engine(bundle, plan.engine)
    step = bare.session(bundle, "step", plan)
    await engine.start()
    try:
        await _load(engine, bundle, streams, plan.warmup_s, plan.generate_max_tokens, seed=0)
        trials = []
        for trial in range(plan.trials):
            floor = bare.step_trial(
                step, bundle, workload.ids, streams, plan.large_step_calls, plan.budget_s
            )
            cpu = time.process_time()
            before = engine.step_totals()
            start = time.perf_counter()
            tokens = await _load(
                engine, bundle, streams, plan.duration_s, plan.generate_max_tokens, trial + 1
            )
            elapsed = time.perf_counter() - start
            cpu = time.process_time() - cpu
            trials.append(
                {
                    "tokens": float(tokens),
                    "tokens_per_s": tokens / plan.duration_s,
                    "cpu_percent": 100 * cpu / elapsed,
                    "cpu_us_per_token": cpu / max(1, tokens) * 1e6,
                    "bare_tokens_per_s": floor["tokens_per_s"],
                    "bare_cpu_us_per_token": floor["cpu_us_per_token"],
                    **_steps(before, engine.step_totals()),
                }
            )
    finally:
        await engine.close()
    summary = over_trials(trials)
    summary["streams"] = streams
    summary["max_tokens_per_call"] = plan.generate_max_tokens
    return summary


def _steps(before: StepTotals, after: StepTotals) -> dict[str, float]:
    """The steps between two of the engine's accountings: rows a step, and the batching
    thread's CPU us a step in all, in the model (onnxruntime and the sampler) and outside it
    (the engine's own Python)."""
    steps = max(1, after.steps - before.steps)
    cpu, model = after.cpu_s - before.cpu_s, after.model_s - before.model_s
    return {
        "rows_per_step": (after.rows - before.rows) / steps,
        "step_cpu_us": cpu / steps * 1e6,
        "step_model_us": model / steps * 1e6,
        "step_engine_us": (cpu - model) / steps * 1e6,
    }


def run(bundle: Bundle, workload: Workload, plan: Plan) -> dict[str, Any]:
    """Generate tokens/s and CPU time a token of the in-process engine at each of
    `plan.engine_streams` streams (under "generate", keyed by the stream count), each trial
    beside a bare step trial at that batch."""
    return {
        "generate": {
            str(streams): asyncio.run(_measure(bundle, workload, plan, streams))
            for streams in plan.engine_streams
        }
    }
