"""Predictive typing on a real server: next words from character and BPE models (the word
search), case- and accent-insensitive matching, the blocklist, user words, and a typing
session's keystrokes that cost no model step.

A searched word's probability is checked against the model itself: its pieces' log-probs
come from Score, and the probability that the word ends after them (the boundary tokens'
total) from the token-level PredictNext (`next_tokens`) plus Score's log-prob of eos.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import queue
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from test_server import LiveServer, config, metric

from rnnlm.bundle import add_blocklist, load_manifest
from rnnlm.cli import main
from rnnlm.client import Client
from rnnlm.v1 import language_model_pb2 as pb
from rnnlm.v1 import language_model_pb2_grpc as pb_grpc
from server.app import RnnlmServer
from server.bundle import load_bundle
from server.config import ConfigError, add_arguments, config_from_args
from server.engine import Engine, EngineConfig, SamplingParams
from server.typing import word_settings
from server.words import is_word, read_word_list

CHAR, BPE, WORD = "tiny-gru-char", "tiny-rnn_tanh-bpe", "tiny-lstm-word"
MODELS = {CHAR: ("gru", "char"), BPE: ("rnn_tanh", "bpe"), WORD: ("lstm", "word")}
# In the word bundle's own blocklist (exported with --blocklist) and the server's --blocklist.
BUNDLE_BLOCKED, SERVER_BLOCKED = "moon", "river"
CONTEXT = "the cat sees the "


WIDE = 512  # hypotheses a search keeps per round: more than the tiny models' pieces


@pytest.fixture(scope="module")
def live(
    tiny_bundle_factory: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("typing-models")
    for name, (cell, tokenizer) in MODELS.items():
        shutil.copytree(tiny_bundle_factory(cell, tokenizer), root / name)
        add_blocklist(root / name, f"# never suggested\n{BUNDLE_BLOCKED.upper()}\n")
    blocklist = root.parent / "server-blocklist.txt"
    blocklist.write_text(f"{SERVER_BLOCKED}\n", encoding="utf-8")
    # A generous time budget: the width and depth bound the search, never the clock. A width
    # above the tiny vocabularies: a search drops no piece, so the words it stores hold the k
    # likeliest of every longer partial word among them (an extending keystroke filters them).
    server = LiveServer(
        config(
            root,
            default_model=WORD,
            word_search_ms=60_000.0,
            word_search_width=WIDE,
            blocklist=blocklist,
        )
    )
    yield server
    server.close()


@pytest.fixture(scope="module")
def client(live: LiveServer) -> Iterator[Client]:
    with Client(live.target, timeout=60) as c:
        yield c


def _vocab(client: Client, model: str) -> int:
    return client.get_model(model).vocab_size


def _word_probability(client: Client, model: str, context: str, word: pb.Prediction) -> float:
    """The model's probability of `word` after `context`: its pieces', times the total
    probability of the tokens that end a word after it."""
    (scored,) = client.score(
        [context + word.token + "\n"], return_token_logprobs=True, model=model
    ).results
    tokens = list(scored.token_logprobs)
    n = len(word.token_ids)
    assert [t.token_id for t in tokens[-n - 1 : -1]] == list(word.token_ids)
    pieces = sum(t.logprob for t in tokens[-n - 1 : -1])
    after = client.predict_next(
        context + word.token, k=_vocab(client, model), model=model, next_tokens=True
    )
    ends = [p.probability for p in after.predictions if _boundary(p.token)]
    return math.exp(pieces) * (math.exp(tokens[-1].logprob) + sum(ends))


def _boundary(token: str) -> bool:
    return not is_word(token) and not (token[:1] == " " and is_word(token[1:]))


@pytest.mark.parametrize("model", [CHAR, BPE])
@pytest.mark.parametrize("partial", ["", "b", "s"])
def test_searched_words_carry_the_models_probability(
    client: Client, model: str, partial: str
) -> None:
    # The model's own words: without the word cache (tests/test_word_cache.py).
    reply = client.predict_next(CONTEXT, k=4, partial_word=partial, model=model, word_cache=False)
    assert reply.words and reply.model_steps > 1
    words = list(reply.predictions)
    assert words, "the search found no word"
    assert len({w.token for w in words}) == len(words)
    for w in words:
        assert is_word(w.token) and w.token.startswith(partial)
        assert w.token_id == (w.token_ids[0] if len(w.token_ids) == 1 else -1)
    expected = [_word_probability(client, model, CONTEXT, w) for w in words]
    total = sum(expected)
    for w, p in zip(words, expected, strict=True):
        assert w.probability == pytest.approx(p / total, rel=2e-3)
    probabilities = [w.probability for w in words]
    assert probabilities == sorted(probabilities, reverse=True)
    assert sum(probabilities) == pytest.approx(1.0, rel=1e-5)


def test_char_model_completes_a_word_of_the_corpus(client: Client) -> None:
    reply = client.predict_next("the cat ", k=3, partial_word="se", model=CHAR)
    assert "sees" in [p.token for p in reply.predictions], reply


def test_word_models_still_predict_their_tokens(client: Client) -> None:
    reply = client.predict_next(CONTEXT, k=3, model=WORD)
    assert not reply.words and reply.model_steps == 1
    assert all(p.token_id >= 0 and not p.token_ids for p in reply.predictions)
    tokens = client.predict_next(CONTEXT, k=3, model=CHAR, next_tokens=True)
    assert not tokens.words and all(len(p.token) == 1 for p in tokens.predictions)


def test_a_word_model_session_steps_on_from_its_own_state(live: LiveServer, client: Client) -> None:
    """A separator that extends a word model's context is stepped from the state the session
    holds: one step, no lookup of the whole context in the state cache, and the suggestions of
    a fresh PredictNext of the same context (up to the rounding of another batch)."""
    session = _Session(client)
    try:
        session.send(model=WORD, text=CONTEXT, k=5)
        before = live.scrape()
        replies = [session.send(k=5, text=word) for word in ("dog ", "likes ", "the ")]
        after = live.scrape()
    finally:
        session.close()
    lookups = [
        metric(samples, f"rnnlm_state_cache_{kind}_total", model=WORD)
        for samples in (before, after)
        for kind in ("hits", "misses")
    ]
    assert lookups[:2] == lookups[2:]  # hits and misses unchanged
    for reply, context in zip(replies, ("dog ", "dog likes ", "dog likes the "), strict=True):
        assert reply.model_steps == 1
        fresh = client.predict_next(CONTEXT + context, k=5, model=WORD, word_cache=True)
        assert [p.token for p in reply.predictions] == [p.token for p in fresh.predictions]
        for a, b in zip(reply.predictions, fresh.predictions, strict=True):
            assert a.probability == pytest.approx(b.probability, rel=1e-5)


@pytest.mark.parametrize("model", [CHAR, BPE, WORD])
def test_case_insensitive_matching_keeps_the_typed_case(client: Client, model: str) -> None:
    lower = client.predict_next(CONTEXT, k=3, partial_word="b", model=model, fold_case=True)
    upper = client.predict_next(CONTEXT, k=3, partial_word="B", model=model, fold_case=True)
    assert [p.token for p in lower.predictions]
    assert [p.token for p in upper.predictions] == ["B" + p.token[1:] for p in lower.predictions]
    assert [p.probability for p in upper.predictions] == pytest.approx(
        [p.probability for p in lower.predictions]
    )
    accented = client.predict_next(CONTEXT, k=3, partial_word="bä", model=model, fold_case=True)
    assert accented.predictions
    assert all(p.token.startswith("bä") for p in accented.predictions)
    if model == WORD:  # exact matching stays word models' default
        assert client.predict_next(CONTEXT, k=3, partial_word="B", model=model).predictions == []
    else:
        default = client.predict_next(CONTEXT, k=3, partial_word="B", model=model)
        assert [p.token for p in default.predictions] == [p.token for p in upper.predictions]
        exact = client.predict_next(CONTEXT, k=3, partial_word="B", model=model, fold_case=False)
        assert exact.predictions == []


@pytest.mark.parametrize("model", [CHAR, BPE, WORD])
def test_blocked_words_never_appear(client: Client, model: str) -> None:
    def suggested(partial: str, **kw: object) -> list[str]:
        reply = client.predict_next(CONTEXT, k=5, partial_word=partial, model=model, **kw)
        return [p.token.lower() for p in reply.predictions]

    free = suggested("", blocked_words=[])
    assert free
    top = free[0]
    assert top not in suggested("", blocked_words=[top.upper()])
    assert top not in suggested(top[:1], blocked_words=[top], user_words=[top])
    for partial in ("", "m", "mo", "r", "ri"):
        for kw in ({}, {"user_words": [BUNDLE_BLOCKED, SERVER_BLOCKED]}):
            words = suggested(partial, **kw)
            assert BUNDLE_BLOCKED not in words and SERVER_BLOCKED not in words
    # Score and Generate are unaffected.
    (scored,) = client.score([CONTEXT + BUNDLE_BLOCKED], model=model).results
    assert math.isfinite(scored.log_prob)


@pytest.mark.parametrize("model", [CHAR, BPE, WORD])
def test_user_words_appear_when_they_fit(client: Client, model: str) -> None:
    name = "Zelda"
    assert name not in [
        p.token
        for p in client.predict_next(CONTEXT, k=3, partial_word="z", model=model).predictions
    ]
    reply = client.predict_next(CONTEXT, k=3, partial_word="Ze", model=model, user_words=[name])
    assert name in [p.token for p in reply.predictions]
    elsewhere = client.predict_next(CONTEXT, k=3, partial_word="b", model=model, user_words=[name])
    assert name not in [p.token for p in elsewhere.predictions]
    # A user word the model also predicts is boosted.
    plain = client.predict_next(CONTEXT, k=3, partial_word="b", model=model)
    last = plain.predictions[-1].token
    boosted = client.predict_next(CONTEXT, k=3, partial_word="b", model=model, user_words=[last])
    ranks = [p.token for p in boosted.predictions]
    assert last in ranks
    assert boosted.predictions[ranks.index(last)].probability > plain.predictions[-1].probability


def test_a_rare_user_word_of_a_word_model_is_suggested(client: Client) -> None:
    every = client.predict_next(CONTEXT, k=_vocab(client, WORD), partial_word="f", model=WORD)
    rare = every.predictions[-1]
    assert len(every.predictions) > 2
    reply = client.predict_next(CONTEXT, k=2, partial_word="f", model=WORD, user_words=[rare.token])
    (mine,) = [p for p in reply.predictions if p.token == rare.token]
    assert mine.token_id == rare.token_id and mine.probability > rare.probability
    # With no letter typed, a user word is boosted by its own probability only.
    start = client.predict_next(CONTEXT, k=_vocab(client, WORD), model=WORD)
    (plain,) = [p for p in start.predictions if p.token == rare.token]
    boosted = client.predict_next(
        CONTEXT, k=_vocab(client, WORD), model=WORD, user_words=[rare.token]
    )
    (mine,) = [p for p in boosted.predictions if p.token == rare.token]
    mass = sum(p.probability for p in start.predictions) + 9 * plain.probability
    assert mine.probability == pytest.approx(10 * plain.probability / mass, rel=1e-4)


class _Session:
    """A typing session driven one event at a time, each reply read before the next event."""

    def __init__(self, client: Client) -> None:
        self._events: queue.Queue[pb.TypingEvent | None] = queue.Queue()
        self._replies = client.typing_session(iter(self._events.get, None))

    def send(self, **fields: object) -> pb.Suggestions:
        self._events.put(pb.TypingEvent(**fields))  # type: ignore[arg-type]
        return next(self._replies)

    def close(self) -> None:
        self._events.put(None)


@pytest.mark.parametrize("model", [CHAR, BPE, WORD])
def test_an_extending_keystroke_costs_no_model_step(client: Client, model: str) -> None:
    session = _Session(client)
    try:
        first = session.send(model=model, text=CONTEXT, k=1)
        assert first.model_steps >= 1 and first.words == (model != WORD)
        typed = session.send(k=5, partial_word="b")
        word = max(typed.predictions, key=lambda p: len(p.token))
        assert word.token.startswith("b") and len(word.token) >= 2
        # A word suggested after "b" matches the next letters: no model step.
        for n in range(2, len(word.token) + 1):
            reply = session.send(k=1, partial_word=word.token[:n])
            assert reply.model_steps == 0
            assert reply.predictions and reply.predictions[0].token.startswith(word.token[:n])
        # The session's blocked words apply at once, and its user words are kept.
        blocked = session.send(k=1, partial_word=word.token[:2], blocked_words=[word.token])
        assert word.token not in [p.token for p in blocked.predictions]
        mine = session.send(k=2, partial_word="Zel", user_words=["Zelda"])
        assert "Zelda" in [p.token for p in mine.predictions]
        again = session.send(k=2, partial_word="Zeld")
        assert "Zelda" in [p.token for p in again.predictions]
        # A new context runs the model again.
        after = session.send(k=1, text=word.token + " ", partial_word="")
        assert after.model_steps >= 1 and after.context_tokens > first.context_tokens
    finally:
        session.close()


def _keystroke_and_fresh_search(
    client: Client, model: str, k: int, letters: int
) -> tuple[pb.Suggestions, pb.PredictNextResponse]:
    """In a session on CONTEXT, the word suggested after "b"; then the session's answer (`k`
    words) to that word's first `letters` letters, and a new search's answer to the same."""
    session = _Session(client)
    try:
        session.send(model=model, text=CONTEXT, k=1)
        (word,) = session.send(k=1, partial_word="b").predictions
        typed = session.send(k=k, partial_word=word.token[:letters])
    finally:
        session.close()
    return typed, client.predict_next(CONTEXT, k=k, partial_word=word.token[:letters], model=model)


def test_filtered_keystrokes_equal_a_fresh_search(client: Client) -> None:
    """A session's filtered answer is the word a new search of the same context ranks first."""
    filtered, fresh = _keystroke_and_fresh_search(client, CHAR, k=1, letters=2)
    assert filtered.model_steps == 0 and fresh.model_steps > 0
    assert [p.token for p in filtered.predictions] == [p.token for p in fresh.predictions]


