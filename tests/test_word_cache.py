"""The word cache (server/word_cache.py) on a real server with tiny models of every tokenizer
kind: a word typed earlier in the context is suggested after its first letter, also a word the
model lacks; the mixture is the documented one; turning it off gives the model's suggestions
exactly."""

from __future__ import annotations

import math
import random
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_server import LiveServer, config

from rnnlm.client import Client
from rnnlm.v1 import language_model_pb2 as pb
from server import word_counts
from server.word_cache import WordCache, WordCacheSettings
from server.word_counts import WORDS
from server.words import Filters, Matcher

CHAR, BPE, WORD = "tiny-gru-char", "tiny-rnn_tanh-bpe", "tiny-lstm-word"
MODELS = {CHAR: ("gru", "char"), BPE: ("rnn_tanh", "bpe"), WORD: ("lstm", "word")}
WEIGHT = 0.2
# "sandwich" is not in the tiny corpus (tests/conftest.py), but its letters are: the word models
# lack it, and the char and BPE models' search does not find it after "s".
NEW = "sandwich"
CONTEXT = f"the cat sees a {NEW} .\nthe dog likes the "


@pytest.fixture(scope="module")
def servers(
    tiny_bundle_factory: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, LiveServer]]:
    root = tmp_path_factory.mktemp("word-cache-models")
    for name, (cell, tokenizer) in MODELS.items():
        shutil.copytree(tiny_bundle_factory(cell, tokenizer), root / name)
    # A wide search with no time bound: the suggestions do not depend on the machine's load.
    common = dict(default_model=WORD, word_search_ms=60_000.0, word_search_width=512)
    # Plain counts (no decay, no bigram share): the mixture is checked against them below.
    on = LiveServer(
        config(
            root,
            word_cache_weight=WEIGHT,
            word_cache_decay=1.0,
            word_cache_bigram=0.0,
            **common,
        )
    )
    off = LiveServer(config(root, word_cache=False, **common))
    yield {"on": on, "off": off}
    on.close()
    off.close()


@pytest.fixture(scope="module")
def clients(servers: dict[str, LiveServer]) -> Iterator[dict[str, Client]]:
    with Client(servers["on"].target, timeout=60) as on, Client(servers["off"].target) as off:
        yield {"on": on, "off": off}


def _tokens(reply: pb.PredictNextResponse | pb.Suggestions) -> list[str]:
    return [p.token for p in reply.predictions]


def _replies(reply: pb.PredictNextResponse) -> list[tuple[str, int, float, list[int]]]:
    return [(p.token, p.token_id, p.probability, list(p.token_ids)) for p in reply.predictions]


def test_the_cache_counts_the_texts_complete_words() -> None:
    cache = WordCache.of("to be, or not to be: to", "char", 0.5)
    # "to" at the end is still being typed; every other word counts 0.5 ** (words after it).
    assert set(cache.weights) == {"to", "be", "or", "not"}
    assert cache.weights["be"] == pytest.approx(0.5**0 + 0.5**4)
    assert cache.weights["to"] == pytest.approx(0.5**1 + 0.5**5)
    assert cache.total == pytest.approx(sum(0.5**i for i in range(6)))
    assert WordCache.of("it's Jack's", "char", 1.0).weights == {"it's": 1.0}
    assert WordCache.of("it's Jack's ", "word", 1.0).weights == {"it": 1, "s": 2, "Jack": 1}


def test_the_bigram_share_goes_to_the_words_that_followed_the_last_word() -> None:
    cache = WordCache.of("my lord is here. my lord, the king. my ", "word", 1.0, 0.5)
    # "my" is the last word; "lord" followed it twice before. 9 words, "lord" 2 of them.
    assert cache.total == 1.0
    assert cache.weights["lord"] == pytest.approx(0.5 * 2 / 9 + 0.5 * 2 / 2)
    assert cache.weights["king"] == pytest.approx(0.5 * 1 / 9)
    assert sum(cache.weights.values()) == pytest.approx(1.0)
    # No word followed the last one before: the shares of the words alone.
    assert WordCache.of("a b c ", "word", 1.0, 0.5).weights == {"a": 1, "b": 1, "c": 1}


