"""The engine core in its own process (`EngineConfig.process`, `--engine-process`).

The engine's, the scheduler's and the server's tests run again here with the flag on (their
modules' config makers patched), so every result is checked through the split as well. Left
out: the tests that read the in-process engine's internals (its scheduler, its state cache
object, a request's step count, a patched scheduler constant) and the one that counts the
steps between closing a stream and its leaving, which through the channel is the steps run
while the cancel crosses it (the leaving itself is checked below). The
tests below check what only the split has: the core process never outlives its engine, its
caller, or its parent.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any

import pytest
import test_engine
import test_server
from test_engine import (  # the engine's tests that read no internals, run here again
    Direct,
    close,
    run_engine,
    runs,
    test_a_bundle_without_a_prefill_graph_gives_the_same_results,
    test_a_context_runs_on_the_prefill_graph_but_its_last_token,
    test_a_short_feed_runs_whole_on_the_step_graph,
    test_bad_inputs_name_the_problem,
    test_batching_on_and_off_give_the_same_results,
    test_cancelling_a_call_removes_its_request,
    test_close_fails_pending_requests,
    test_cuda_without_a_gpu_fails_at_start,
    test_embed_pools_the_last_layer_features,
    test_engine_must_be_started,
    test_greedy_generation_is_the_argmax_of_the_model,
    test_next_token_logprobs_match_the_model,
    test_score_matches_the_step_graph_across_chunks,
    test_seeded_generation_ignores_its_companions,
    test_step_budget_and_run_splits_never_change_results,
    test_stop_ids_end_generation_after_the_stop_token,
    test_under_load_tokens_arrive_a_few_at_a_time,
    wait_until,
)
from test_scheduler import (  # likewise the scheduler's
    test_a_seeded_generation_is_the_same_alone_and_among_64_or_more,
    test_generations_take_turns_beyond_the_step_time,
    test_logits_left_on_the_device_give_the_same_results,
    test_the_graph_native_and_numpy_samplers_draw_the_same_tokens,
)
from test_server import *  # noqa: F403 (the server's tests and fixtures, run with the flag)

from server.bundle import Bundle
from server.engine import Engine, EngineConfig, SamplingParams, open_engine
from server.engine_errors import EngineClosed
from server.metrics import Metrics
from server.remote_engine import RemoteEngine

__all__ = [  # the imported tests, collected here (with the flag on)
    "test_a_bundle_without_a_prefill_graph_gives_the_same_results",
    "test_a_context_runs_on_the_prefill_graph_but_its_last_token",
    "test_a_seeded_generation_is_the_same_alone_and_among_64_or_more",
    "test_a_short_feed_runs_whole_on_the_step_graph",
    "test_bad_inputs_name_the_problem",
    "test_batching_on_and_off_give_the_same_results",
    "test_cancelling_a_call_removes_its_request",
    "test_close_fails_pending_requests",
    "test_cuda_without_a_gpu_fails_at_start",
    "test_embed_pools_the_last_layer_features",
    "test_engine_must_be_started",
    "test_generations_take_turns_beyond_the_step_time",
    "test_greedy_generation_is_the_argmax_of_the_model",
    "test_logits_left_on_the_device_give_the_same_results",
    "test_next_token_logprobs_match_the_model",
    "test_score_matches_the_step_graph_across_chunks",
    "test_seeded_generation_ignores_its_companions",
    "test_step_budget_and_run_splits_never_change_results",
    "test_stop_ids_end_generation_after_the_stop_token",
    "test_the_graph_native_and_numpy_samplers_draw_the_same_tokens",
    "test_under_load_tokens_arrive_a_few_at_a_time",
]


class _Engine:
    """`Engine` as the imported tests see it: their unbound calls (`Engine.score(engine, ...)`)
    dispatch on the instance, which is the front end `RemoteEngine`."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Engine:  # type: ignore[misc]
        return open_engine(*args, **kwargs)

    @staticmethod
    def next_token_logprobs(engine: Engine, *args: Any, **kwargs: Any) -> Awaitable[Any]:
        return engine.next_token_logprobs(*args, **kwargs)

    @staticmethod
    def score(engine: Engine, *args: Any, **kwargs: Any) -> Awaitable[Any]:
        return engine.score(*args, **kwargs)

    @staticmethod
    def embed(engine: Engine, *args: Any, **kwargs: Any) -> Awaitable[Any]:
        return engine.embed(*args, **kwargs)


