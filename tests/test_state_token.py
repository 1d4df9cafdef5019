"""Portable state tokens: a typing session made on one server resumes on another.

Server A serves versions 1 and 2 of the tiny word model, server B version 1 only, both with the
same state-token key; C has another key and D has none. The format is also checked on its own.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from test_server import LiveServer, config, copy_bundle

from rnnlm.client import Client
from rnnlm.v1 import language_model_pb2 as pb
from server.config import ConfigError
from server.state_token import SessionContext, StateTokenError, StateTokens

NAME = "tiny-lstm-word"
KEY = "a-state-token-key-shared-by-replicas-0123456789"
OTHER_KEY = "another-state-token-key-0123456789abcdef0123"
Code = grpc.StatusCode


def _key_file(directory: Path, *keys: str) -> Path:
    path = directory / "state-token.keys"
    path.write_text("".join(k + "\n" for k in keys))
    return path


@pytest.fixture(scope="module")
def servers(
    default_bundle: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Client]]:
    root = tmp_path_factory.mktemp("state-token")
    copy_bundle(default_bundle, root / "ab" / NAME / "1")
    copy_bundle(default_bundle, root / "ab" / NAME / "2", version="2")
    copy_bundle(default_bundle, root / "b" / NAME / "1")
    shared = _key_file(tmp_path_factory.mktemp("shared-key"), KEY)
    other = _key_file(tmp_path_factory.mktemp("other-key"), OTHER_KEY)
    setups = {
        "A": config(root / "ab", state_token_key_file=shared),
        "B": config(root / "b", state_token_key_file=shared),
        "C": config(root / "b", state_token_key_file=other),
        "D": config(root / "b"),
    }
    live = {name: LiveServer(c) for name, c in setups.items()}
    clients = {name: Client(s.target, timeout=30) for name, s in live.items()}
    yield clients
    for client in clients.values():
        client.close()
    for server in live.values():
        server.close()


def _same(a: pb.Suggestions | pb.PredictNextResponse, b: pb.Suggestions) -> None:
    assert a.context_tokens == b.context_tokens
    assert [p.token_id for p in a.predictions] == [p.token_id for p in b.predictions]
    np.testing.assert_allclose(
        [p.probability for p in a.predictions], [p.probability for p in b.predictions], rtol=1e-5
    )


def _refused(call: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        call()  # type: ignore[operator]
    return error.value


def test_a_session_moves_to_another_server(servers: dict[str, Client]) -> None:
    a, b = servers["A"], servers["B"]
    start = [
        pb.TypingEvent(text="the cat ", model_version="1", k=4),
        pb.TypingEvent(text="sees ", k=4, return_state_token=True),
    ]
    rest = [pb.TypingEvent(text="the ", k=4), pb.TypingEvent(partial_word="m", k=4)]
    on_a = list(a.typing_session([*start, *rest]))
    token = on_a[1].state_token
    assert token and not on_a[0].state_token and not on_a[2].state_token
    resumed = [pb.TypingEvent(state_token=token, text=rest[0].text, k=4), rest[1]]
    on_b = list(b.typing_session(resumed))
    for expected, got in zip(on_a[2:], on_b, strict=True):
        _same(expected, got)
    assert on_b[0].context_tokens == 4
    # PredictNext resumes the same token: the context continues the token's (with the word
    # cache, which a session's events get by default and a PredictNext asks for).
    _same(b.predict_next("the ", k=4, state_token=token, word_cache=True), on_a[2])
    _same(
        b.predict_next("the ", k=4, partial_word="m", state_token=token, word_cache=True), on_a[3]
    )


def test_predict_next_hands_out_tokens_that_chain(servers: dict[str, Client]) -> None:
    a, b = servers["A"], servers["B"]
    first = a.predict_next("the cat ", k=3, model_version="1", return_state_token=True)
    second = b.predict_next("sees ", k=3, state_token=first.state_token, return_state_token=True)
    third = a.predict_next("the ", k=3, state_token=second.state_token)
    _same(third, a.predict_next("the cat sees the ", k=3, model_version="1"))
    assert (second.model_version, third.model_version) == ("1", "1")
    # A token made by version 2 resumes on version 2 (A), and is not found where only 1 is (B).
    newest = a.predict_next("the cat ", k=3, return_state_token=True)
    assert a.predict_next("", k=3, state_token=newest.state_token).model_version == "2"
    error = _refused(lambda: b.predict_next("", k=3, state_token=newest.state_token))
    assert error.code() == Code.NOT_FOUND
    assert error.details().startswith("state_token cannot be resumed here: model")


def test_bad_tokens_are_invalid_arguments_naming_state_token(servers: dict[str, Client]) -> None:
    a, b, c = servers["A"], servers["B"], servers["C"]
    token = a.predict_next("the cat ", k=3, model_version="1", return_state_token=True).state_token
    tampered = bytearray(token)
    tampered[len(token) // 2] ^= 0x01
    cases = {
        "tampered": (b, {"state_token": bytes(tampered)}, "state_token is not valid"),
        "truncated": (b, {"state_token": token[:-1]}, "state_token is not valid"),
        "too short": (b, {"state_token": token[:20]}, "state_token is truncated"),
        "future format": (b, {"state_token": b"\x07" + token[1:]}, "format version 7"),
        "other key": (c, {"state_token": token}, "state_token is not valid"),
        "other model": (b, {"state_token": token, "model": "x"}, "state_token is for model"),
        "other version": (a, {"state_token": token, "model_version": "2"}, "version '2'"),
    }
    for case, (client, fields, message) in cases.items():
        error = _refused(lambda: client.predict_next("", k=3, **fields))  # noqa: B023
        assert error.code() == Code.INVALID_ARGUMENT, case
        assert message in error.details(), (case, error.details())
    events = [pb.TypingEvent(state_token=token, reset=True)]
    error = _refused(lambda: list(b.typing_session(events)))
    assert error.code() == Code.INVALID_ARGUMENT and "reset or state_token" in error.details()
    newest = a.predict_next("the ", k=3, return_state_token=True).state_token
    events = [pb.TypingEvent(text="a ", model_version="1"), pb.TypingEvent(state_token=newest)]
    error = _refused(lambda: list(a.typing_session(events)))
    assert error.code() == Code.INVALID_ARGUMENT
    assert re.search(r"state_token is for .* version '2', but this session uses", error.details())


def test_without_a_key_tokens_are_a_failed_precondition(servers: dict[str, Client]) -> None:
    token = servers["B"].predict_next("the ", k=3, return_state_token=True).state_token
    d = servers["D"]
    for call, field in (
        (lambda: d.predict_next("the ", k=3, return_state_token=True), "return_state_token"),
        (lambda: d.predict_next("", k=3, state_token=token), "state_token"),
        (lambda: list(d.typing_session([pb.TypingEvent(return_state_token=True)])),
         "return_state_token"),
    ):  # fmt: skip
        error = _refused(call)
        assert error.code() == Code.FAILED_PRECONDITION
        assert error.details().startswith(f"{field}: state tokens are disabled")
        assert "--state-token-key-file" in error.details()


# -- the format --------------------------------------------------------------------------------


def test_the_format_round_trips_and_every_alteration_is_caught() -> None:
    tokens = StateTokens([KEY.encode()])
    context = SessionContext("model-ü", "12", 5, "the cat ∂ sees\nthe ")
    token = tokens.seal(context)
    assert token[0] == 1
    assert tokens.open(token) == context
    for i in range(len(token)):
        for flip in (0x01, 0x80):
            altered = bytearray(token)
            altered[i] ^= flip
            with pytest.raises(StateTokenError, match="state_token"):
                tokens.open(bytes(altered))
    for n in range(len(token)):
        with pytest.raises(StateTokenError, match="state_token"):
            tokens.open(token[:n])
    with pytest.raises(StateTokenError, match="state_token"):
        tokens.open(token + b"\x00")


def test_key_rotation_verifies_with_every_key_and_signs_with_the_first() -> None:
    old, new = StateTokens([KEY.encode()]), StateTokens([OTHER_KEY.encode()])
    rotating = StateTokens([OTHER_KEY.encode(), KEY.encode()])
    context = SessionContext("m", "1", 1, "a ")
    assert rotating.open(old.seal(context)) == context
    assert new.open(rotating.seal(context)) == context
    with pytest.raises(StateTokenError):
        new.open(old.seal(context))


def test_bad_key_files_are_refused(tmp_path: Path) -> None:
    path = _key_file(tmp_path, "# rotated", KEY, OTHER_KEY)
    assert StateTokens.from_file(path).keys == (KEY.encode(), OTHER_KEY.encode())
    with pytest.raises(ConfigError, match="line 1: the key has 5 characters"):
        StateTokens.from_file(_key_file(tmp_path, "short"))
    with pytest.raises(ConfigError, match="the file has no entry"):
        StateTokens.from_file(_key_file(tmp_path))
    with pytest.raises(ConfigError, match=r"--state-token-key-file .*: cannot read"):
        StateTokens.from_file(tmp_path / "missing")