@pytest.mark.parametrize("bad", [dict(weight=0.0), dict(weight=1.0), dict(decay=0.0)])
def test_settings_out_of_range_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="word cache"):
        WordCacheSettings(**bad)


@pytest.mark.parametrize("model", [CHAR, BPE, WORD])
def test_a_word_typed_earlier_is_suggested_after_its_first_letter(
    clients: dict[str, Client], model: str
) -> None:
    on = clients["on"].predict_next(CONTEXT, k=3, partial_word="s", model=model, word_cache=True)
    assert NEW in _tokens(on), on
    off = clients["on"].predict_next(CONTEXT, k=3, partial_word="s", model=model, word_cache=False)
    assert NEW not in _tokens(off)
    if model == WORD:  # a word the model lacks: no token id
        (new,) = [p for p in on.predictions if p.token == NEW]
        assert new.token_id == -1 and not new.token_ids


@pytest.mark.parametrize("model", [CHAR, BPE, WORD])
@pytest.mark.parametrize("partial", ["", "s"])
def test_turning_it_off_gives_the_models_suggestions_exactly(
    clients: dict[str, Client], model: str, partial: str
) -> None:
    asked = dict(k=5, partial_word=partial, model=model)
    off_here = clients["on"].predict_next(CONTEXT, word_cache=False, **asked)
    off_server = clients["off"].predict_next(CONTEXT, **asked)
    on_asked = clients["off"].predict_next(CONTEXT, word_cache=True, **asked)
    assert _replies(off_here) == _replies(off_server)
    assert _tokens(on_asked) != _tokens(off_server)
    # Unset, a PredictNext keeps the model's probabilities whatever the server's default
    # (as before the field existed); a typing session's event gets the server's default.
    assert _replies(clients["on"].predict_next(CONTEXT, **asked)) == _replies(off_server)
    (typed,) = clients["on"].typing_session(
        [pb.TypingEvent(model=model, reset=True, text=CONTEXT, k=5, partial_word=partial)]
    )
    assert _tokens(typed) != _tokens(off_server)


def test_a_word_models_mixture_is_the_documented_one(clients: dict[str, Client]) -> None:
    """p = (1 - weight) p_model + weight * count / words, over the whole vocabulary."""
    client = clients["on"]
    vocab = client.get_model(WORD).vocab_size
    model = {
        p.token: p.probability
        for p in client.predict_next(CONTEXT, k=vocab, word_cache=False).predictions
    }
    words = CONTEXT.split()
    counts = {w: words.count(w) for w in words if w.isalnum()}
    n = sum(counts.values())
    mixed = client.predict_next(CONTEXT, k=8, word_cache=True).predictions
    for p in mixed:
        expected = (1 - WEIGHT) * model.get(p.token, 0.0) + WEIGHT * counts.get(p.token, 0) / n
        assert p.probability == pytest.approx(expected, rel=1e-4), p.token
    ranked = sorted(
        set(model) | set(counts),
        key=lambda w: -((1 - WEIGHT) * model.get(w, 0.0) + WEIGHT * counts.get(w, 0) / n),
    )
    assert [p.token for p in mixed] == ranked[:8]


@pytest.mark.parametrize("model", [CHAR, WORD])
def test_a_session_learns_a_word_as_it_is_typed(clients: dict[str, Client], model: str) -> None:
    events = [
        pb.TypingEvent(model=model, reset=True, text="the cat sees a ", k=3),
        pb.TypingEvent(text=f"{NEW} .\nthe dog likes the ", k=3),
        pb.TypingEvent(partial_word="s", k=3),
        pb.TypingEvent(partial_word="sa", k=3),
        pb.TypingEvent(partial_word="sa", k=3, word_cache=False),
    ]
    replies = list(clients["on"].typing_session(events))
    assert NEW in _tokens(replies[2]) and NEW in _tokens(replies[3])
    assert NEW not in _tokens(replies[4])
    if model == WORD:  # a letter keystroke still runs no model step
        assert [r.model_steps for r in replies[2:]] == [0, 0, 0]
    assert math.isclose(sum(p.probability for p in replies[3].predictions), 1.0, rel_tol=1e-5)


