"""What a typing event costs the server, pinned on results and counts (never on time): the
word model's top tokens without a full sort, and the model steps of sessions woken together
joined into one batch of the engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from server import words
from server.bundle import load_bundle
from server.engine import Engine, EngineConfig
from server.metrics import Metrics
from server.text import TextCodec
from server.typing import Ask, Memory, Predicted, predict_tokens
from server.words import Filters, Matcher, WordSettings, choose, top_ids, vocab_words


@pytest.fixture(params=["native", "numpy"])
def top_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """`top_ids` natively (where the extension is built) and in numpy."""
    if request.param == "numpy":
        monkeypatch.setattr(words, "native_top_k", lambda values, k: None)
    return str(request.param)


@pytest.mark.parametrize("size", [1, 5, 63, 64, 65, 1000, 10_000])
@pytest.mark.parametrize("n", [1, 3, 18, 200])
def test_top_ids_are_the_n_largest(size: int, n: int, top_path: str) -> None:
    rng = np.random.default_rng(size * 1000 + n)
    row = rng.standard_normal(size).astype(np.float32)
    row[rng.integers(0, size, size // 10)] = -np.inf  # tokens a model never predicts
    row[rng.integers(0, size, size // 10)] = row[0]  # ties
    ids = top_ids(row, n)
    assert ids.size == min(n, size) and np.unique(ids).size == ids.size
    np.testing.assert_array_equal(np.sort(row[ids]), np.sort(row)[size - ids.size :])


def test_top_ids_of_a_row_with_few_finite_values(top_path: str) -> None:
    row = np.full(4096, -np.inf, dtype=np.float32)
    row[[7, 4000]] = [-1.0, -2.0]
    ids = top_ids(row, 10)
    assert ids.size == 10 and {7, 4000} <= set(ids.tolist())


def _batch_runs(metrics: Metrics, model: str) -> tuple[float, float]:
    """(onnxruntime runs, rows summed over them) the engine recorded so far."""
    labels = {"model": model}
    count = metrics.registry.get_sample_value("rnnlm_batch_size_count", labels) or 0.0
    total = metrics.registry.get_sample_value("rnnlm_batch_size_sum", labels) or 0.0
    return count, total


def test_sessions_woken_together_share_one_model_step(
    tiny_bundle_factory: Callable[..., Path],
) -> None:
    """Word-model keystrokes of three sessions in one turn of the event loop (each adding a
    word to a context the engine has cached) run as one batch of the engine, each answered
    as if alone and each counting its own step."""
    bundle = load_bundle(tiny_bundle_factory("lstm", "word"))
    codec = TextCodec(bundle)
    prefix = codec.encode("the cat sees the ")
    contexts = [prefix + codec.encode(word) for word in ("sun", "moon", "cat")]
    match, filters, settings = Matcher("", False), Filters(), WordSettings()

    async def one(engine: Engine, ids: list[int]) -> Predicted:
        return await predict_tokens(engine, ids, Ask(codec, 5, match, filters, settings, Memory()))

    async def run(together: bool) -> tuple[list[Predicted], tuple[float, float]]:
        metrics = Metrics()
        engine = Engine(bundle, EngineConfig(), metrics.engine_metrics(bundle.name, "v"))
        await engine.start()
        try:
            await one(engine, prefix)  # the sessions' common context, cached
            before = _batch_runs(metrics, bundle.name)
            if together:
                predicted = list(await asyncio.gather(*(one(engine, c) for c in contexts)))
            else:
                predicted = [await one(engine, c) for c in contexts]
            after = _batch_runs(metrics, bundle.name)
        finally:
            await engine.close()
        return predicted, (after[0] - before[0], after[1] - before[1])

    alone, alone_runs = asyncio.run(run(together=False))
    together, together_runs = asyncio.run(run(together=True))
    assert alone_runs == (len(contexts), len(contexts))
    assert together_runs == (1, len(contexts))
    for a, b in zip(alone, together, strict=True):
        assert a.steps == b.steps == 1
        assert [s.text for s in a.suggestions] == [s.text for s in b.suggestions]
        np.testing.assert_allclose(
            [s.probability for s in a.suggestions],
            [s.probability for s in b.suggestions],
            rtol=1e-5,
        )


@pytest.mark.parametrize("folding", [False, True])
def test_a_word_models_suggestions_are_the_k_likeliest_of_all(
    tiny_bundle_factory: Callable[..., Path], folding: bool
) -> None:
    """The few candidates a keystroke takes from the row give what choosing among every
    token would (blocked words and user words included)."""
    bundle = load_bundle(tiny_bundle_factory("lstm", "word"))
    codec = TextCodec(bundle)
    ids = codec.encode("the cat sees the ")
    filters = Filters(frozenset({"sun"}), ("moon", "Zelda"))
    settings = WordSettings()

    async def main() -> tuple[np.ndarray, list[tuple[str, int, Predicted]]]:
        engine = Engine(bundle, EngineConfig())
        await engine.start()
        try:
            logprobs = await engine.next_token_logprobs(ids)
            out = []
            for partial in ("", "s", "m", "Mo", "MO", "t", "th", "Z"):
                for k in (1, 3, 8):
                    match = Matcher(partial, folding)
                    memory = Memory()
                    ask = Ask(codec, k, match, filters, settings, memory)
                    predicted = await predict_tokens(engine, ids, ask)
                    out.append((partial, k, predicted))
            return logprobs, out
        finally:
            await engine.close()

    logprobs, predictions = asyncio.run(main())
    for partial, k, predicted in predictions:
        match = Matcher(partial, folding)
        every, total = vocab_words(codec, logprobs, match, filters, codec.vocab_size)
        expected = choose(every, k, match, filters, settings, total)
        assert [(s.text, s.ids) for s in predicted.suggestions] == [
            (s.text, s.ids) for s in expected
        ], (partial, k)
        np.testing.assert_allclose(
            [s.probability for s in predicted.suggestions],
            [s.probability for s in expected],
            rtol=1e-9,
        )


def test_an_engine_a_session_used_is_freed_when_closed(
    tiny_bundle_factory: Callable[..., Path],
) -> None:
    """The sessions' shared runs are kept per engine without keeping the engine: a reload
    that replaces a model's engine must not leave the old one (its sessions, its caches) alive."""
    import gc
    import weakref

    bundle = load_bundle(tiny_bundle_factory("lstm", "word"))
    codec = TextCodec(bundle)

    async def use_and_close() -> weakref.ref[Engine]:
        engine = Engine(bundle, EngineConfig())
        await engine.start()
        try:
            ask = Ask(codec, 3, Matcher("", False), Filters(), WordSettings(), Memory())
            await predict_tokens(engine, codec.encode("the cat "), ask)
        finally:
            await engine.close()
        return weakref.ref(engine)

    gone = asyncio.run(use_and_close())
    gc.collect()
    assert gone() is None
