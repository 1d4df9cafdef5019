"""A plain PredictNext's path, pinned on results and counts (never on time): a lone call runs
its model step at once instead of waiting a turn of the event loop for other calls to join
it, and gives what a joined call gives.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import numpy as np

from server.bundle import load_bundle
from server.engine import Engine, EngineConfig
from server.metrics import Metrics
from server.text import TextCodec
from server.typing import Ask, Memory, Predicted, predict_tokens
from server.words import Filters, Matcher, WordSettings
from tests.test_engine import wait_until


def _batch_runs(metrics: Metrics, model: str) -> tuple[float, float]:
    """(onnxruntime runs, rows summed over them) the engine recorded so far."""
    labels = {"model": model}
    count = metrics.registry.get_sample_value("rnnlm_batch_size_count", labels) or 0.0
    total = metrics.registry.get_sample_value("rnnlm_batch_size_sum", labels) or 0.0
    return count, total


def test_calls_that_do_not_join_run_alone_and_answer_the_same(
    tiny_bundle_factory: Callable[..., Path],
) -> None:
    """Three calls made in one turn of the event loop: with `join` they share one engine run;
    without, each runs at once in a run of its own. The suggestions are the same."""
    bundle = load_bundle(tiny_bundle_factory("lstm", "word"))
    codec = TextCodec(bundle)
    prefix = codec.encode("the cat sees the ")
    contexts = [prefix + codec.encode(word) for word in ("sun", "moon", "cat")]
    match, filters, settings = Matcher("", False), Filters(), WordSettings()

    async def run(join: bool) -> tuple[list[Predicted], tuple[float, float]]:
        metrics = Metrics()
        engine = Engine(bundle, EngineConfig(), metrics.engine_metrics(bundle.name, "v"))
        await engine.start()

        async def one(ids: list[int]) -> Predicted:
            ask = Ask(codec, 5, match, filters, settings, Memory(), join=join)
            return await predict_tokens(engine, ids, ask)

        try:
            await one(prefix)  # the calls' common context, cached
            # The worker waiting with nothing to do: each call then runs on the event loop at
            # once (while its thread is still starting, calls are queued and it batches them).
            await wait_until(engine._idle_now)
            before = _batch_runs(metrics, bundle.name)
            predicted = list(await asyncio.gather(*(one(c) for c in contexts)))
            after = _batch_runs(metrics, bundle.name)
        finally:
            await engine.close()
        return predicted, (after[0] - before[0], after[1] - before[1])

    joined, joined_runs = asyncio.run(run(join=True))
    alone, alone_runs = asyncio.run(run(join=False))
    assert joined_runs == (1, len(contexts))
    assert alone_runs == (len(contexts), len(contexts))
    for a, b in zip(alone, joined, strict=True):
        assert a.steps == b.steps == 1
        assert [s.text for s in a.suggestions] == [s.text for s in b.suggestions]
        np.testing.assert_allclose(
            [s.probability for s in a.suggestions],
            [s.probability for s in b.suggestions],
            rtol=1e-5,
        )
