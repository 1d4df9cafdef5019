"""The scheduler's rules: no request waits behind another, generations share steps fairly,
and what shares a step never changes a result (asserted on order and on the engine's own
accounting, never on wall time)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from test_engine import (
    Direct,
    assert_same,
    close,
    collect,
    mixed_workload,
    run_engine,
    runs,
    wait_until,
)

from server import engine as engine_module
from server import scheduler
from server.bundle import Bundle
from server.engine import Engine, SamplingParams
from server.metrics import Metrics


def test_next_token_work_never_waits_behind_generations(lstm: Bundle) -> None:
    """Head of line: with one generation advancing per step (the old `--max-batch-size 1`,
    once a slot pool), four long generations all start, and a PredictNext is answered while
    every one of them is still running."""

    async def body(engine: Engine) -> tuple[Any, list[bool], list[int]]:
        streams = [engine.generate([2, i], 10**6, SamplingParams(seed=i)) for i in range(4)]
        for stream in streams:  # each starts while the ones before it run
            await anext(stream)
        assert not engine._idle_now()  # so the call below goes through the scheduler
        logprobs = await engine.next_token_logprobs([3, 4, 5, 6])
        requests = [stream._request for stream in streams]
        assert all(r is not None for r in requests)
        running = [not r.done for r in requests]  # type: ignore[union-attr]
        # The later streams started behind; the least advanced go first until they catch up
        # (each stream's count of tokens delivered: one a step that advanced it).
        started = [stream._delivered for stream in streams]
        await wait_until(lambda: min(stream._delivered for stream in streams) > max(started))
        stepped = [stream._delivered for stream in streams]
        for stream in streams:
            await stream.aclose()
        return logprobs, running, stepped

    logprobs, running, stepped = run_engine(lstm, body, max_batch_size=1)
    assert all(running)
    close(logprobs, Direct(lstm).logprobs([3, 4, 5, 6])[-1])
    assert max(stepped) - min(stepped) <= 1  # turns taken fairly: the least advanced first


def test_generations_take_turns_beyond_the_step_time(lstm: Bundle) -> None:
    """A step-time budget below one row's cost advances one generation per step; every
    generation still finishes, in fair turns, with the tokens it gets alone."""
    params = [SamplingParams(seed=10 + i, temperature=1.2) for i in range(5)]

    async def together(engine: Engine) -> list[Any]:
        return list(await asyncio.gather(*(collect(engine, [7], 12, p) for p in params)))

    async def alone(engine: Engine) -> list[Any]:
        return [await collect(engine, [7], 12, p) for p in params]

    metrics = Metrics()
    turns = run_engine(lstm, together, metrics, max_step_ms=1e-6)
    count, total = runs(metrics, lstm)
    # The same tokens; the log-probs up to rounding (a run's rows can round differently
    # with another batch size on some CPUs' kernels).
    assert_same(run_engine(lstm, alone), turns)
    # One generation a step once a step of them alone was timed: about a run per token.
    assert count >= 4 * 11 and total < 2 * count  # together they would take about 12 runs


@pytest.mark.parametrize("crowd", [63, 129])
def test_a_seeded_generation_is_the_same_alone_and_among_64_or_more(
    lstm: Bundle, crowd: int
) -> None:
    """Alone, in a batch of 64 and of 130 (sampled in blocks of rows), and in turns."""
    prompt = [2, 3]
    params = SamplingParams(seed=99, temperature=1.1, top_p=0.9)

    async def alone(engine: Engine) -> list[Any]:
        return await collect(engine, prompt, 40, params)

    async def crowded(engine: Engine) -> list[Any]:
        others = [
            collect(
                engine,
                [4, i % 7],
                40,
                SamplingParams(seed=1000 + i, temperature=0.8 + i / 100, top_k=i % 5),
            )
            for i in range(crowd)
        ]
        results = await asyncio.gather(collect(engine, prompt, 40, params), *others)
        return results[0]

    metrics = Metrics()
    first = run_engine(lstm, alone)
    assert run_engine(lstm, crowded, metrics) == first
    count, total = runs(metrics, lstm)
    assert total / count > 16  # the runs really were shared
    assert run_engine(lstm, crowded, max_step_ms=1e-6) == first  # and in turns


def test_the_graph_native_and_numpy_samplers_draw_the_same_tokens(lstm: Bundle) -> None:
    """The samplers read the same counter-based streams: a seed gives the same tokens on
    each, whatever its parameters, in one batch of mixed rows."""
    params = [
        SamplingParams(seed=1, temperature=0),
        SamplingParams(seed=2, temperature=1.0, top_k=5, top_logprobs=3),
        SamplingParams(seed=3, temperature=0.8, top_p=0.9),
        SamplingParams(seed=4, min_p=0.1, banned_ids=frozenset({5, 6})),
        SamplingParams(seed=5, temperature=1.2, repetition_penalty=1.3),
        SamplingParams(seed=6),
    ]

    async def body(engine: Engine) -> list[Any]:
        calls = (collect(engine, [2, i], 25, p) for i, p in enumerate(params))
        return list(await asyncio.gather(*calls))

    graph = run_engine(lstm, body, sampler="graph")
    numpy = run_engine(lstm, body, sampler="numpy")
    native = run_engine(lstm, body, sampler="native")
    for g, n in [*zip(graph, numpy, strict=True), *zip(native, numpy, strict=True)]:
        assert [t for t, _, _ in g] == [t for t, _, _ in n]
        close([lp for _, lp, _ in g], [lp for _, lp, _ in n])
        for (_, _, gt), (_, _, nt) in zip(g, n, strict=True):
            assert [i for i, _ in gt] == [i for i, _ in nt]


def test_next_token_work_runs_before_the_generations_run(
    lstm: Bundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the lane's threshold at zero, next-token work beside running generations gets a
    run of its own before theirs (one-row runs while eight streams decode), and every RPC
    gives the numbers it gives alone. (No call runs inline here, so all go through the
    scheduler's lane.)"""
    monkeypatch.setattr(scheduler, "LANE_S", 0.0)
    monkeypatch.setattr(engine_module, "INLINE_TOKENS", 0)
    calls = mixed_workload(lstm.vocab_size)
    metrics = Metrics()
    single_runs = "rnnlm_batch_size_bucket"

    def one_row_runs() -> float:
        labels = {"model": lstm.name, "le": "1.0"}
        return metrics.registry.get_sample_value(single_runs, labels) or 0.0

    async def body(engine: Engine) -> tuple[list[Any], float, float]:
        streams = [engine.generate([1, i], 10**6, SamplingParams(seed=i)) for i in range(8)]
        for stream in streams:
            await anext(stream)
        before = one_row_runs()
        logprobs = await engine.next_token_logprobs([3, 4, 5, 6])
        after = one_row_runs()
        together = list(await asyncio.gather(*(call(engine) for call in calls)))
        for stream in streams:
            await stream.aclose()
        return [logprobs, *together], before, after

    results, before, after = run_engine(lstm, body, metrics, prefill_chunk=8)
    assert after > before  # the call ran alone while the eight decoded
    alone = run_engine(lstm, lambda e: asyncio.gather(*(c(e) for c in calls)), prefill_chunk=8)
    close(results[0], Direct(lstm).logprobs([3, 4, 5, 6])[-1])
    assert_same(results[1:], list(alone))