def _recount(text: str, kind: str, decay: float, bigram: float, window: int) -> dict[str, float]:
    """The word cache's weights counted from scratch, as they are defined (the module doc)."""
    found = WORDS[kind].findall(text[-window:])
    if found and text.endswith(found[-1]):
        found.pop()
    if len(text) > window and found:
        found.pop(0)
    weights: dict[str, float] = {}
    after: dict[str, float] = {}
    for age, i in enumerate(range(len(found) - 1, -1, -1)):
        weights[found[i]] = weights.get(found[i], 0.0) + decay**age
        if bigram and 0 < i < len(found) - 1 and found[i - 1] == found[-1]:
            after[found[i]] = after.get(found[i], 0.0) + decay**age
    total = sum(weights.values())
    if not after:
        return weights
    follow = sum(after.values())
    return {
        w: (1 - bigram) * c / total + bigram * after.get(w, 0.0) / follow
        for w, c in weights.items()
    }


def _typed(seed: int) -> Iterator[str]:
    """A session's texts: words and separators appended, now and then a reset or a run of
    separators as long as the window (the words before it leave)."""
    rng = random.Random(seed)
    words = [
        "to",
        "be",
        "or",
        "not",
        "that",
        "is",
        "the",
        "question",
        "Lord",
        "lord",
        "it's",
        "o'",
        "thee",
    ]
    text = ""
    for i in range(400):
        if rng.random() < 0.02:
            text = " ".join(rng.choices(words, k=rng.randrange(0, 30)))
        elif rng.random() < 0.03 or i in (200, 201):
            text += "-" * 110
        else:
            text += rng.choice(words)[: rng.randrange(1, 9)] + rng.choice(
                [" ", " ", ", ", ".\n", ""]
            )
        yield text


@pytest.mark.parametrize(
    ("kind", "decay", "bigram"), [("char", 1.0, 0.0), ("char", 0.9, 0.3), ("word", 0.5, 0.6)]
)
def test_a_session_s_cache_updated_word_by_word_equals_one_counted_anew(
    monkeypatch: pytest.MonkeyPatch, kind: str, decay: float, bigram: float
) -> None:
    """The counts a session updates as its text grows (a small window, so that words leave
    it; frequent rescaling) give the weights, order and masses of a count from scratch."""
    window = 120
    monkeypatch.setattr(word_counts, "CACHE_CHARS", window)
    monkeypatch.setattr(word_counts, "_RESCALE_LOG", 3.0)
    settings = WordCacheSettings(weight=0.1, decay=decay, bigram=bigram)
    cache = None
    for text in _typed(seed=len(kind) + int(10 * decay)):
        mixer = settings.mixer(True, cache, text, kind)
        assert mixer is not None
        cache = mixer.cache
        expected = _recount(text, kind, decay, bigram, window)
        assert cache.weights == pytest.approx(expected, rel=1e-9, abs=1e-12)
        assert cache.total == pytest.approx(sum(expected.values()), rel=1e-9)
        ranked = list(cache.by_weight())
        assert [c for _, c in ranked] == sorted((c for _, c in ranked), reverse=True)
        assert {w for w, _ in ranked} == set(expected)
        if decay == 1.0:  # integer counts: equal weights, the word seen last first
            assert [w for w, _ in ranked] == [w for w, _ in sorted_by_weight(expected)]
        for match in (Matcher("t", True), Matcher("L", False), Matcher("", True)):
            matched = {w: c for w, c in expected.items() if match.matches(w)}
            assert dict(cache.matching(match)) == pytest.approx(matched, rel=1e-9, abs=1e-12)
            blocked = Filters(frozenset({"lord", "thee"}))
            mass = sum(c for w, c in matched.items() if blocked.allows(w))
            assert cache.mass(match, blocked) == pytest.approx(mass, rel=1e-9, abs=1e-12)


def sorted_by_weight(weights: dict[str, float]) -> list[tuple[str, float]]:
    return sorted(weights.items(), key=lambda item: -item[1])
