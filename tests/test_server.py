"""A real server on 127.0.0.1 with real tiny bundles, called over gRPC; checked against PyTorch.

The server runs in its own event loop on a background thread (as `rnnlm serve` runs it, minus
the signal handling that tests/test_client_cli.py covers); the tests call it with the
synchronous client, like any other process would.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from tokenizers import Tokenizer

from rnnlm.client import Client
from rnnlm.v1 import language_model_pb2 as pb
from rnnlm.v1 import language_model_pb2_grpc as pb_grpc
from server import servicer as servicer_module
from server.app import RnnlmServer
from server.config import ConfigError, ServerConfig, add_arguments, config_from_args
from server.front_end import Handlers, NativeFrontEnd, RelayedCall
from server.front_end import available as front_end_built
from server.repository import ModelRepository, NoDefaultModel, RepositoryError
from training.checkpoint import Checkpoint, load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = "tiny-lstm-word"
MODELS = {DEFAULT: ("lstm", "word"), "tiny-gru-char": ("gru", "char"),
          "tiny-rnn_tanh-bpe": ("rnn_tanh", "bpe")}  # fmt: skip
MAX_TOKENS_CAP = 100_000
MAX_PROMPT_TOKENS = 300
TEXTS = ["the cat sees the moon .", "a dog likes a red house .\nthe bird finds a tree ."]
Code = grpc.StatusCode
# The native front end where it was built (setup.py, with grpc++), and grpc.aio.
FRONT_ENDS = [
    "python",
    pytest.param(
        "native",
        marks=pytest.mark.skipif(
            not front_end_built(), reason="the native front end was not built (needs grpc++)"
        ),
    ),
]


class LiveServer:
    """An `RnnlmServer` serving on 127.0.0.1, its event loop running in a daemon thread."""

    def __init__(self, config: ServerConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = RnnlmServer(config)
        try:
            self.run(self.server.start())
        except BaseException:
            self._stop_loop()
            raise
        self.target = f"127.0.0.1:{self.server.port}"

    def run(self, coro: Any, timeout: float = 120) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.run(self.server.stop(grace=1))
        self._stop_loop()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def scrape(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        """The /metrics endpoint, parsed: (sample name, labels) -> value."""
        url = f"http://127.0.0.1:{self.server.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }


def metric(samples: dict, name: str, **labels: str) -> float:
    return float(samples.get((name, frozenset(labels.items())), 0.0))


def config(models: Path, **overrides: Any) -> ServerConfig:
    values: dict[str, Any] = dict(
        models=models,
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        max_tokens=MAX_TOKENS_CAP,
        max_prompt_tokens=MAX_PROMPT_TOKENS,
        grace_seconds=2.0,
    )
    values.update(overrides)
    return ServerConfig(**values)


def copy_bundle(source: Path, target: Path, version: str | None = None) -> None:
    shutil.copytree(source, target)
    if version is not None:
        manifest = json.loads((target / "manifest.json").read_text())
        manifest["version"] = version
        (target / "manifest.json").write_text(json.dumps(manifest, indent=2))


@pytest.fixture(scope="module")
def repository(
    tiny_bundle_factory: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """Two layouts in one repository: tiny-lstm-word/{1,2}/ and two bundles directly below."""
    root = tmp_path_factory.mktemp("repository")
    for name, (cell, tokenizer) in MODELS.items():
        bundle = tiny_bundle_factory(cell, tokenizer)
        if name == DEFAULT:
            copy_bundle(bundle, root / name / "1")
            copy_bundle(bundle, root / name / "2", version="2")
        else:
            copy_bundle(bundle, root / name)
    return root


@pytest.fixture(scope="module", params=FRONT_ENDS)
def live(repository: Path, request: pytest.FixtureRequest) -> Iterator[LiveServer]:
    """The server, once with each front end: every test of the API runs over both."""
    server = LiveServer(config(repository, default_model=DEFAULT, front_end=request.param))
    yield server
    server.close()


@pytest.fixture(scope="module")
def client(live: LiveServer) -> Iterator[Client]:
    with Client(live.target, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def stub(live: LiveServer) -> Iterator[pb_grpc.LanguageModelStub]:
    """The raw generated stub, for requests the client would not build (NaN, unknown enums)."""
    with grpc.insecure_channel(live.target) as channel:
        yield pb_grpc.LanguageModelStub(channel)


@pytest.fixture(scope="module")
def reference(
    tiny_checkpoint_factory: Callable[..., Path], tiny_bundle_factory: Callable[..., Path]
) -> Callable[[str], tuple[Checkpoint, Tokenizer]]:
    """model name -> (the PyTorch checkpoint, the bundle's tokenizer)."""
    cache: dict[str, tuple[Checkpoint, Tokenizer]] = {}

    def get(name: str) -> tuple[Checkpoint, Tokenizer]:
        if name not in cache:
            cell, tokenizer = MODELS[name]
            checkpoint = load_checkpoint(tiny_checkpoint_factory(cell, tokenizer))
            bundle = tiny_bundle_factory(cell, tokenizer)
            cache[name] = (checkpoint, Tokenizer.from_file(str(bundle / "tokenizer.json")))
        return cache[name]

    return get


def torch_logprobs(checkpoint: Checkpoint, ids: list[int]) -> np.ndarray:
    """[len(ids) + 1, V]: the next-token log-softmax after eos, then after each token."""
    eos = checkpoint.special_tokens["eos"]
    tokens = torch.tensor([[eos, *ids]])
    with torch.no_grad():
        logits, _ = checkpoint.model(tokens, checkpoint.model.initial_state(1))
        return torch.log_softmax(logits[0].double(), -1).numpy()


def torch_features(checkpoint: Checkpoint, ids: list[int]) -> np.ndarray:
    """[len(ids), hidden]: the last layer's outputs after each token of the text (after eos)."""
    eos = checkpoint.special_tokens["eos"]
    tokens = torch.tensor([[eos, *ids]])
    with torch.no_grad():
        features, _ = checkpoint.model.features(tokens, checkpoint.model.initial_state(1))
    return features[0, 1:].numpy()


def torch_greedy(checkpoint: Checkpoint, prompt: list[int], n: int) -> list[int]:
    banned = [v for k, v in checkpoint.special_tokens.items() if k == "unk" and v is not None]
    ids = list(prompt)
    for _ in range(n):
        logprobs = torch_logprobs(checkpoint, ids)[-1]
        logprobs[banned] = -np.inf
        ids.append(int(np.argmax(logprobs)))
    return ids[len(prompt) :]


def assert_healthy(client: Client) -> None:
    assert client.health() == "SERVING"
    assert client.predict_next("the", k=1).predictions


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def chunks_of(stream: Any) -> list[pb.GenerateResponse]:
    return list(stream)


# -- models, health, reflection ---------------------------------------------------------------


def test_list_and_get_models(client: Client, repository: Path) -> None:
    models = client.list_models()
    assert [(m.name, m.version) for m in models] == [
        ("tiny-gru-char", "1"),
        ("tiny-lstm-word", "1"),
        ("tiny-lstm-word", "2"),
        ("tiny-rnn_tanh-bpe", "1"),
    ]
    assert [m.is_default for m in models] == [False, False, True, False]
    manifest = json.loads((repository / DEFAULT / "2" / "manifest.json").read_text())
    info = client.get_model()
    assert (info.name, info.version, info.is_default) == (DEFAULT, "2", True)
    assert info.architecture.cell == "lstm"
    assert info.architecture.layers == manifest["architecture"]["layers"]
    assert info.architecture.hidden == manifest["architecture"]["hidden"]
    assert info.architecture.embedding == manifest["architecture"]["embedding"]
    assert info.architecture.tied == manifest["architecture"]["tied"]
    assert info.vocab_size == info.architecture.vocab_size == manifest["architecture"]["vocab_size"]
    assert info.tokenizer_kind == "word"
    assert info.provider == "CPUExecutionProvider"
    assert info.precision == manifest["precision"]
    assert info.eos_token_id == manifest["tokenizer"]["special_tokens"]["eos"]
    prov = manifest["provenance"]
    assert info.quality.valid_perplexity == pytest.approx(prov["valid_perplexity"])
    assert info.quality.test_perplexity == pytest.approx(prov["test_perplexity"])
    assert info.quality.tokens_seen == prov["tokens_seen"]
    assert info.quality.corpus_sha256 == prov["corpus_sha256"]
    assert client.get_model(DEFAULT, "1").version == "1"
    assert client.get_model("tiny-gru-char").tokenizer_kind == "char"


def test_health_is_serving_overall_and_per_service(client: Client) -> None:
    assert client.health() == "SERVING"
    assert client.health("rnnlm.v1.LanguageModel") == "SERVING"


def test_reflection_lists_and_describes_the_service(live: LiveServer) -> None:
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(live.target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"rnnlm.v1.LanguageModel", "grpc.health.v1.Health"} <= services
        service = DescriptorPool(database).FindServiceByName("rnnlm.v1.LanguageModel")
        assert {m.name for m in service.methods} >= {"Generate", "PredictNext", "Score"}


# -- Score, PredictNext, Embed against PyTorch ---------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_score_equals_pytorch_perplexity(client: Client, reference: Callable, name: str) -> None:
    checkpoint, tokenizer = reference(name)
    # The third text is longer than a prefill chunk, so state is carried across chunks.
    long_text = " ".join(["the old man calls the small boat ."] * 40)
    texts = [*TEXTS, long_text]
    response = client.score(texts, model=name, return_token_logprobs=True)
    assert len(response.results) == len(texts)
    for text, result in zip(texts, response.results, strict=True):
        ids = tokenizer.encode(text).ids
        expected = torch_logprobs(checkpoint, ids)[np.arange(len(ids)), ids]
        assert result.num_tokens == len(ids)
        assert result.log_prob == pytest.approx(expected.sum(), rel=1e-4, abs=1e-3)
        assert result.perplexity == pytest.approx(math.exp(-expected.sum() / len(ids)), rel=1e-4)
        assert result.perplexity == pytest.approx(math.exp(-result.log_prob / result.num_tokens))
        assert [t.token_id for t in result.token_logprobs] == ids
        np.testing.assert_allclose(
            [t.logprob for t in result.token_logprobs], expected, rtol=1e-3, atol=1e-4
        )
        assert [t.token for t in result.token_logprobs] == [tokenizer.decode([i]) for i in ids]


def test_score_without_token_logprobs_and_counted(live: LiveServer, client: Client) -> None:
    before = live.scrape()
    response = client.score(TEXTS[0])
    (result,) = response.results
    assert not result.token_logprobs
    assert response.model_version == "2"
    after = live.scrape()
    scored = "rnnlm_scored_tokens_total"
    assert metric(after, scored, model=DEFAULT) - metric(before, scored, model=DEFAULT) == (
        result.num_tokens
    )


@pytest.mark.parametrize("name", [DEFAULT, "tiny-gru-char"])
def test_predict_next_equals_pytorch_softmax(
    client: Client, reference: Callable, name: str
) -> None:
    checkpoint, tokenizer = reference(name)
    context = "the cat sees "
    ids = tokenizer.encode(context).ids
    probs = np.exp(torch_logprobs(checkpoint, ids)[-1])
    special = set(checkpoint.special_tokens.values())
    k = 5
    response = client.predict_next(context, k=k, model=name, next_tokens=True)
    assert response.context_tokens == len(ids)
    got = [(p.token_id, p.probability) for p in response.predictions]
    assert len(got) == k
    ranked = [i for i in np.argsort(-probs, kind="stable") if int(i) not in special][:k]
    assert [i for i, _ in got] == [int(i) for i in ranked]
    np.testing.assert_allclose([p for _, p in got], probs[ranked], rtol=1e-4, atol=1e-6)
    for p in response.predictions:
        assert p.token == tokenizer.decode([p.token_id])
        assert p.token_id not in special


def test_predict_next_partial_word_restricts_and_renormalises(
    client: Client, reference: Callable
) -> None:
    checkpoint, tokenizer = reference(DEFAULT)
    context = "the old man calls the "
    ids = tokenizer.encode(context).ids
    probs = np.exp(torch_logprobs(checkpoint, ids)[-1])
    vocab = tokenizer.get_vocab()
    matching = {i for w, i in vocab.items() if w.startswith("s") and not w.startswith("<")}
    assert len(matching) >= 2
    response = client.predict_next(context, k=len(vocab), partial_word="s")
    assert {p.token_id for p in response.predictions} == matching
    assert all(p.token.startswith("s") for p in response.predictions)
    total = probs[sorted(matching)].sum()
    for p in response.predictions:
        assert p.probability == pytest.approx(probs[p.token_id] / total, rel=1e-4)
    assert sum(p.probability for p in response.predictions) == pytest.approx(1.0, rel=1e-5)
    probabilities = [p.probability for p in response.predictions]
    assert probabilities == sorted(probabilities, reverse=True)
    assert client.predict_next(context, k=3, partial_word="zzz").predictions == []


@pytest.mark.parametrize("pooling", ["last", "mean", "max"])
def test_embed_pools_the_pytorch_features(
    client: Client, reference: Callable, pooling: str
) -> None:
    checkpoint, tokenizer = reference(DEFAULT)
    response = client.embed(TEXTS, pooling=pooling)
    assert response.dimension == checkpoint.config.hidden
    for text, embedding in zip(TEXTS, response.embeddings, strict=True):
        ids = tokenizer.encode(text).ids
        features = torch_features(checkpoint, ids)
        expected = {"last": features[-1], "mean": features.mean(0), "max": features.max(0)}
        assert embedding.num_tokens == len(ids)
        np.testing.assert_allclose(embedding.values, expected[pooling], rtol=1e-3, atol=1e-5)


def test_embed_default_pooling_is_mean(client: Client, stub: pb_grpc.LanguageModelStub) -> None:
    request = pb.EmbedRequest(texts=[TEXTS[0]])
    default = stub.Embed(request, timeout=30)
    mean = client.embed(TEXTS[0], pooling="mean")
    assert list(default.embeddings[0].values) == list(mean.embeddings[0].values)


# -- Generate ----------------------------------------------------------------------------------


def test_greedy_generation_equals_pytorch(client: Client, reference: Callable) -> None:
    checkpoint, tokenizer = reference(DEFAULT)
    prompt = "the cat"
    prompt_ids = tokenizer.encode(prompt).ids
    n = 12
    chunks = chunks_of(client.generate(prompt, max_tokens=n, temperature=0, top_logprobs=3))
    *tokens, last = chunks
    ids = [i for c in tokens for i in c.token_ids]
    assert ids == torch_greedy(checkpoint, prompt_ids, n)
    assert last.finish_reason == pb.FINISH_REASON_LENGTH
    assert (last.prompt_tokens, last.completion_tokens) == (len(prompt_ids), n)
    assert not last.token_ids
    expected = torch_logprobs(checkpoint, prompt_ids + ids)
    for position, chunk in enumerate(tokens):
        (token,) = chunk.token_ids
        (logprob,) = chunk.logprobs
        row = expected[len(prompt_ids) + position]
        assert logprob == pytest.approx(row[token], rel=1e-3, abs=1e-4)
        (top,) = chunk.top_logprobs
        assert len(top.alternatives) == 3
        top_ids = [a.token_id for a in top.alternatives]
        assert top_ids == [int(i) for i in np.argsort(-row, kind="stable")[:3]]
        assert [a.token for a in top.alternatives] == [tokenizer.decode([i]) for i in top_ids]
    # The text pieces continue the prompt: word-level spacing and newlines as decoded.
    text = "".join(c.text for c in chunks)
    assert tokenizer.decode(prompt_ids) + text == tokenizer.decode(prompt_ids + ids)


def test_top_k_one_is_greedy(client: Client) -> None:
    greedy = [c.token_ids for c in client.generate("a dog", max_tokens=8, temperature=0)]
    top1 = [c.token_ids for c in client.generate("a dog", max_tokens=8, top_k=1, seed=3)]
    assert greedy == top1


def test_seeded_generation_is_reproducible(client: Client) -> None:
    def run(seed: int) -> list[int]:
        stream = client.generate("the bird", max_tokens=30, seed=seed, temperature=1.5)
        return [i for c in stream for i in c.token_ids]

    first = run(7)
    assert run(7) == first
    # Concurrent streams share batches; each seed still gives its own stream.
    results: dict[int, list[int]] = {}

    def worker(seed: int) -> None:
        results[seed] = run(seed)

    threads = [threading.Thread(target=worker, args=(s,)) for s in (7, 8, 9, 10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[7] == first
    assert len({tuple(v) for v in results.values()}) > 1


def test_sampling_options_are_accepted(client: Client) -> None:
    chunks = chunks_of(
        client.generate(
            "the", max_tokens=10, top_k=5, top_p=0.9, min_p=0.05, repetition_penalty=1.3, seed=1
        )
    )
    assert chunks[-1].completion_tokens == 10


def test_prompt_token_ids_are_the_same_as_the_prompt(client: Client, reference: Callable) -> None:
    _, tokenizer = reference(DEFAULT)
    ids = tokenizer.encode("the old man").ids
    by_text = [c.token_ids for c in client.generate("the old man", max_tokens=6, temperature=0)]
    by_ids = [
        c.token_ids for c in client.generate(prompt_token_ids=ids, max_tokens=6, temperature=0)
    ]
    assert by_text == by_ids


def test_empty_prompt_starts_a_line(client: Client) -> None:
    chunks = chunks_of(client.generate("", max_tokens=5, seed=2))
    assert chunks[-1].prompt_tokens == 0 and chunks[-1].completion_tokens == 5


def test_stop_string_ends_generation_without_the_stop_text(client: Client) -> None:
    full = "".join(c.text for c in client.generate("the cat", max_tokens=30, temperature=0))
    words = full.split()
    assert len(words) >= 3
    stop = " " + words[2]
    expected = full[: full.index(stop)]
    chunks = chunks_of(client.generate("the cat", max_tokens=30, temperature=0, stop=["zzz", stop]))
    assert "".join(c.text for c in chunks) == expected
    assert chunks[-1].finish_reason == pb.FINISH_REASON_STOP
    assert chunks[-1].completion_tokens < 30


def test_char_and_bpe_generation_text_matches_the_tokens(
    client: Client, reference: Callable
) -> None:
    for name in ("tiny-gru-char", "tiny-rnn_tanh-bpe"):
        _, tokenizer = reference(name)
        chunks = chunks_of(client.generate("the ", model=name, max_tokens=25, seed=5))
        ids = [i for c in chunks for i in c.token_ids]
        assert "".join(c.text for c in chunks) == tokenizer.decode(ids)


def test_generation_metrics(live: LiveServer, client: Client) -> None:
    before = live.scrape()
    chunks_of(client.generate("the", max_tokens=9, seed=1))
    after = live.scrape()

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("rnnlm_generated_tokens_total", model=DEFAULT) == 9
    assert delta("rnnlm_time_to_first_token_seconds_count", model=DEFAULT) == 1
    assert delta("rnnlm_inter_token_latency_seconds_count", model=DEFAULT) == 8
    assert delta("rnnlm_requests_total", method="Generate", model=DEFAULT, code="OK") == 1
    assert delta("rnnlm_request_duration_seconds_count", method="Generate", model=DEFAULT) == 1
    assert metric(after, "rnnlm_active_streams", model=DEFAULT) == 0


# -- TypingSession -----------------------------------------------------------------------------


def test_typing_session_follows_the_context(client: Client) -> None:
    events = [
        pb.TypingEvent(text="the cat ", k=3),
        pb.TypingEvent(text="sees ", k=3),
        pb.TypingEvent(partial_word="t", k=3),
        pb.TypingEvent(text="a dog ", reset=True),  # k unset: 5
    ]
    replies = list(client.typing_session(events))
    assert len(replies) == len(events)
    contexts = [("the cat ", "", 3), ("the cat sees ", "", 3), ("the cat sees ", "t", 3),
                ("a dog ", "", 5)]  # fmt: skip
    for reply, (context, partial, k) in zip(replies, contexts, strict=True):
        # A session's events get the word cache by default; a PredictNext asks for it.
        expected = client.predict_next(context, k=k, partial_word=partial, word_cache=True)
        assert reply.context_tokens == expected.context_tokens
        assert [p.token_id for p in reply.predictions] == [p.token_id for p in expected.predictions]
        np.testing.assert_allclose(
            [p.probability for p in reply.predictions],
            [p.probability for p in expected.predictions],
            rtol=1e-5,
        )
    assert [r.context_tokens for r in replies] == [2, 3, 3, 2]


# -- cancellation and deadlines ----------------------------------------------------------------


def assert_generation_stopped(
    live: LiveServer,
    client: Client,
    before: dict[tuple[str, frozenset[tuple[str, str]]], float],
    code: str,
) -> None:
    """The call was counted with `code`, its stream closed, and no more tokens are made."""
    labels = dict(method="Generate", model=DEFAULT, code=code)
    wait_for(
        lambda: (
            metric(live.scrape(), "rnnlm_requests_total", **labels)
            == metric(before, "rnnlm_requests_total", **labels) + 1
        )
    )
    wait_for(lambda: metric(live.scrape(), "rnnlm_active_streams", model=DEFAULT) == 0)
    # A step already running when the call ended may still count its tokens (on a loaded
    # machine it can end after the stream has closed): wait for the count to settle, then
    # show that it stays put.
    generated = [metric(live.scrape(), "rnnlm_generated_tokens_total", model=DEFAULT)]

    def settled() -> bool:
        time.sleep(0.2)
        generated.append(metric(live.scrape(), "rnnlm_generated_tokens_total", model=DEFAULT))
        return generated[-1] == generated[-2]

    wait_for(settled)
    time.sleep(0.3)
    assert metric(live.scrape(), "rnnlm_generated_tokens_total", model=DEFAULT) == generated[-1]
    assert_healthy(client)


def test_cancelling_a_stream_stops_the_work(live: LiveServer, client: Client) -> None:
    before = live.scrape()
    stream = client.generate("the", max_tokens=MAX_TOKENS_CAP, seed=1)
    for _ in range(3):
        next(stream)
    stream.cancel()

    assert_generation_stopped(live, client, before, "CANCELLED")


def test_deadline_stops_generation(live: LiveServer, client: Client) -> None:
    before = live.scrape()
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as error:
        chunks_of(client.generate("the", max_tokens=MAX_TOKENS_CAP, seed=1, timeout=0.5))
    assert error.value.code() == Code.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 5
    assert_generation_stopped(live, client, before, "DEADLINE_EXCEEDED")


def test_a_cancel_just_before_the_deadline_is_counted_as_the_deadline() -> None:
    """A client ends a call at its deadline by its own clock, which starts a trip before the
    server's: its cancel can arrive just before the deadline the server knows."""

    async def code(seconds_left: float | None) -> grpc.StatusCode:
        loop = asyncio.get_running_loop()
        deadline = None if seconds_left is None else loop.time() + seconds_left
        call = RelayedCall(NativeFrontEnd(Handlers()), 1, "/m", deadline, "peer", ())
        return servicer_module._ended_code(call)

    assert asyncio.run(code(0.01)) == Code.DEADLINE_EXCEEDED
    assert asyncio.run(code(-1.0)) == Code.DEADLINE_EXCEEDED
    assert asyncio.run(code(5.0)) == Code.CANCELLED
    assert asyncio.run(code(None)) == Code.CANCELLED


# -- bad input ---------------------------------------------------------------------------------


Call = Callable[[pb_grpc.LanguageModelStub], Any]


def _generate(**fields: Any) -> Call:
    request = pb.GenerateRequest(**{"prompt": "the", "max_tokens": 3, **fields})
    return lambda stub: list(stub.Generate(request, timeout=30))


def _predict(**fields: Any) -> Call:
    request = pb.PredictNextRequest(**{"context": "the", "k": 3, **fields})
    return lambda stub: stub.PredictNext(request, timeout=30)


def _score(**fields: Any) -> Call:
    request = pb.ScoreRequest(**{"texts": ["the cat"], **fields})
    return lambda stub: stub.Score(request, timeout=30)


def _embed(**fields: Any) -> Call:
    request = pb.EmbedRequest(**{"texts": ["the cat"], **fields})
    return lambda stub: stub.Embed(request, timeout=30)


def _typing(*events: pb.TypingEvent) -> Call:
    return lambda stub: list(stub.TypingSession(iter(events), timeout=30))


LONG_PROMPT = "the cat " * MAX_PROMPT_TOKENS

INVALID = Code.INVALID_ARGUMENT
BAD_REQUESTS = {
    "negative temperature": (_generate(temperature=-0.5), INVALID, "temperature"),
    "nan temperature": (_generate(temperature=float("nan")), INVALID, "temperature"),
    "top_p zero": (_generate(top_p=0.0), INVALID, "top_p"),
    "top_p above one": (_generate(top_p=1.5), INVALID, "top_p"),
    "min_p one": (_generate(min_p=1.0), INVALID, "min_p"),
    "min_p negative": (_generate(min_p=-0.1), INVALID, "min_p"),
    "top_k negative": (_generate(top_k=-1), INVALID, "top_k"),
    "penalty zero": (_generate(repetition_penalty=0.0), INVALID, "repetition_penalty"),
    "max_tokens zero": (_generate(max_tokens=0), INVALID, "max_tokens"),
    "max_tokens negative": (_generate(max_tokens=-4), INVALID, "max_tokens"),
    "max_tokens over cap": (
        _generate(max_tokens=MAX_TOKENS_CAP + 1), Code.RESOURCE_EXHAUSTED, "--max-tokens"
    ),
    "prompt over cap": (_generate(prompt=LONG_PROMPT), Code.RESOURCE_EXHAUSTED, "prompt"),
    "prompt and ids": (_generate(prompt_token_ids=[2]), INVALID, "prompt_token_ids"),
    "token id outside": (
        _generate(prompt="", prompt_token_ids=[2, 10_000]), INVALID,
        "prompt_token_ids[1]",
    ),
    "empty stop": (_generate(stop=[".", ""]), INVALID, "stop[1]"),
    "top_logprobs too many": (_generate(top_logprobs=21), INVALID, "top_logprobs"),
    "unknown model": (_generate(model="nope"), Code.NOT_FOUND, "nope"),
    "unknown version": (_generate(model_version="9"), Code.NOT_FOUND, "version"),
    "k zero": (_predict(k=0), INVALID, "k must be"),
    "k above vocabulary": (_predict(k=100_000), INVALID, "k must be"),
    "partial word with space": (_predict(partial_word="a b"), INVALID, "partial_word"),
    "context over cap": (_predict(context=LONG_PROMPT), Code.RESOURCE_EXHAUSTED, "context"),
    "predict unknown model": (_predict(model="nope"), Code.NOT_FOUND, "nope"),
    "no texts": (_score(texts=[]), INVALID, "texts"),
    "text without tokens": (_score(texts=["the", "   "]), INVALID, "texts[1]"),
    "score unknown model": (_score(model="nope"), Code.NOT_FOUND, "nope"),
    "unknown pooling": (_embed(pooling=9), INVALID, "pooling"),
    "embed empty text": (_embed(texts=[""]), INVALID, "texts[0]"),
    "typing k negative": (_typing(pb.TypingEvent(text="the", k=-1)), INVALID, "k"),
    "typing unknown model": (_typing(pb.TypingEvent(model="nope")), Code.NOT_FOUND, "nope"),
    "get unknown model": (
        lambda stub: stub.GetModel(pb.GetModelRequest(name="nope")), Code.NOT_FOUND, "nope"
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_gets_its_code_and_the_server_stays_healthy(
    live: LiveServer, client: Client, stub: pb_grpc.LanguageModelStub, case: str
) -> None:
    call, code, mentions = BAD_REQUESTS[case]
    with pytest.raises(grpc.RpcError) as error:
        call(stub)
    assert error.value.code() == code, error.value.details()
    assert mentions in error.value.details()
    assert_healthy(client)
    assert metric(live.scrape(), "rnnlm_requests_total", method=_method(case), model=_model(case),
                  code=code.name) >= 1  # fmt: skip


def _method(case: str) -> str:
    call = BAD_REQUESTS[case][0]
    for name, builder in (("Generate", _generate), ("PredictNext", _predict), ("Score", _score),
                          ("Embed", _embed), ("TypingSession", _typing)):  # fmt: skip
        if call.__qualname__.startswith(builder.__name__):
            return name
    return "GetModel"


def _model(case: str) -> str:
    """Refused requests are labelled with the model once it is known, else with ""."""
    return "" if BAD_REQUESTS[case][1] == Code.NOT_FOUND else DEFAULT


def test_request_counters_match_the_calls(live: LiveServer, client: Client) -> None:
    before = live.scrape()
    for _ in range(3):
        client.predict_next("the", k=2)
    client.predict_next("the", k=2, model="tiny-gru-char")
    with pytest.raises(grpc.RpcError):
        client.predict_next("the", k=0)
    client.score(TEXTS)
    client.list_models()
    after = live.scrape()

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    requests = "rnnlm_requests_total"
    assert delta(requests, method="PredictNext", model=DEFAULT, code="OK") == 3
    assert delta(requests, method="PredictNext", model="tiny-gru-char", code="OK") == 1
    assert delta(requests, method="PredictNext", model=DEFAULT, code="INVALID_ARGUMENT") == 1
    assert delta(requests, method="Score", model=DEFAULT, code="OK") == 1
    assert delta(requests, method="ListModels", model="", code="OK") == 1
    duration = "rnnlm_request_duration_seconds_count"
    assert delta(duration, method="PredictNext", model=DEFAULT) == 4
    for version, cell in (("1", "lstm"), ("2", "lstm")):
        info = metric(after, "rnnlm_model_info", model=DEFAULT, version=version,
                      provider="CPUExecutionProvider", cell=cell)  # fmt: skip
        assert info == 1
    assert metric(after, "rnnlm_batch_size_count", model=DEFAULT) > 0
    assert metric(after, "rnnlm_queue_wait_seconds_count", model=DEFAULT) > 0


def test_a_full_queue_answers_resource_exhausted(default_bundle: Path) -> None:
    """Admission control: past --max-queued waiting requests, calls are refused, not queued."""
    live = LiveServer(config(default_bundle, max_queued=1, max_batch_size=1))
    try:
        document = "the old man calls the small boat .\n" * 400
        with grpc.insecure_channel(live.target) as channel:
            stub = pb_grpc.LanguageModelStub(channel)
            request = pb.ScoreRequest(texts=[document])
            calls = [stub.Score.future(request, timeout=60) for _ in range(12)]
            codes = [call.code() for call in calls]
            assert Code.OK in codes and Code.RESOURCE_EXHAUSTED in codes, codes
            refused = next(c for c in calls if c.code() == Code.RESOURCE_EXHAUSTED)
            assert "overloaded" in refused.details()
        with Client(live.target, timeout=30) as client:
            assert_healthy(client)
    finally:
        live.close()


@pytest.mark.parametrize("batch_threads", [1, 2])
def test_a_call_of_many_texts_is_not_refused_by_its_own_size(
    default_bundle: Path, batch_threads: int
) -> None:
    """Score and Embed submit a call's texts a batch at a time, so a call of more texts than
    --max-queued is answered (it was refused as overloaded on an idle server), the same as
    each text alone; with two batching threads, whose batches hold more than the queue."""
    live = LiveServer(
        config(default_bundle, max_queued=2, max_batch_size=2, batch_threads=batch_threads)
    )
    try:
        texts = [f"the old man calls the small boat {'. ' * (i % 4)}" for i in range(30)]
        with Client(live.target, timeout=60) as client:
            together = client.score(texts).results
            alone = [client.score(text).results[0] for text in texts[:5]]
            vectors = client.embed(texts).embeddings
        assert len(together) == len(vectors) == len(texts)
        for a, b in zip(together, alone, strict=False):
            assert a.num_tokens == b.num_tokens
            assert a.log_prob == pytest.approx(b.log_prob, rel=1e-5)
    finally:
        live.close()


# -- lifecycle ---------------------------------------------------------------------------------


def test_shutdown_drains_then_ends_open_streams(default_bundle: Path) -> None:
    """Health goes NOT_SERVING, new calls get UNAVAILABLE, open streams end after the grace.

    The gRPC port sends GOAWAY and stops listening as the drain starts, so health is asked on
    --health-port, which serves until the end. The new call is sent once its channel has seen
    the GOAWAY: one already on the wire when the port shuts down is ended by gRPC's core with
    CANCELLED, not UNAVAILABLE (grpc/grpc#41785), whichever front end serves it."""
    live = LiveServer(config(default_bundle, grace_seconds=1.0, health_port=0))
    probe = Client(f"127.0.0.1:{live.server.health_port}", timeout=10)
    late = grpc.insecure_channel(live.target)
    try:
        grpc.channel_ready_future(late).result(timeout=10)
        away = _left_ready(late)
        with Client(live.target, timeout=30) as client:
            assert client.get_model().is_default  # the only model is the default
            stream = client.generate("the", max_tokens=MAX_TOKENS_CAP, seed=1)
            next(stream)
            stopping = asyncio.run_coroutine_threadsafe(live.server.stop(), live.loop)
            wait_for(lambda: probe.health() == "NOT_SERVING", timeout=5)
            assert probe.health("rnnlm.v1.LanguageModel") == "NOT_SERVING"
            assert away.wait(timeout=5), "the GOAWAY never reached the client"
            with pytest.raises(grpc.RpcError) as error:
                pb_grpc.LanguageModelStub(late).PredictNext(
                    pb.PredictNextRequest(context="the", k=1), timeout=10
                )
            assert error.value.code() == Code.UNAVAILABLE
            last = list(stream)[-1]
            assert last.finish_reason == pb.FINISH_REASON_CANCELLED
            assert 0 < last.completion_tokens < MAX_TOKENS_CAP
            stopping.result(15)
    finally:
        late.close()
        probe.close()
        live.close()


def _left_ready(channel: grpc.Channel) -> threading.Event:
    """An event set when `channel` leaves READY (a GOAWAY or a dropped connection)."""
    ready, left = threading.Event(), threading.Event()

    def seen(state: grpc.ChannelConnectivity) -> None:
        if state is grpc.ChannelConnectivity.READY:
            ready.set()
        elif ready.is_set():
            left.set()

    channel.subscribe(seen, try_to_connect=False)
    return left


def test_a_bad_repository_fails_the_start(tmp_path: Path, default_bundle: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RepositoryError, match="no model bundle found"):
        LiveServer(config(empty))
    with pytest.raises(RepositoryError, match="does not exist"):
        LiveServer(config(tmp_path / "missing"))
    twice = tmp_path / "twice"
    copy_bundle(default_bundle, twice / "a")
    copy_bundle(default_bundle, twice / "b")
    with pytest.raises(RepositoryError, match="also in"):
        LiveServer(config(twice))
    with pytest.raises(RepositoryError, match="--default-model 'nope'"):
        LiveServer(config(default_bundle, default_model="nope"))


def test_no_default_model_with_several_models() -> None:
    with pytest.raises(NoDefaultModel, match="model is required"):
        ModelRepository([], "").get("")


# -- configuration and packaging ---------------------------------------------------------------


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_flags_win_over_environment_over_defaults() -> None:
    env = {"RNNLM_MODELS": "/m", "RNNLM_PORT": "6000", "RNNLM_BATCHING": "off",
           "RNNLM_MAX_QUEUE_WAIT_MS": "0.5", "RNNLM_PROVIDER": "AUTO",
           "RNNLM_AUTH_TOKEN_FILE": "/t", "RNNLM_RELOAD_SECONDS": "2.5"}  # fmt: skip
    c = config_from_args(_parse("--port", "7000"), env)
    assert (c.models, c.port, c.batching, c.max_queue_wait_ms) == (Path("/m"), 7000, False, 0.5)
    assert c.provider == "auto"
    assert (c.auth_token_file, c.reload_seconds) == (Path("/t"), 2.5)
    assert c.tls_cert is c.state_token_key_file is c.health_port is None and not c.tls
    assert c.metrics_port == 9464 and c.host == "0.0.0.0"
    c = config_from_args(_parse("--models", "/x", "--batching"), env)
    assert c.models == Path("/x") and c.batching


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        ((), {}, "--models"),
        (("--models", "/m"), {"RNNLM_PORT": "http"}, "RNNLM_PORT='http'"),
        (("--models", "/m"), {"RNNLM_BATCHING": "maybe"}, "RNNLM_BATCHING"),
        (("--models", "/m", "--port", "70000"), {}, "--port"),
        (("--models", "/m"), {"RNNLM_PROVIDER": "tpu"}, "RNNLM_PROVIDER"),
        (("--models", "/m", "--max-tokens", "0"), {}, "--max-tokens"),
        (("--models", "/m"), {"RNNLM_BATCH_THREADS": "0"}, "--batch-threads"),
        (("--models", "/m"), {"RNNLM_RELOAD_SECONDS": "-1"}, "--reload-seconds"),
        (("--models", "/m", "--health-port", "70000"), {}, "--health-port"),
        (("--models", "/m", "--tls-key", "k"), {}, "needs --tls-cert"),
        (("--models", "/m"), {"RNNLM_TLS_CERT": "c"}, "needs --tls-key"),
    ],
)
def test_bad_configuration_names_the_flag_or_variable(
    argv: tuple[str, ...], env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        config_from_args(_parse(*argv), env)


def test_the_server_side_never_imports_torch() -> None:
    code = (
        "import sys\n"
        "import server.app, server.cli, server.servicer, server.repository, server.metrics\n"
        "import server.security, server.state_token\n"
        "import rnnlm.cli, rnnlm.client, rnnlm.client_cli\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