def test_next_token_work_runs_at_once_beside_generations_that_would_keep_it_waiting(
    lstm: Bundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Head of line: once the generations' share of a step would keep a next-token call
    waiting for a run of its own (the lane's threshold at zero here), a short call runs at
    once on the event loop, beside the step under way: it finishes without ever suspending
    while every stream still runs, with the numbers it gives alone; one with more tokens
    than the inline limit still goes through the scheduler."""
    monkeypatch.setattr(scheduler, "LANE_S", 0.0)
    long_context = [7 - i % 5 for i in range(engine_module.INLINE_TOKENS + 4)]  # none cached

    async def body(engine: Engine) -> tuple[Any, Any, list[bool]]:
        streams = [engine.generate([2, i], 10**6, SamplingParams(seed=i)) for i in range(8)]
        for stream in streams:
            await anext(stream)
        await wait_until(engine._inline_now)  # once a step of theirs was timed
        assert not engine._idle_now()
        coroutine = engine.next_token_logprobs([3, 4, 5, 6])
        with pytest.raises(StopIteration) as done:  # finished without ever suspending
            coroutine.send(None)
        queued = engine.next_token_logprobs(long_context)
        waited = asyncio.ensure_future(queued)
        await asyncio.sleep(0)
        assert not waited.done()  # handed to the worker: it waits for a step
        running = [not stream._request.done for stream in streams]  # type: ignore[union-attr]
        result = await waited
        for stream in streams:
            await stream.aclose()
        return done.value.value, result, running

    inline, queued, running = run_engine(lstm, body)
    assert all(running)
    direct = Direct(lstm)
    close(inline, direct.logprobs([3, 4, 5, 6])[-1])
    close(queued, direct.logprobs(long_context)[-1])


def test_a_new_stream_gets_its_first_token_at_once_beside_running_ones(
    lstm: Bundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Head of line: while eight streams' share of a step would keep it waiting (the lane's
    threshold at zero), a new stream with a short prompt gets its first token at once, on
    the event loop (its first `__anext__` never suspends), then joins their steps with its
    random stream where it was: its tokens are those it gets through the workers alone."""
    monkeypatch.setattr(scheduler, "LANE_S", 0.0)
    params = SamplingParams(seed=77, temperature=1.1, repetition_penalty=1.2)

    async def crowded(engine: Engine) -> tuple[list[Any], bool]:
        streams = [engine.generate([2, i], 10**6, SamplingParams(seed=i)) for i in range(8)]
        for stream in streams:
            await anext(stream)
        await wait_until(engine._inline_now)  # once a step of theirs was timed
        new = engine.generate([5, 6], 30, params)
        with pytest.raises(StopIteration) as done:  # the first token without suspending
            new.__anext__().send(None)
        tokens = [done.value.value, *[t async for t in new]]
        running = all(not stream._request.done for stream in streams)  # type: ignore[union-attr]
        for stream in streams:
            await stream.aclose()
        return tokens, running

    async def alone(engine: Engine) -> list[Any]:
        return [t async for t in engine.generate([5, 6], 30, params)]

    tokens, running = run_engine(lstm, crowded)
    assert running and len(tokens) == 30
    monkeypatch.setattr(engine_module, "INLINE_TOKENS", -1)  # no inline start at all
    through_workers = run_engine(lstm, alone)
    assert [t.token_id for t in tokens] == [t.token_id for t in through_workers]
    close([t.logprob for t in tokens], [t.logprob for t in through_workers])


def test_logits_left_on_the_device_give_the_same_results(lstm: Bundle) -> None:
    """Decode runs through I/O binding, their logits handed to the sampler graph as an
    `OrtValue` (on the CPU here: on CUDA they stay on the GPU), give what host logits give."""
    calls = mixed_workload(lstm.vocab_size)

    async def together(engine: Engine) -> list[Any]:
        return list(await asyncio.gather(*(call(engine) for call in calls)))

    metrics = Metrics()
    bound = run_engine(
        lstm, together, metrics, prefill_chunk=8, sampler="graph", device_logits=True
    )
    plain = run_engine(lstm, together, prefill_chunk=8, sampler="graph", device_logits=False)
    assert_same(bound, plain)
    assert runs(metrics, lstm)[0] > 0


def test_the_engine_accounts_for_its_steps(lstm: Bundle) -> None:
    """`Engine.step_totals`: every worker step counted with the rows it advanced, and its CPU
    split into the model's (onnxruntime's runs and the sampler) and the engine's own."""

    async def body(engine: Engine) -> tuple[Any, Any]:
        before = engine.step_totals()
        await asyncio.gather(*(collect(engine, [7], 6, SamplingParams(seed=i)) for i in range(3)))
        return before, engine.step_totals()

    before, after = run_engine(lstm, body)
    assert (before.steps, before.rows, before.cpu_s, before.model_s) == (0, 0, 0.0, 0.0)
    # Three generations of 6 tokens: 18 rows sampled; the first tokens may come inline, off
    # the workers, and a step advances one to three rows.
    assert 15 <= after.rows <= 18 and after.rows / 3 <= after.steps <= after.rows
    assert 0 < after.model_s <= after.cpu_s
