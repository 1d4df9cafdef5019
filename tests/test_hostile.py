"""Hostile requests against a real server: oversized, undecodable, unauthenticated, and drains.

Every hostile request must get INVALID_ARGUMENT, RESOURCE_EXHAUSTED or UNAUTHENTICATED with a
short message (never INTERNAL or UNKNOWN), and the request metrics must record the status the
client saw.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_server import LiveServer, config, metric

from rnnlm.v1 import language_model_pb2 as pb
from rnnlm.v1 import language_model_pb2_grpc as pb_grpc
from server.config import ConfigError, ServerConfig
from server.limits import MAX_NAME_CHARS, MAX_STOP_CHARS, MAX_STOPS

Code = grpc.StatusCode
WORD, CHAR = "tiny-lstm-word", "tiny-gru-char"
MAX_TEXT_CHARS = 40_000
# gRPC's own limit on a status message is 8 KiB; these messages are far shorter.
SHORT = 400
TOKEN = "hostile-test-token-0123456789"
KEY = "k" * 40


@pytest.fixture(scope="module")
def repository(
    tiny_bundle_factory: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    root = tmp_path_factory.mktemp("hostile-repository")
    for cell, tokenizer in (("lstm", "word"), ("gru", "char")):
        source = tiny_bundle_factory(cell, tokenizer)
        target = root / source.name
        target.mkdir()
        for path in source.iterdir():
            (target / path.name).write_bytes(path.read_bytes())
    return root


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "state-token-keys"
    path.write_text(KEY + "\n")
    return path


def serve(repository: Path, key_file: Path, **overrides: Any) -> LiveServer:
    values: dict[str, Any] = dict(
        default_model=WORD,
        max_prompt_tokens=100_000,
        max_text_chars=MAX_TEXT_CHARS,
        max_message_bytes=1 << 20,
        state_token_key_file=key_file,
    )
    values.update(overrides)
    return LiveServer(config(repository, **values))


@pytest.fixture(scope="module")
def live(repository: Path, key_file: Path) -> Iterator[LiveServer]:
    server = serve(repository, key_file)
    yield server
    server.close()


@pytest.fixture(scope="module")
def channel(live: LiveServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(live.target) as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.LanguageModelStub:
    return pb_grpc.LanguageModelStub(channel)


class Counts:
    """rnnlm_requests_total between two scrapes of a server's /metrics."""

    def __init__(self, live: LiveServer) -> None:
        self.live = live
        self.before = live.scrape()

    def delta(self, method: str, code: str, model: str = "") -> float:
        labels = {"method": method, "model": model, "code": code}
        after = self.live.scrape()
        return metric(after, "rnnlm_requests_total", **labels) - metric(
            self.before, "rnnlm_requests_total", **labels
        )


def refused(call: Callable[[], object], code: grpc.StatusCode, *words: str) -> str:
    """Run `call`, which must fail with `code` and a short message holding `words`."""
    with pytest.raises(grpc.RpcError) as error:
        call()
    details = error.value.details() or ""
    assert error.value.code() == code, details[:SHORT]
    assert len(details) < SHORT, details[:SHORT]
    for word in words:
        assert word in details
    return details


def typing(stub: pb_grpc.LanguageModelStub, *events: pb.TypingEvent) -> list[pb.Suggestions]:
    return list(stub.TypingSession(iter(events), timeout=30))


# -- 2: text bounded in characters, stop strings bounded ---------------------------------------