@pytest.fixture(scope="module", autouse=True)
def engine_process() -> Iterator[None]:
    """Every engine the imported tests make runs its core in a process of its own."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(test_engine, "EngineConfig", functools.partial(EngineConfig, process=True))
        patch.setattr(test_engine, "Engine", _Engine)
        config = functools.partial(test_server.config, engine_process=True)
        patch.setattr(test_server, "config", config)
        yield


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_the_flag_makes_a_front_end_with_the_same_results(lstm: Bundle) -> None:
    direct = Direct(lstm)
    metrics = Metrics()

    async def body(engine: Engine) -> tuple[object, object]:
        assert isinstance(engine, RemoteEngine)
        return await engine.next_token_logprobs([3, 4]), engine.provider

    logprobs, provider = run_engine(lstm, body, metrics, process=True)
    close(logprobs, direct.logprobs([3, 4])[-1])
    assert provider == "CPUExecutionProvider"
    assert runs(metrics, lstm)[0] >= 1  # the core's metric events reached this registry


def test_close_ends_the_core_process(lstm: Bundle) -> None:
    async def main() -> int:
        engine = open_engine(lstm, EngineConfig(process=True))
        await engine.start()
        assert isinstance(engine, RemoteEngine) and engine._process is not None
        stream = engine.generate([1], 10**9, SamplingParams(seed=4))
        await anext(stream)  # a generation running when the engine closes
        await engine.close()
        return engine._process.pid

    pid = asyncio.run(main())
    assert not alive(pid)


def test_cancelled_and_timed_out_calls_leave_the_core(lstm: Bundle) -> None:
    async def body(engine: Engine) -> None:
        streams = [engine.generate([1], 10**9, SamplingParams(seed=i)) for i in range(3)]
        for stream in streams:
            await anext(stream)
        await wait_until(lambda: engine.active == 3)
        await streams[0].aclose()
        await streams[1].aclose()
        await wait_until(lambda: engine.active == 1)
        with pytest.raises(TimeoutError):  # a deadline: 20000 one-token steps take seconds
            async with asyncio.timeout(0.05):
                await engine.score([4] * 20000)
        await wait_until(lambda: engine.active == 1)
        await streams[-1].aclose()
        await wait_until(lambda: engine.active == 0)
        idle = runs(metrics, lstm)
        await asyncio.sleep(0.05)
        assert runs(metrics, lstm) == idle  # nothing left running in the core

    metrics = Metrics()
    run_engine(lstm, body, metrics, process=True, prefill_chunk=1)


def test_callers_get_engine_closed_when_the_core_dies(lstm: Bundle) -> None:
    async def body(engine: Engine) -> None:
        assert isinstance(engine, RemoteEngine) and engine._process is not None
        stream = engine.generate([1], 10**9, SamplingParams(seed=4))
        await anext(stream)
        engine._process.kill()
        with pytest.raises(EngineClosed):
            async for _ in stream:
                pass
        with pytest.raises(EngineClosed):
            await engine.next_token_logprobs([1, 2, 3, 4, 5, 6, 7, 8])

    run_engine(lstm, body, process=True)


PARENT = """
import asyncio, sys
from server.bundle import load_bundle
from server.engine import EngineConfig, open_engine

async def main():
    engine = open_engine(load_bundle(sys.argv[1]), EngineConfig(process=True))
    await engine.start()
    print(engine._process.pid, flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


def test_the_core_dies_with_its_server_process(lstm: Bundle) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(lstm.path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        assert alive(pid)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not alive(pid)


def test_the_server_runs_each_engine_core_in_a_process(live: test_server.LiveServer) -> None:
    repository = live.server.repository
    assert repository is not None and repository.models
    for model in repository.models:
        engine = model.engine
        assert isinstance(engine, RemoteEngine) and engine._process is not None
        assert engine._process.poll() is None