@pytest.mark.parametrize("model", [CHAR, BPE])
def test_a_keystroke_the_stored_words_cannot_answer_resumes_the_search(
    client: Client, model: str
) -> None:
    """Asked for more words than the last search kept, a keystroke searches on from where that
    search stopped: fewer steps than a new search, and the same words and probabilities."""
    resumed, fresh = _keystroke_and_fresh_search(client, model, k=6, letters=1)
    assert 0 < resumed.model_steps < fresh.model_steps
    assert [p.token for p in resumed.predictions] == [p.token for p in fresh.predictions]
    for a, b in zip(resumed.predictions, fresh.predictions, strict=True):
        assert a.probability == pytest.approx(b.probability, rel=1e-5)


@pytest.mark.parametrize("model", [CHAR, BPE, WORD])
@pytest.mark.parametrize("partial", ["", "b"])
def test_fewest_keys_suggests_words_with_their_probabilities(
    client: Client, model: str, partial: str
) -> None:
    """SELECTION_FEWEST_KEYS returns words only (a word model's punctuation is left out), most
    likely first, with the probabilities the likeliest would give them: the model's over
    the matching mass (word models) or renormalised over the words returned."""
    fewest = client.predict_next(
        CONTEXT, k=3, partial_word=partial, model=model, fewest_keys=True
    ).predictions
    assert len(fewest) == 3 and all(is_word(p.token) for p in fewest)
    assert all(p.token.startswith(partial) for p in fewest)
    probs = [p.probability for p in fewest]
    assert probs == sorted(probs, reverse=True)
    vocab = _vocab(client, model)
    many = client.predict_next(CONTEXT, k=vocab, partial_word=partial, model=model).predictions
    likeliest = {p.token: p.probability for p in many}
    ours = [likeliest[p.token] for p in fewest]
    if model == WORD:
        assert probs == pytest.approx(ours, rel=1e-5)
    else:
        assert sum(probs) == pytest.approx(1, rel=1e-5)
        assert probs == pytest.approx([p / sum(ours) for p in ours], rel=1e-4)


