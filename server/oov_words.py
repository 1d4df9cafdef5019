"""A word model's words outside its vocabulary, suggested through its `<unk>` token.

A word model gives every word outside its vocabulary one token, `<unk>`. A bundle may list the
words its model saw as `<unk>` in training, with their counts (`unknown_words.txt`, written by
`rnnlm export --unknown-words`), and how many `<unk>` tokens the model learned from
(`unk_tokens`: those words' occurrences and, with `--unk-replace`, the words seen once). Such a
word's probability is then

    P(w | context) = P(<unk> | context) * count(w) / unk_tokens

its share of `<unk>` in training (maximum likelihood); the rest of `<unk>`'s mass stays with
the words the training text never had. These words join the vocabulary's candidates and are
matched, blocked, boosted and shown as those are (with no token of their own: `token_id` -1).
"""

from __future__ import annotations

import bisect
import functools
import math
from dataclasses import dataclass

import numpy as np

from server.bundle import Bundle, unknown_word_counts
from server.text import TextCodec
from server.word_cache import KnownWord
from server.words import Filters, Matcher, Word, fold

# Highest code point: `prefix + _MAX_CHAR` sorts after every string that starts with `prefix`.
_MAX_CHAR = "\U0010ffff"


@dataclass(frozen=True)
class _Index:
    """The words' positions (in `UnknownWords` order) sorted by their normalised text."""

    keys: list[str]
    positions: np.ndarray

    @staticmethod
    def of(words: tuple[str, ...], folding: bool) -> _Index:
        keyed = sorted((fold(w) if folding else w, i) for i, w in enumerate(words))
        return _Index([k for k, _ in keyed], np.array([i for _, i in keyed], dtype=np.int64))

    def matching(self, key: str) -> np.ndarray:
        lo = bisect.bisect_left(self.keys, key)
        hi = bisect.bisect_left(self.keys, key + _MAX_CHAR)
        return self.positions[lo:hi]


@dataclass(frozen=True)
class UnknownWords:
    """A bundle's unknown words, the most frequent first, with log(count / unk_tokens)."""

    words: tuple[str, ...]
    shares: np.ndarray  # count / unk_tokens, in the same order
    exact: _Index
    folded: _Index

    def positions(self, match: Matcher) -> np.ndarray:
        """The positions of the words that match, in no order."""
        if not match.partial:
            return np.arange(len(self.words))
        return (self.folded if match.folding else self.exact).matching(match.key)

    def share(self, word: str) -> float:
        """`word`'s share of `<unk>` (0 for a word not listed)."""
        at = self._position.get(word)
        return 0.0 if at is None else float(self.shares[at])

    @functools.cached_property
    def _position(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.words)}


def of_bundle(bundle: Bundle, codec: TextCodec) -> UnknownWords | None:
    """The unknown words of a word model's bundle (None for other kinds, or without them)."""
    if codec.kind != "word" or codec.unk_id is None or not bundle.unknown_words:
        return None
    return read_unknown_words(bundle.unknown_words, bundle.unk_tokens)


@functools.lru_cache(maxsize=8)
def read_unknown_words(text: str, unk_tokens: int) -> UnknownWords | None:
    """A bundle's unknown-words file (None when it lists none; cached: one per bundle)."""
    counts = unknown_word_counts(text, unk_tokens, "unknown_words.txt")
    if not counts:
        return None
    counts.sort(key=lambda item: (-item[1], item[0]))
    words = tuple(w for w, _ in counts)
    shares = np.array([c / unk_tokens for _, c in counts], dtype=np.float64)
    return UnknownWords(words, shares, _Index.of(words, False), _Index.of(words, True))


def unknown_candidates(
    unknown: UnknownWords,
    unk_logprob: float,
    match: Matcher,
    filters: Filters,
    extra: int,
) -> tuple[list[Word], float]:
    """The `extra` likeliest unknown words that match and are not blocked, with their
    log-probabilities after a context where `<unk>` has `unk_logprob`; and the log of the
    mass of all that match once a letter is typed (-inf when none does; before, 0: that mass
    is part of `<unk>`'s)."""
    if not math.isfinite(unk_logprob):
        return [], -math.inf if match.partial else 0.0
    if match.partial:
        at = np.sort(unknown.positions(match))  # the list is in falling counts
        if filters.blocked:
            at = at[[filters.allows(unknown.words[i]) for i in at.tolist()]]
        mass = unk_logprob + math.log(float(unknown.shares[at].sum())) if at.size else -math.inf
        top = at[:extra].tolist()
    else:
        top, mass = [], 0.0
        for i, w in enumerate(unknown.words):
            if len(top) == extra:
                break
            if filters.allows(w):
                top.append(i)
    words = [
        Word(unknown.words[i], unk_logprob + math.log(float(unknown.shares[i])), ()) for i in top
    ]
    return words, mass


def with_unknown(
    words: list[Word],
    total: float,
    unknown: UnknownWords | None,
    unk_logprob: float,
    match: Matcher,
    filters: Filters,
    extra: int,
) -> tuple[list[Word], float]:
    """A word model's candidates (`words`, and `total`, the log of the mass of its matching
    tokens, 0 when no letter is typed) with the unknown words that match added, and their
    mass added to `total` once a letter is typed (before, it is part of `<unk>`'s, already in
    the model's whole mass)."""
    if unknown is None:
        return words, total
    found, mass = unknown_candidates(unknown, unk_logprob, match, filters, extra)
    if match.partial:
        total = float(np.logaddexp(total, mass))
    merged = {w.text: w for w in words}
    for w in found:  # a vocabulary word seen once in training is also some of <unk>'s mass
        old = merged.get(w.text)
        logprob = w.logprob if old is None else float(np.logaddexp(old.logprob, w.logprob))
        merged[w.text] = Word(w.text, logprob, old.ids if old is not None else ())
    return list(merged.values()), total


def unknown_known(known: KnownWord, unknown: UnknownWords | None, unk_logprob: float) -> KnownWord:
    """The word cache's lookup of a word model's words (`known`: -inf for a word outside the
    vocabulary), with the unknown words' probabilities through `<unk>`."""
    if unknown is None:
        return known

    def lookup(text: str) -> Word:
        word = known(text)
        share = unknown.share(text)
        if share <= 0:
            return word
        logprob = float(np.logaddexp(word.logprob, unk_logprob + math.log(share)))
        return Word(text, logprob, word.ids)

    return lookup
