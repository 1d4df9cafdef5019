"""The word cache (server/word_cache.py) on a real server with tiny models of every tokenizer
kind: a word typed earlier in the context is suggested after its first letter, also a word the
model lacks; the mixture is the documented one; turning it off gives the model's suggestions
exactly."""

from __future__ import annotations

import math
import random
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
import pytest
from test_server import LiveServer, config

from rnnlm.client import Client
from rnnlm.v1 import language_model_pb2 as pb
from server import word_counts
from server.text import TextCodec
from server.word_cache import WordCache, WordCacheSettings, vocab_known, with_cached_top
from server.word_counts import WORDS
from server.words import Filters, Matcher, WordSettings, choose, vocab_words

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


@dataclass(frozen=True, eq=False)
class _Vocabulary:
    """What the word-model helpers read of a codec: a vocabulary of 2,000 words."""

    token_texts: tuple[str, ...] = ("<unk>", "<eos>", *(f"w{i}" for i in range(2000)))
    special_ids: frozenset[int] = frozenset({0, 1})
    special_id_array: np.ndarray = field(default_factory=lambda: np.array([0, 1]))

    @property
    def vocab_size(self) -> int:
        return len(self.token_texts)


def test_a_word_start_bounded_by_the_cached_top_suggests_what_the_whole_cache_does() -> None:
    """`with_cached_top` ends the walk over the cache sooner; the suggestions are those of the
    walk bounded by the last proposal, and of the mixture over every word (a flat model, so
    that cached words far down its ranking reach the top)."""
    vocab = _Vocabulary()
    codec = cast(TextCodec, vocab)
    match, filters, k, weight = Matcher("", False), Filters(), 8, 0.3
    settings = WordCacheSettings(weight=weight, decay=1.0, bigram=0.0)
    walked_in_all = bounded_in_all = 0
    for seed in range(8):
        rng = np.random.default_rng(seed)
        scores = rng.normal(0, 0.5, vocab.vocab_size)
        logprobs = (scores - np.log(np.exp(scores).sum())).astype(np.float32)
        # Frequent and rare words, so that the cache holds words the model ranks anywhere.
        text = " ".join(f"w{i}" for i in rng.zipf(1.3, 400) % 2000) + " "
        mixer = settings.mixer(True, None, text, "word")
        assert mixer is not None
        words, total = vocab_words(codec, logprobs, match, filters, 2 * k)
        known = vocab_known(codec, logprobs)
        walked, _ = mixer.mix(words, total, match, filters, k, known)
        more, bound = with_cached_top(codec, logprobs, words, mixer.cache, filters)
        bounded, _ = mixer.mix(more, total, match, filters, k, known, bound)
        chosen = choose(bounded, k, match, filters, WordSettings(), total)
        assert chosen == choose(walked, k, match, filters, WordSettings(), total)
        n = mixer.cache.total
        mixture = {
            w: (1 - weight) * math.exp(float(logprobs[i])) + weight * mixer.cache.weight(w) / n
            for i, w in enumerate(vocab.token_texts)
            if i not in vocab.special_ids
        }
        best = sorted(mixture, key=lambda w: -mixture[w])[:k]
        assert [s.text for s in chosen] == best
        expected = [mixture[w] for w in best]
        assert [s.probability for s in chosen] == pytest.approx(expected, rel=1e-5)
        walked_in_all, bounded_in_all = walked_in_all + len(walked), bounded_in_all + len(bounded)
    assert bounded_in_all < walked_in_all


@pytest.mark.parametrize(
    ("top", "cached", "junk"),
    [
        (20, 16, 10),  # a cliff after the 20th: the 17th is what `with_cached_top` adds
        (40, 34, 40),  # flat to the 40th: the 35th is reached under the 32nd's bound
    ],
)
def test_a_cached_word_below_the_proposals_is_not_missed(top: int, cached: int, junk: int) -> None:
    """A word model's top tokens almost flat, the rest all but ruled out: one token below its
    16 proposals, cached once, outranks them all in the mixture, behind heavier cached junk.
    A walk over the cache that bounded unproposed words too low (or skipped the tokens just
    below the proposals) would stop at the junk and miss it."""
    vocab = _Vocabulary()
    codec = cast(TextCodec, vocab)
    probs = np.full(vocab.vocab_size, 0.1 / (vocab.vocab_size - 2 - top))
    probs[:2] = 1e-12  # <unk> and <eos>
    probs[2 : 2 + top] = 0.9 / top - 1e-6 * np.arange(top)  # w0, w1, ...
    logprobs = np.log(probs / probs.sum()).astype(np.float32)
    heavier = [f"w{i}" for i in range(1000, 1000 + junk)]
    text = " ".join(heavier * 3 + [f"w{cached}"]) + " "
    mixer = WordCacheSettings(weight=0.3, decay=1.0, bigram=0.0).mixer(True, None, text, "word")
    assert mixer is not None
    match, filters, k = Matcher("", False), Filters(), 8
    words, total = vocab_words(codec, logprobs, match, filters, 2 * k)
    assert f"w{cached}" not in {w.text for w in words}
    more, bound = with_cached_top(codec, logprobs, words, mixer.cache, filters)
    mixed, _ = mixer.mix(more, total, match, filters, k, vocab_known(codec, logprobs), bound)
    chosen = choose(mixed, k, match, filters, WordSettings(), total)
    assert [s.text for s in chosen] == [f"w{cached}", *(f"w{i}" for i in range(7))]
