"""The continuous cache's arithmetic against a plain per-position reference (no torch)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from server.continuous_cache import CacheParams, ContinuousCache, mix


def reference(features: np.ndarray, targets: np.ndarray, window: int, theta: float, vocab: int):
    """[T, vocab]: the cache's distribution at each position, one position at a time."""
    out = np.zeros((len(targets), vocab))
    for t in range(len(targets)):
        keys = range(max(0, t - window), t)
        if not keys:
            continue
        scores = np.array([theta * float(features[t] @ features[i]) for i in keys])
        weights = np.exp(scores - scores.max())
        for w, i in zip(weights / weights.sum(), keys, strict=True):
            out[t, targets[i]] += w
    return out


@pytest.mark.parametrize("chunk", [1, 3, 7, 50])
def test_recall_equals_the_reference_in_any_chunking(chunk: int) -> None:
    rng = np.random.default_rng(0)
    vocab, n, window, theta = 6, 40, 9, 0.7
    features = rng.normal(size=(n, 5)).astype(np.float32)
    targets = rng.integers(0, vocab, size=n)
    expected = reference(features, targets, window, theta, vocab)
    cache = ContinuousCache(window, theta, hidden=5)
    parts = [
        cache.recall(features[i : i + chunk], targets[i : i + chunk]) for i in range(0, n, chunk)
    ]
    p_cache = np.concatenate([p for p, _ in parts])
    seen = np.concatenate([s for _, s in parts])
    np.testing.assert_allclose(p_cache, expected[np.arange(n), targets], rtol=1e-5, atol=1e-9)
    assert not seen[0] and seen[1:].all()
    # The recall is a distribution over the tokens held, so the mixture is one too.
    np.testing.assert_allclose(expected[1:].sum(axis=1), 1.0)
    assert len(cache.values) == window


def test_mix_is_the_model_alone_while_the_cache_is_empty() -> None:
    logprobs = np.log(np.array([0.5, 0.25, 0.1], dtype=np.float32))
    p_cache = np.array([0.0, 1.0, 0.2])
    seen = np.array([False, True, True])
    mixed = mix(logprobs, p_cache, seen, lam=0.2)
    np.testing.assert_allclose(np.exp(mixed), [0.5, 0.8 * 0.25 + 0.2, 0.8 * 0.1 + 0.2 * 0.2])
    assert mixed.dtype == np.float32