def test_fewest_keys_leaves_next_tokens_alone(client: Client) -> None:
    asked = {"k": 4, "model": CHAR, "next_tokens": True}
    fewest = client.predict_next(CONTEXT, fewest_keys=True, **asked)  # type: ignore[arg-type]
    assert fewest.predictions == client.predict_next(CONTEXT, **asked).predictions  # type: ignore[arg-type]


@pytest.mark.parametrize("model", [CHAR, WORD])
def test_fewest_keys_shows_a_word_once_while_it_is_typed(client: Client, model: str) -> None:
    """In a session choosing the fewest keys, a word shown while a word is typed is not shown
    again for that word (the typist passed it over); a new word starts afresh."""
    session = _Session(client)
    fewest = pb.SELECTION_FEWEST_KEYS
    try:
        start = session.send(model=model, text=CONTEXT, k=2, selection=fewest)
        shown = {p.token for p in start.predictions}
        vocab = _vocab(client, model)
        for partial in ("b", "bi", "bir"):
            reply = session.send(k=2, partial_word=partial, selection=fewest)
            tokens = {p.token for p in reply.predictions}
            every = client.predict_next(CONTEXT, k=vocab, partial_word=partial, model=model)
            fresh = {p.token for p in every.predictions} - shown
            # Words passed over fill only the slots that no other word can.
            assert tokens >= fresh if len(fresh) < 2 else not tokens & shown, (partial, tokens)
            assert len(tokens) == min(2, len(every.predictions))
            assert reply.model_steps == 0 or model != WORD
            shown |= tokens
        again = session.send(text=CONTEXT, reset=True, k=2, selection=fewest)
        assert again.predictions == start.predictions
        likeliest = session.send(k=2, partial_word="b")  # the default: the likeliest
        assert (
            likeliest.predictions
            == client.predict_next(CONTEXT, k=2, partial_word="b", model=model).predictions
        )
    finally:
        session.close()


