"""The words that save a typist the most keys (server/fewest_keys.py), against the typist
itself: the keys it expects to spend on small random vocabularies, choice by choice."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Sequence

import pytest

from server.fewest_keys import fewest_keys

Shown = Callable[[str], set[str]]


def _keys(word: str, shown: Shown, start: int = 0) -> int:
    """The keys a typist spends on `word` (its separator included) from its first `start`
    letters typed, when `shown(prefix)` is what the keyboard shows after typing `prefix`: a
    tap once shown, else the next letter."""
    for typed in range(start, len(word)):
        if word in shown(word[:typed]):
            return typed - start + 1
    return len(word) - start + 1


def _expected(probs: dict[str, float], shown: Shown, start: int = 0) -> float:
    return sum(p * _keys(w, shown, start) for w, p in probs.items())


def _planned(probs: dict[str, float], k: int) -> Shown:
    """What the server shows: `fewest_keys` over the words that match, at every keystroke."""

    def shown(prefix: str) -> set[str]:
        words = [(w, p) for w, p in probs.items() if w.startswith(prefix)]
        return {words[i][0] for i in fewest_keys(words, len(prefix), k)}

    return shown


def _likeliest(probs: dict[str, float], k: int) -> Shown:
    def shown(prefix: str) -> set[str]:
        words = sorted((w for w in probs if w.startswith(prefix)), key=lambda w: -probs[w])
        return set(words[:k])

    return shown


def test_a_word_the_next_letter_shows_gives_its_slot_to_one_it_would_not() -> None:
    # "xylophone" is alone after "x"; "then" stays hidden behind "the" for letters.
    probs = {"xylophone": 0.5, "the": 0.3, "then": 0.2}
    shown = _planned(probs, 1)
    assert shown("") == {"the"} and _likeliest(probs, 1)("") == {"xylophone"}
    assert shown("t") == {"then"}  # "the" is typed in full from here: its separator ends it
    assert _expected(probs, shown) == pytest.approx(1.7)
    # The likeliest also shows "the" after "the", so "then" is typed in full.
    assert _expected(probs, _likeliest(probs, 1)) == pytest.approx(2.1)


def _random_words(seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    words = {"".join(rng.choice("abc") for _ in range(rng.randint(1, 4))) for _ in range(7)}
    weights = {w: rng.random() ** 3 + 0.01 for w in sorted(words)}
    total = sum(weights.values())
    return {w: p / total for w, p in weights.items()}


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("seed", range(20))
def test_each_partial_word_shows_what_saves_most_below_it(k: int, seed: int) -> None:
    """At every partial word, with what the longer ones show fixed, no other k words give
    fewer expected keys to the words that start with it (tried: every choice of k)."""
    probs = _random_words(seed)
    planned = _planned(probs, k)
    for prefix in sorted({w[:i] for w in probs for i in range(len(w))}):
        below = {w: p for w, p in probs.items() if w.startswith(prefix)}
        rivals = [w for w in below if w != prefix]
        best = _expected(below, planned, len(prefix))
        for other in itertools.combinations(rivals, min(k, len(rivals))):

            def instead(typed: str, at: str = prefix, other: Sequence[str] = other) -> set[str]:
                return set(other) if typed == at else planned(typed)

            assert best <= _expected(below, instead, len(prefix)) + 1e-12, (prefix, other)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("seed", range(20))
def test_fewer_keys_than_the_likeliest(k: int, seed: int) -> None:
    probs = _random_words(seed)
    assert _expected(probs, _planned(probs, k)) <= _expected(probs, _likeliest(probs, k)) + 1e-12


def test_as_many_as_there_are_words_past_the_letters_typed() -> None:
    words = [("lord", 0.5), ("lo", 0.3), ("love", 0.2)]
    assert sorted(fewest_keys(words, 2, 3)) == [0, 2]  # "lo" is typed: no slot gains it
    assert fewest_keys([], 0, 3) == []