def test_params_from_a_manifest_block() -> None:
    params = CacheParams.from_dict({"window": 500, "theta": 0.5, "lambda": 0.15, "other": 1})
    assert params == CacheParams(500, 0.5, 0.15)
    assert params.to_dict() == {"window": 500, "theta": 0.5, "lambda": 0.15}


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"window": 500, "theta": 0.5}, "missing lambda"),
        ({"window": 0, "theta": 0.5, "lambda": 0.1}, "window must be an integer of at least 1"),
        ({"window": True, "theta": 0.5, "lambda": 0.1}, "window must be an integer"),
        ({"window": 5, "theta": -1, "lambda": 0.1}, "theta must be a positive finite number"),
        ({"window": 5, "theta": "big", "lambda": 0.1}, "theta must be a number"),
        ({"window": 5, "theta": 0.5, "lambda": 1.0}, "lambda must be between 0 and 1"),
    ],
)
def test_bad_params_name_the_field(block: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CacheParams.from_dict(block)


# -- tuned after training, shipped in the bundle, served by Score ------------------------------

# Lines the tiny grammar never produces, each repeated: what the model cannot predict and the
# cache can, so tuning finds a setting that helps.
VALID = "the moon calls a red house .\n" * 3 + "a child hears the small boat .\n" * 3
TEST = "my friend finds the river .\n" * 4
TEXTS = ["the moon calls a red house . the moon calls a red house .", "a child hears the boat ."]
# Longer than a prefill chunk (128 tokens): the cache carries across the document's chunks.
LONG = " ".join(TEXTS * 15)


@pytest.fixture(scope="module")
def cached(tiny_checkpoint_factory, tmp_path_factory: pytest.TempPathFactory):
    """(checkpoint, bundle): the tiny word LSTM with a cache tuned on VALID, exported."""
    import shutil

    from tokenizers import Tokenizer

    from exporter.export import export_bundle
    from training.cache import tune, write_block
    from training.checkpoint import load_checkpoint
    from training.data import encode

    root = tmp_path_factory.mktemp("cached")
    directory = root / "checkpoint"
    shutil.copytree(tiny_checkpoint_factory("lstm", "word"), directory)
    checkpoint = load_checkpoint(directory)
    tokenizer = Tokenizer.from_file(str(checkpoint.tokenizer_path))
    block = tune(checkpoint.model, encode(tokenizer, VALID), encode(tokenizer, TEST))
    write_block(directory, block)
    bundle = export_bundle(directory, root / "models" / "tiny-cached", name="tiny-cached")
    return load_checkpoint(directory), bundle


def test_tuning_records_a_setting_that_helps(cached) -> None:
    checkpoint, bundle = cached
    block = checkpoint.continuous_cache
    assert block["valid_perplexity"] < block["valid_perplexity_without"]
    assert block["test_perplexity"] < block["test_perplexity_without"]
    assert block["window"] in (100, 200, 500, 1000, 2000)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["continuous_cache"] == block


def expected_scores(checkpoint, ids: list[int], params: CacheParams) -> np.ndarray:
    """PyTorch's log-probs of `ids` after eos, mixed by the per-position reference."""
    import torch

    eos = checkpoint.special_tokens["eos"]
    tokens = torch.tensor([[eos, *ids[:-1]]])
    with torch.no_grad():
        features, _ = checkpoint.model.features(tokens, checkpoint.model.initial_state(1))
        logprobs = torch.log_softmax(checkpoint.model.logits(features)[0].double(), -1).numpy()
    # Position t's features predict ids[t]; the pair (features[t], ids[t]) joins the cache.
    recalled = reference(
        features[0].numpy(), np.array(ids), params.window, params.theta, logprobs.shape[1]
    )
    model_p = np.exp(logprobs[np.arange(len(ids)), ids])
    mixed = (1 - params.lam) * model_p + params.lam * recalled[np.arange(len(ids)), ids]
    mixed[0] = model_p[0]  # the cache is empty at the first token
    return np.log(mixed)


def test_score_with_the_cache_equals_pytorch_mixed_by_the_reference(cached) -> None:
    from test_server import LiveServer, config
    from tokenizers import Tokenizer

    from rnnlm.client import Client

    checkpoint, bundle = cached
    tokenizer = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    params = CacheParams.from_dict(checkpoint.continuous_cache)
    server = LiveServer(config(bundle.parent))
    try:
        with Client(server.target, timeout=30) as client:
            (info,) = client.list_models()
            assert info.continuous_cache.window == params.window
            assert info.continuous_cache.mixture_weight == pytest.approx(params.lam)
            plain = client.score(TEXTS, return_token_logprobs=True)
            texts = [*TEXTS, LONG]
            response = client.score(texts, return_token_logprobs=True, continuous_cache=True)
    finally:
        server.close()
    for text, result in zip(texts, response.results, strict=True):
        ids = tokenizer.encode(text).ids
        expected = expected_scores(checkpoint, ids, params)
        got = [t.logprob for t in result.token_logprobs]
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)
        assert result.log_prob == pytest.approx(expected.sum(), rel=1e-4, abs=1e-3)
    # The first text repeats itself, so the cache lowers its perplexity.
    assert response.results[0].perplexity < plain.results[0].perplexity


def test_score_with_the_cache_is_the_same_batched_or_not(cached) -> None:
    import asyncio

    from server.bundle import load_bundle
    from server.engine import Engine, EngineConfig

    _, path = cached
    bundle = load_bundle(path)
    ids = bundle.tokenizer.encode(" ".join(TEXTS * 6)).ids

    async def scores(batching: bool) -> list[np.ndarray]:
        engine = Engine(bundle, EngineConfig(batching=batching, prefill_chunk=8))
        await engine.start()
        try:
            # Together with uncached scores of the same text, which share the runs.
            work = [engine.score(ids[: 20 + i * 7], i % 2 == 0) for i in range(6)]
            return await asyncio.gather(*work)
        finally:
            await engine.close()

    for on, off in zip(asyncio.run(scores(True)), asyncio.run(scores(False)), strict=True):
        np.testing.assert_allclose(on, off, rtol=1e-5, atol=1e-6)