def test_an_unknown_selection_is_refused(live: LiveServer) -> None:
    request = pb.PredictNextRequest(model=WORD, context=CONTEXT, k=2)
    request.selection = 7  # type: ignore[assignment]  # proto3 enums are open: it is sent
    with grpc.insecure_channel(live.target) as channel, pytest.raises(grpc.RpcError) as e:
        pb_grpc.LanguageModelStub(channel).PredictNext(request, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "selection 7 is not one of" in (e.value.details() or "")
    event = pb.TypingEvent(model=WORD, text=CONTEXT, k=2)
    event.selection = 9  # type: ignore[assignment]
    with grpc.insecure_channel(live.target) as channel, pytest.raises(grpc.RpcError) as e:
        list(pb_grpc.LanguageModelStub(channel).TypingSession(iter([event]), timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "selection 9 is not one of" in (e.value.details() or "")


def test_bad_word_lists_are_refused(client: Client) -> None:
    with pytest.raises(grpc.RpcError) as e:
        client.predict_next(CONTEXT, k=2, model=CHAR, blocked_words=["two words"])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "blocked_words[0]" in (e.value.details() or "")
    with pytest.raises(grpc.RpcError) as e:
        client.predict_next(CONTEXT, k=2, model=CHAR, user_words=["x"] * 5000)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "user_words has 5000 words" in (e.value.details() or "")


def test_the_bundle_lists_its_blocklist(live: LiveServer) -> None:
    manifest = load_manifest(Path(live.server.config.models) / CHAR)
    assert manifest.blocklist_file == "blocklist.txt"
    assert "blocklist.txt" in manifest.files


@pytest.mark.parametrize("busy", [False, True])
def test_many_contexts_at_once_equal_one_by_one(
    tiny_bundle_factory: Callable[..., Path], busy: bool
) -> None:
    """The engine's call for many contexts (the search's rounds) gives each context's own
    next-token log-probs, run inline when idle or through the workers when busy."""
    bundle = load_bundle(tiny_bundle_factory("gru", "char"))
    rng = np.random.default_rng(0)
    lengths = (5, 6, 12, 30) if busy else (5, 6, 12)  # short feeds run inline when idle
    contexts = [[], [3], *(rng.integers(2, bundle.vocab_size, n).tolist() for n in lengths)]

    async def main() -> tuple[list[np.ndarray], list[np.ndarray]]:
        engine = Engine(bundle, EngineConfig(state_cache_bytes=0))
        await engine.start()
        try:
            stream = engine.generate([3], 200, SamplingParams(temperature=1.0, seed=1))
            if busy:
                await anext(stream)  # a generation keeps the workers busy meanwhile
            many = await engine.next_token_logprobs_many(contexts)
            await stream.aclose()
            return many, [await engine.next_token_logprobs(c) for c in contexts]
        finally:
            await engine.close()

    many, one_by_one = asyncio.run(main())
    assert len(many) == len(contexts)
    for a, b in zip(many, one_by_one, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_rnnlm_predict_shows_words_for_a_char_model(
    live: LiveServer, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["predict", CONTEXT, "--partial-word", "B", "-k", "3", "--model", CHAR]
    assert main([*argv, "--target", live.target, "--block", "bird"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.strip().splitlines()]
    assert rows and all(word.startswith("B") and len(word) > 1 for _, word in rows)
    assert "Bird" not in [word for _, word in rows]
    assert main([*argv, "--target", live.target, "--next-tokens", "--fold-case"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.strip().splitlines()]
    assert rows and all(len(token) == 1 for _, token in rows)


def test_export_writes_the_blocklist_into_the_bundle(
    tiny_checkpoint_factory: Callable[..., Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    words = tmp_path / "blocked.txt"
    words.write_text("# offensive\nMoon\n\nriver  # a comment\n", encoding="utf-8")
    checkpoint = str(tiny_checkpoint_factory("gru", "char"))
    out = tmp_path / "bundle"
    assert main(["export", checkpoint, str(out), "--blocklist", str(words)]) == 0
    bundle = load_bundle(out)
    assert read_word_list(bundle.blocklist) == {"moon", "river"}
    assert load_manifest(out).files["blocklist.txt"]
    words.write_bytes(b"\xff\xfe")
    assert main(["export", checkpoint, str(tmp_path / "bad"), "--blocklist", str(words)]) == 2
    err = capsys.readouterr().err
    assert "--blocklist" in err and "UTF-8" in err and not (tmp_path / "bad").exists()


def test_word_flags_are_checked(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for argv, named in (
        (["--word-search-width", "0"], "--word-search-width"),
        (["--word-search-ms", "0"], "--word-search-ms"),
        (["--user-word-boost", "0.5"], "--user-word-boost"),
        (["--user-word-boost", "inf"], "--user-word-boost"),  # WordSettings' rule too
        (["--user-word-floor", "2"], "--user-word-floor"),
    ):
        with pytest.raises(ConfigError, match=named):
            config_from_args(parser.parse_args(["--models", str(tmp_path), *argv]), {})
    missing = config(tmp_path, blocklist=tmp_path / "missing.txt")
    with pytest.raises(ConfigError, match=r"--blocklist .*missing\.txt"):
        RnnlmServer(missing)
    env = {"RNNLM_WORD_SEARCH_DEPTH": "5"}
    assert (
        config_from_args(parser.parse_args(["--models", str(tmp_path)]), env).word_search_depth == 5
    )
    env = {"RNNLM_TYPING_SELECTION": "fewest-keys"}
    chosen = config_from_args(parser.parse_args(["--models", str(tmp_path)]), env)
    assert word_settings(chosen).typing_fewest_keys
    assert not word_settings(config(tmp_path)).typing_fewest_keys
    with pytest.raises(ConfigError, match="RNNLM_TYPING_SELECTION"):
        env = {"RNNLM_TYPING_SELECTION": "fewest"}
        config_from_args(parser.parse_args(["--models", str(tmp_path)]), env)
    with pytest.raises(SystemExit):  # argparse names the choices
        parser.parse_args(["--models", str(tmp_path), "--typing-selection", "fewest"])


def test_a_search_past_its_budget_still_answers_with_words(
    tiny_bundle_factory: Callable[..., Path], tmp_path: Path
) -> None:
    """Under load one round can outlast `--word-search-ms`; the search used to stop there with
    no word found and answer nothing (a CI run on a busy machine did). It now stops at the
    budget only once it has a word to show."""
    shutil.copytree(tiny_bundle_factory("gru", "char"), tmp_path / CHAR)
    server = LiveServer(config(tmp_path, word_search_ms=1e-6))  # every round passes it
    try:
        with Client(server.target, timeout=60) as c:
            reply = c.predict_next("the ca", k=2)
    finally:
        server.close()
    assert reply.words and len(reply.predictions) >= 1, reply