def test_every_text_field_is_bounded_in_characters(
    live: LiveServer, stub: pb_grpc.LanguageModelStub
) -> None:
    """One long word is one token, so only a bound in characters stops it."""
    counts = Counts(live)
    word = "x" * (MAX_TEXT_CHARS + 1)
    limit = ("--max-text-chars", str(MAX_TEXT_CHARS))
    exhausted = Code.RESOURCE_EXHAUSTED
    refused(lambda: list(stub.Generate(pb.GenerateRequest(prompt=word), timeout=30)), exhausted,
            "prompt", *limit)  # fmt: skip
    refused(lambda: stub.PredictNext(pb.PredictNextRequest(context=word, k=1), timeout=30),
            exhausted, "context", *limit)  # fmt: skip
    refused(lambda: typing(stub, pb.TypingEvent(text=word)), exhausted, "text", *limit)
    half = "y" * (MAX_TEXT_CHARS // 2 + 1)
    refused(lambda: typing(stub, pb.TypingEvent(text=half), pb.TypingEvent(text=half)), exhausted,
            "the session's context", *limit)  # fmt: skip
    refused(lambda: stub.Score(pb.ScoreRequest(texts=[half, half]), timeout=30), exhausted,
            "texts (in all)", *limit)  # fmt: skip
    refused(lambda: stub.Embed(pb.EmbedRequest(texts=[half, half]), timeout=30), exhausted,
            "texts (in all)", *limit)  # fmt: skip
    # Just within the limit is answered.
    allowed = stub.PredictNext(pb.PredictNextRequest(context=word[1:], k=1), timeout=30)
    assert allowed.context_tokens == 1
    assert counts.delta("Generate", "RESOURCE_EXHAUSTED", WORD) == 1
    assert counts.delta("PredictNext", "RESOURCE_EXHAUSTED") == 1
    assert counts.delta("TypingSession", "RESOURCE_EXHAUSTED", WORD) == 1
    assert counts.delta("TypingSession", "RESOURCE_EXHAUSTED", "") == 1
    assert counts.delta("Score", "RESOURCE_EXHAUSTED", WORD) == 1
    assert counts.delta("Embed", "RESOURCE_EXHAUSTED", WORD) == 1


def test_stop_strings_are_bounded_in_number_and_length(stub: pb_grpc.LanguageModelStub) -> None:
    def generate(stop: list[str]) -> object:
        return list(stub.Generate(pb.GenerateRequest(prompt="the", stop=stop), timeout=30))

    refused(lambda: generate(["."] * (MAX_STOPS + 1)), Code.INVALID_ARGUMENT,
            f"at most {MAX_STOPS}")  # fmt: skip
    long_stop = "z" * 100_000
    refused(lambda: generate([long_stop]), Code.INVALID_ARGUMENT, "stop[0]",
            f"at most {MAX_STOP_CHARS}", "100000 characters")  # fmt: skip
    assert generate(["."] * MAX_STOPS)[-1].finish_reason in (
        pb.FINISH_REASON_STOP,
        pb.FINISH_REASON_LENGTH,
    )


def test_heavy_tokenization_does_not_stall_other_calls(repository: Path, key_file: Path) -> None:
    """A long allowed text is tokenized on a thread with the GIL released: while it is,
    ListModels calls are answered."""
    big = "x" * 2_000_000  # one word: the tokenizer cannot cut it into pieces
    live = serve(repository, key_file, max_text_chars=len(big), max_message_bytes=4 << 20)
    try:
        assert live.server.repository is not None
        codec = live.server.repository.get(WORD).codec
        started = threading.Event()
        encode = codec.encode

        def signalling_encode(text: str) -> list[int]:
            if len(text) == len(big):
                started.set()
            return encode(text)

        codec.encode = signalling_encode  # type: ignore[method-assign]
        with grpc.insecure_channel(live.target) as channel:
            stub = pb_grpc.LanguageModelStub(channel)
            assert stub.ListModels(pb.ListModelsRequest(), timeout=30).models
            heavy = stub.PredictNext.future(pb.PredictNextRequest(context=big, k=1), timeout=60)
            assert started.wait(30)
            for _ in range(5):
                assert stub.ListModels(pb.ListModelsRequest(), timeout=30).models
            assert not heavy.done(), "ListModels waited for the tokenization"
            assert heavy.result().context_tokens == 1
    finally:
        live.close()


# -- 3: errors quote a bounded prefix -----------------------------------------------------------


def test_errors_quote_a_short_prefix_of_huge_values(
    live: LiveServer, stub: pb_grpc.LanguageModelStub
) -> None:
    """Quoting a 500 kB value whole makes the status exceed gRPC's metadata limit, and the
    client would see RESOURCE_EXHAUSTED instead of what the server decided."""
    counts = Counts(live)
    huge = "w" * 500_000
    invalid = Code.INVALID_ARGUMENT
    name_limit = f"more than any name ({MAX_NAME_CHARS})"
    refused(lambda: stub.PredictNext(pb.PredictNextRequest(context="the", k=1, model=huge),
            timeout=30), invalid, "model has 500000 characters", name_limit)  # fmt: skip
    refused(lambda: stub.Score(pb.ScoreRequest(texts=["the"], model_version=huge), timeout=30),
            invalid, "model_version has 500000 characters")  # fmt: skip
    refused(lambda: stub.GetModel(pb.GetModelRequest(name=huge), timeout=30), invalid,
            "name has 500000 characters")  # fmt: skip
    refused(lambda: stub.GetModel(pb.GetModelRequest(name=WORD, version=huge), timeout=30),
            invalid, "version has 500000 characters")  # fmt: skip
    spaced = "a " + huge
    refused(lambda: stub.PredictNext(pb.PredictNextRequest(context="the", k=1,
            partial_word=spaced), timeout=30), invalid, "partial_word")  # fmt: skip
    refused(lambda: typing(stub, pb.TypingEvent(text="the ", partial_word=spaced)), invalid,
            "partial_word")  # fmt: skip
    blank = " " * (MAX_TEXT_CHARS - 10)
    refused(lambda: stub.Score(pb.ScoreRequest(texts=[blank]), timeout=30), invalid,
            "texts[0] contains no tokens", f"({len(blank)} characters)")  # fmt: skip
    # A name of ordinary length that is not loaded is still NOT_FOUND.
    refused(lambda: stub.GetModel(pb.GetModelRequest(name="nope"), timeout=30), Code.NOT_FOUND,
            "'nope'")  # fmt: skip
    assert counts.delta("PredictNext", "INVALID_ARGUMENT") == 1
    assert counts.delta("PredictNext", "INVALID_ARGUMENT", WORD) == 1
    assert counts.delta("Score", "INVALID_ARGUMENT") == 1
    assert counts.delta("Score", "INVALID_ARGUMENT", WORD) == 1
    assert counts.delta("GetModel", "INVALID_ARGUMENT") == 2
    assert counts.delta("TypingSession", "INVALID_ARGUMENT", WORD) == 1


def test_a_control_character_in_a_partial_word_is_named(
    live: LiveServer, stub: pb_grpc.LanguageModelStub
) -> None:
    """A NUL or an escape is in no word: refused by name, where it would match nothing (or, in
    a user word, be shown); a zero-width non-joiner, part of Persian words, is a format
    character and stays."""
    for partial, code in (("lo\x00", "U+0000"), ("\x1bl", "U+001B")):
        request = pb.PredictNextRequest(context="the", k=1, partial_word=partial)
        event = pb.TypingEvent(text="the ", partial_word=partial)
        refused(functools.partial(stub.PredictNext, request, timeout=30),
                Code.INVALID_ARGUMENT, "partial_word", code)  # fmt: skip
        refused(functools.partial(typing, stub, event), Code.INVALID_ARGUMENT, code)  # fmt: skip
    listed = pb.PredictNextRequest(context="the", k=1, user_words=["ok", "b\x00"])
    refused(functools.partial(stub.PredictNext, listed, timeout=30), Code.INVALID_ARGUMENT,
            "user_words[1]", "U+0000")  # fmt: skip
    joined = pb.PredictNextRequest(context="the", k=1, partial_word="a\u200cb")
    stub.PredictNext(joined, timeout=30)


# -- 4: undecodable requests ------------------------------------------------------------------


def test_undecodable_requests_are_invalid_argument_with_one_log_line(
    live: LiveServer, channel: grpc.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    counts = Counts(live)
    not_protobuf = b"\xff\xff\xff\xff"
    event = pb.TypingEvent(text="abc").SerializeToString()
    bad_utf8 = event.replace(b"abc", b"a\xffc")
    predict = channel.unary_unary("/rnnlm.v1.LanguageModel/PredictNext")
    generate = channel.unary_stream("/rnnlm.v1.LanguageModel/Generate")
    session = channel.stream_stream("/rnnlm.v1.LanguageModel/TypingSession")
    check = channel.unary_unary("/grpc.health.v1.Health/Check")
    invalid = Code.INVALID_ARGUMENT
    with caplog.at_level(logging.INFO):
        for call in (
            lambda: predict(not_protobuf, timeout=30),
            lambda: list(generate(not_protobuf, timeout=30)),
            lambda: list(session(iter([bad_utf8]), timeout=30)),
            lambda: list(session(iter([not_protobuf]), timeout=30)),
            lambda: check(not_protobuf, timeout=30),
        ):
            details = refused(call, invalid, "the request is not a valid")
            assert "DecodeError" not in details and "class" not in details
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 5, [r.getMessage() for r in warnings]
    assert all(r.name == "server.guard" and r.exc_info is None for r in warnings)
    assert counts.delta("PredictNext", "INVALID_ARGUMENT") == 1
    assert counts.delta("Generate", "INVALID_ARGUMENT") == 1
    assert counts.delta("TypingSession", "INVALID_ARGUMENT") == 2
    # The same stream goes on being served with good events before a bad one.
    good = pb.TypingEvent(text="the ").SerializeToString()
    with pytest.raises(grpc.RpcError) as error:
        replies = session(iter([good, bad_utf8]), timeout=30)
        assert pb.Suggestions.FromString(next(replies)).predictions
        next(replies)
    assert error.value.code() == invalid


# -- 5: replies too large to send -------------------------------------------------------------


@pytest.fixture(scope="module")
def small(repository: Path, key_file: Path) -> Iterator[LiveServer]:
    """A server that sends at most 64 KiB per message but takes 100,000 characters of text."""
    server = serve(repository, key_file, max_text_chars=100_000, max_message_bytes=1 << 16)
    yield server
    server.close()


def test_replies_too_large_to_send_are_refused_up_front(small: LiveServer) -> None:
    counts = Counts(small)
    exhausted = Code.RESOURCE_EXHAUSTED
    with grpc.insecure_channel(small.target) as channel:
        stub = pb_grpc.LanguageModelStub(channel)
        texts = ["a"] * 1000  # 1000 vectors of 16 floats: over 64 KiB
        refused(lambda: stub.Embed(pb.EmbedRequest(model=CHAR, texts=texts), timeout=30),
                exhausted, "1000 embeddings", "--max-message-bytes")  # fmt: skip
        assert len(stub.Embed(pb.EmbedRequest(model=CHAR, texts=texts[:100])).embeddings) == 100
        words = "the cat sees the moon . " * 2000  # 12,000 tokens, each with its logprob
        refused(lambda: stub.Score(pb.ScoreRequest(texts=[words], return_token_logprobs=True),
                timeout=30), exhausted, "--max-message-bytes")  # fmt: skip
        assert stub.Score(pb.ScoreRequest(texts=[words]), timeout=30).results[0].num_tokens
        # A typing session's context grows past what a state token can carry in one message.
        piece = "x" * 30_000 + " "
        events = [pb.TypingEvent(text=piece, return_state_token=True) for _ in range(3)]
        replies = stub.TypingSession(iter(events), timeout=30)
        assert next(replies).state_token
        assert next(replies).state_token
        refused(lambda: next(replies), exhausted, "a state token", "--max-message-bytes")
    assert counts.delta("Embed", "RESOURCE_EXHAUSTED", CHAR) == 1
    assert counts.delta("Embed", "OK", CHAR) == 1
    assert counts.delta("Score", "RESOURCE_EXHAUSTED", WORD) == 1
    assert counts.delta("TypingSession", "RESOURCE_EXHAUSTED", WORD) == 1


# -- 7: unauthenticated requests are refused unread -------------------------------------------


def test_unauthenticated_requests_are_refused_before_their_body_is_read(
    repository: Path, key_file: Path, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    live = serve(repository, key_file, auth_token_file=tokens, max_message_bytes=1 << 20)
    try:
        counts = Counts(live)
        unauthenticated = Code.UNAUTHENTICATED
        with grpc.insecure_channel(live.target) as channel:
            predict = channel.unary_unary("/rnnlm.v1.LanguageModel/PredictNext")
            # Over the receive limit, and not protobuf either: neither is looked at.
            refused(lambda: predict(b"\xff" * (2 << 20), timeout=30), unauthenticated,
                    "Bearer")  # fmt: skip
            refused(lambda: predict(b"\xff\xff", timeout=30), unauthenticated, "Bearer")
            session = channel.stream_stream("/rnnlm.v1.LanguageModel/TypingSession")
            refused(lambda: list(session(iter([b"\xff" * 1000] * 3), timeout=30)),
                    unauthenticated)  # fmt: skip
            # With the token, the same bytes are looked at.
            auth = (("authorization", f"Bearer {TOKEN}"),)
            refused(lambda: predict(b"\xff\xff", metadata=auth, timeout=30),
                    Code.INVALID_ARGUMENT)  # fmt: skip
            # The services anyone may call take small requests only.
            health = health_pb2_grpc.HealthStub(channel)
            big = health_pb2.HealthCheckRequest(service="s" * 100_000)
            refused(lambda: health.Check(big, timeout=30), Code.RESOURCE_EXHAUSTED, "65536")
            ok = health.Check(health_pb2.HealthCheckRequest(), timeout=30)
            assert ok.status == health_pb2.HealthCheckResponse.SERVING
        assert counts.delta("PredictNext", "UNAUTHENTICATED") == 2
        assert counts.delta("TypingSession", "UNAUTHENTICATED") == 1
        assert counts.delta("PredictNext", "INVALID_ARGUMENT") == 1
    finally:
        live.close()


# -- 8: drains and connection age --------------------------------------------------------------


class Connectivity:
    """A channel's connectivity states as they change; `left_ready` once it was READY and
    then was not (a GOAWAY or a closed connection)."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self.states: list[grpc.ChannelConnectivity] = []
        self.left_ready = threading.Event()
        channel.subscribe(self._seen, try_to_connect=True)

    def _seen(self, state: grpc.ChannelConnectivity) -> None:
        ready = grpc.ChannelConnectivity.READY
        if self.states and self.states[-1] == ready and state != ready:
            self.left_ready.set()
        self.states.append(state)

    def close(self) -> None:
        self.channel.unsubscribe(self._seen)


def test_a_drain_ends_idle_sessions_and_sends_goaway_at_once(
    repository: Path, key_file: Path
) -> None:
    """With a generation holding the drain open for its whole grace period, an idle typing
    session ends at once with UNAVAILABLE, clients get a GOAWAY at once, and the session
    resumes on another server from its state token."""
    live = serve(repository, key_file, grace_seconds=120.0, max_tokens=10**8)
    stopping = generation = None
    try:
        counts = Counts(live)
        with grpc.insecure_channel(live.target) as channel:
            stub = pb_grpc.LanguageModelStub(channel)
            generation = stub.Generate(pb.GenerateRequest(prompt="the", max_tokens=10**8))
            next(generation)  # in flight, and never read again: it holds the drain
            connectivity = Connectivity(channel)
            events: queue.Queue[pb.TypingEvent | None] = queue.Queue()
            events.put(pb.TypingEvent(text="the cat ", return_state_token=True))
            replies = stub.TypingSession(iter(events.get, None), timeout=60)
            first = next(replies)
            assert first.state_token
            stopping = asyncio.run_coroutine_threadsafe(live.server.stop(), live.loop)
            details = refused(lambda: next(replies), Code.UNAVAILABLE, "state_token")
            events.put(None)
            assert "reconnect" in details
            assert connectivity.left_ready.wait(30), connectivity.states
            assert not stopping.done()  # the generation still holds the drain
            assert counts.delta("TypingSession", "UNAVAILABLE", WORD) == 1
            connectivity.close()
    finally:
        if generation is not None:
            generation.cancel()
        if stopping is not None:
            stopping.result(60)
        live.close()
    elsewhere = serve(repository, key_file)
    try:
        with grpc.insecure_channel(elsewhere.target) as channel:
            stub = pb_grpc.LanguageModelStub(channel)
            resumed = typing(stub, pb.TypingEvent(state_token=first.state_token, text="sees "))
            fresh = stub.PredictNext(pb.PredictNextRequest(context="the cat sees ", k=1))
            assert resumed[0].context_tokens == fresh.context_tokens == 3
    finally:
        elsewhere.close()


def test_connections_are_sent_goaway_at_their_maximum_age(repository: Path, key_file: Path) -> None:
    live = serve(repository, key_file, max_connection_age_seconds=1.0)
    try:
        with grpc.insecure_channel(live.target) as channel:
            stub = pb_grpc.LanguageModelStub(channel)
            connectivity = Connectivity(channel)
            assert stub.ListModels(pb.ListModelsRequest(), timeout=30).models
            assert connectivity.left_ready.wait(30), connectivity.states
            # The channel reconnects for the next call.
            assert stub.ListModels(pb.ListModelsRequest(), timeout=30).models
            connectivity.close()
    finally:
        live.close()


# -- configuration ------------------------------------------------------------------------------


def test_the_new_limits_are_configurable_and_checked(tmp_path: Path) -> None:
    base = ServerConfig(models=tmp_path)
    assert base.max_text_chars == 131_072
    assert base.max_connection_age_seconds == 300.0
    assert base.max_connection_age_grace_seconds == 0.0
    with pytest.raises(ConfigError, match="--max-text-chars"):
        ServerConfig(models=tmp_path, max_text_chars=0)
    with pytest.raises(ConfigError, match="--max-connection-age-seconds"):
        ServerConfig(models=tmp_path, max_connection_age_seconds=-1)