def test_a_model_without_a_cache_refuses_it(default_bundle) -> None:
    import grpc
    from test_server import LiveServer, config

    from rnnlm.client import Client

    server = LiveServer(config(default_bundle.parent))
    try:
        with Client(server.target, timeout=30) as client:
            (info,) = client.list_models()
            assert not info.HasField("continuous_cache")
            with pytest.raises(grpc.RpcError) as e:
                client.score("the cat sees the moon .", continuous_cache=True)
    finally:
        server.close()
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "has no continuous cache" in e.value.details()


def test_a_score_graph_without_features_scores_the_cache_on_the_step_graph(
    cached, tmp_path
) -> None:
    """Bundles exported before the cache have a score graph without `features`: they still
    load, and their cached scores (run on the step graph) are the same."""
    import asyncio
    import shutil

    import onnx

    from server.bundle import load_bundle, sha256_file
    from server.engine import Engine, EngineConfig

    _, path = cached
    old = tmp_path / "tiny-cached"
    shutil.copytree(path, old)
    graph = onnx.load(str(old / "score.onnx"), load_external_data=False)
    (features,) = [o for o in graph.graph.output if o.name == "features"]
    graph.graph.output.remove(features)
    (old / "score.onnx").write_bytes(graph.SerializeToString())
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["graphs"]["score"]["outputs"].remove("features")
    manifest["files"]["score.onnx"] = sha256_file(old / "score.onnx")
    (old / "manifest.json").write_text(json.dumps(manifest))

    current, earlier = load_bundle(path), load_bundle(old)
    assert current.score_features and not earlier.score_features
    ids = current.tokenizer.encode(LONG).ids

    async def scores(bundle) -> list[np.ndarray]:
        engine = Engine(bundle, EngineConfig(prefill_chunk=16))
        await engine.start()
        try:
            return [await engine.score(ids, cached) for cached in (False, True)]
        finally:
            await engine.close()

    for a, b in zip(asyncio.run(scores(current)), asyncio.run(scores(earlier)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


# -- the next token after a context: PredictNext and TypingSession -----------------------------


def test_next_token_with_the_cache_is_scores_last_token(cached) -> None:
    """The cached next-token distribution is a distribution, and its entry for a word is what
    cached Score gives that word after the same context: one cache, two paths. Contexts shorter
    and longer than the window, with and without a cached prefix state to start from."""
    import asyncio

    from server.bundle import load_bundle
    from server.engine import Engine, EngineConfig

    _, path = cached
    bundle = load_bundle(path)
    window = bundle.continuous_cache.window
    long_ids = bundle.tokenizer.encode(LONG).ids
    assert len(long_ids) > window + 20
    contexts = [[], long_ids[:1], long_ids[:9], long_ids[: window + 1], long_ids[: window + 17]]
    probes = sorted(set(long_ids))[:6]

    async def check() -> None:
        engine = Engine(bundle, EngineConfig(prefill_chunk=16))
        await engine.start()
        try:
            for warm in (False, True):
                for ids in contexts:
                    if warm:  # plain calls leave prefix states in the state cache
                        await engine.next_token_logprobs(ids[: len(ids) // 2])
                        await engine.next_token_logprobs(ids[: max(0, len(ids) - window - 3)])
                    mixed = await engine.next_token_logprobs(ids, continuous_cache=True)
                    assert np.exp(mixed.astype(np.float64)).sum() == pytest.approx(1.0, abs=1e-4)
                    for w in probes:
                        scored = await engine.score([*ids, w], continuous_cache=True)
                        assert mixed[w] == pytest.approx(scored[-1], abs=2e-4)
            plain = await engine.next_token_logprobs(long_ids[:40])
            assert not np.allclose(plain, await engine.next_token_logprobs(long_ids[:40], True))
            # The typing pattern: each call extends the last, so the recall cache has the
            # features and each call feeds only its new tokens. Same numbers as Score's.
            ids = long_ids[: window + 30]
            for n in range(window - 5, window + 30, 3):
                mixed = await engine.next_token_logprobs(ids[:n], continuous_cache=True)
                scored = await engine.score(ids[: n + 1], continuous_cache=True)
                assert mixed[ids[n]] == pytest.approx(scored[-1], abs=2e-4)
                again = await engine.next_token_logprobs(ids[:n], continuous_cache=True)
                np.testing.assert_array_equal(again, mixed)  # an exact hit, no run
            assert len(engine.recall_cache) > 10
            assert engine.recall_cache.bytes <= engine.recall_cache.capacity
        finally:
            await engine.close()

    asyncio.run(check())


def test_predict_next_and_typing_with_the_cache(cached, default_bundle) -> None:
    import grpc
    from test_server import LiveServer, config

    from rnnlm.client import Client
    from rnnlm.v1 import language_model_pb2 as pb

    _, path = cached
    context = "the moon calls a red house . the moon calls a"
    server = LiveServer(config(path.parent))
    try:
        with Client(server.target, timeout=30) as client:
            k = 20
            plain = client.predict_next(context, k=k)
            recalled = client.predict_next(context, k=k, continuous_cache=True)
            # The word cache (on in sessions by default) would confound the continuous cache's.
            events = [pb.TypingEvent(text=context, k=k, continuous_cache=True, word_cache=False)]
            (typed,) = list(client.typing_session(events))
    finally:
        server.close()
    assert [p.token for p in typed.predictions] == [p.token for p in recalled.predictions]
    probability = {p.token: p.probability for p in plain.predictions}
    recalled_probability = {p.token: p.probability for p in recalled.predictions}
    # "red" followed "calls a" earlier in the context: the cache makes it likelier.
    assert recalled_probability["red"] > probability.get("red", 0.0)

    server = LiveServer(config(default_bundle.parent))
    try:
        with Client(server.target, timeout=30) as client, pytest.raises(grpc.RpcError) as e:
            client.predict_next("the cat", continuous_cache=True)
    finally:
        server.close()
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_test_figures_count_the_top_k_hits(cached) -> None:
    """The recorded accuracy equals a count made here from PyTorch's outputs and the
    per-position reference, the special tokens never suggested nor counted; the perplexities
    from the same pass equal the reference mixture's."""
    import torch
    from tokenizers import Tokenizer

    from training.cache import test_figures
    from training.data import encode

    checkpoint, _ = cached
    params = CacheParams.from_dict(checkpoint.continuous_cache)
    tokenizer = Tokenizer.from_file(str(checkpoint.tokenizer_path))
    ids = encode(tokenizer, TEST + VALID)
    never = tuple(v for v in checkpoint.special_tokens.values() if v is not None)
    figures = test_figures(checkpoint.model, ids, params, never, ks=(1, 2))
    got = figures["suggestion_accuracy"]

    with torch.no_grad():
        features, _ = checkpoint.model.features(ids[None, :-1], checkpoint.model.initial_state(1))
        p_model = torch.softmax(checkpoint.model.logits(features)[0].double(), -1).numpy()
    targets = ids[1:].numpy()
    recalled = reference(features[0].numpy(), targets, params.window, params.theta, len(p_model[0]))
    mixed = (1 - params.lam) * p_model + params.lam * recalled
    mixed[0] = p_model[0]  # nothing to recall at the first position
    rows = np.arange(len(targets))
    for key, p in (("perplexity_without", p_model), ("perplexity", mixed)):
        assert figures[key] == pytest.approx(np.exp(-np.log(p[rows, targets]).mean()), rel=1e-5)
    keep = ~np.isin(targets, never)
    expected = {}
    for name, p in (("without", p_model), ("with", mixed)):
        p = p.copy()
        p[:, list(never)] = -1.0
        order = np.argsort(-p, axis=1)[keep]
        expected[name] = [
            float(np.mean((order[:, :k] == targets[keep, None]).any(axis=1))) for k in (1, 2)
        ]
    assert got["positions"] == int(keep.sum())
    assert got["without"] == pytest.approx(expected["without"])
    assert got["with"] == pytest.approx(expected["with"])
