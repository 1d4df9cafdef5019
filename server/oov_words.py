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
import weakref
from dataclasses import dataclass

import numpy as np

from server.bundle import Bundle, unknown_word_counts
from server.text import TextCodec
from server.word_cache import KnownWord
from server.words import Filters, Matcher, Word, fold, logaddexp

# Highest code point: `prefix + _MAX_CHAR` sorts after every string that starts with `prefix`.
_MAX_CHAR = "\U0010ffff"


@dataclass(frozen=True)
class _Index:
    """The words' positions (in `UnknownWords` order: falling counts) sorted by their
    normalised text, with the running sum of their shares in that order."""

    keys: list[str]
    positions: np.ndarray
    running: np.ndarray  # running[i]: the shares of the first i words in key order

    @staticmethod
    def of(words: tuple[str, ...], shares: np.ndarray, folding: bool) -> _Index:
        keyed = sorted((fold(w) if folding else w, i) for i, w in enumerate(words))
        positions = np.array([i for _, i in keyed], dtype=np.int64)
        running = np.concatenate([[0.0], np.cumsum(shares[positions])])
        return _Index([k for k, _ in keyed], positions, running)

    def span(self, key: str) -> tuple[int, int]:
        """Where the words that start with `key` lie in key order."""
        lo = bisect.bisect_left(self.keys, key)
        return lo, bisect.bisect_left(self.keys, key + _MAX_CHAR)


@dataclass(frozen=True)
class UnknownWords:
    """A bundle's unknown words, the most frequent first, with their shares of `<unk>`."""

    words: tuple[str, ...]
    shares: np.ndarray  # count / unk_tokens, in the same order
    exact: _Index
    folded: _Index

    def _span(self, match: Matcher) -> tuple[_Index, int, int]:
        index = self.folded if match.folding else self.exact
        return (index, *index.span(match.key))

    def positions(self, match: Matcher) -> np.ndarray:
        """The positions of the words that match, the most frequent first."""
        if not match.partial:
            return np.arange(len(self.words))
        index, lo, hi = self._span(match)
        return np.sort(index.positions[lo:hi])

    def best(self, match: Matcher) -> float:
        """The log of the largest share among the words that match (-inf when none does)."""
        if not match.partial:
            return math.log(float(self.shares[0]))
        index, lo, hi = self._span(match)
        return math.log(float(self.shares[index.positions[lo:hi].min()])) if hi > lo else -math.inf

    def mass(self, match: Matcher, filters: Filters) -> float:
        """The log of the shares of the words that match and are not blocked."""
        index, lo, hi = self._span(match)
        total = float(index.running[hi] - index.running[lo])
        if filters.blocked and len(filters.blocked) < hi - lo:  # blocked words are folded
            listed = (w for b in filters.blocked for w in self._folded_to.get(b, ()))
            total -= sum(self.share(w) for w in listed if match.matches(w))
        elif filters.blocked:
            listed = (self.words[i] for i in index.positions[lo:hi].tolist())
            total -= sum(self.share(w) for w in listed if not filters.allows(w))
        return math.log(total) if total > 0 else -math.inf

    def candidates(self, match: Matcher, filters: Filters, extra: int) -> list[str]:
        """The `extra` most frequent words that match and are not blocked."""
        found: list[str] = []
        for i in self.positions(match).tolist():
            if len(found) == extra:
                break
            if filters.allows(self.words[i]):
                found.append(self.words[i])
        return found

    def share(self, word: str) -> float:
        """`word`'s share of `<unk>` (0 for a word not listed)."""
        at = self.position.get(word)
        return 0.0 if at is None else float(self.shares[at])

    @functools.cached_property
    def position(self) -> dict[str, int]:
        """Each word's position in `words`."""
        return {w: i for i, w in enumerate(self.words)}

    @functools.cached_property
    def _folded_to(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for w in self.words:
            out.setdefault(fold(w), []).append(w)
        return out


def of_bundle(bundle: Bundle, codec: TextCodec) -> UnknownWords | None:
    """The unknown words of a word model's bundle (None for other kinds, or without them),
    read once per bundle, for as long as it is loaded."""
    if codec.kind != "word" or codec.unk_id is None or not bundle.unknown_words:
        return None
    if bundle not in _READ:
        _READ[bundle] = read_unknown_words(bundle.unknown_words, bundle.unk_tokens)
    return _READ[bundle]


# Each loaded bundle's unknown words (weakly: a reload's replaced bundle goes with its words).
_READ: weakref.WeakKeyDictionary[Bundle, UnknownWords | None] = weakref.WeakKeyDictionary()


def read_unknown_words(text: str, unk_tokens: int) -> UnknownWords | None:
    """A bundle's unknown-words file (None when it lists none)."""
    counts = unknown_word_counts(text, unk_tokens, "unknown_words.txt")
    if not counts:
        return None
    counts.sort(key=lambda item: (-item[1], item[0]))
    words = tuple(w for w, _ in counts)
    shares = np.array([c / unk_tokens for _, c in counts], dtype=np.float64)
    return UnknownWords(
        words, shares, _Index.of(words, shares, False), _Index.of(words, shares, True)
    )


@dataclass(frozen=True)
class UnkAfter:
    """A bundle's unknown words after one context, where `<unk>` has `logprob`."""

    unknown: UnknownWords
    logprob: float

    def best(self, match: Matcher) -> float:
        """The log of the largest probability a listed word that matches gets through
        `<unk>` (-inf when none matches)."""
        return self.logprob + self.unknown.best(match)

    def lookup(self, known: KnownWord) -> KnownWord:
        """A word model's words by their text (`known`: its tokens' log-probs, -inf for a word
        outside its vocabulary), each with its share of `<unk>` added."""

        def lookup(text: str) -> Word:
            return self._plus_share(known(text))

        return lookup

    def add(
        self,
        words: list[Word],
        total: float,
        known: KnownWord,
        match: Matcher,
        filters: Filters,
        extra: int,
    ) -> tuple[list[Word], float]:
        """A word model's `extra` candidates (`words`; `total`, the log of the mass of its
        matching tokens, 0 when no letter is typed) with the unknown words: each candidate's
        share of `<unk>` added to it (a vocabulary word seen once in training), the unknown
        words that could rank among the `extra` added (looked up with `known`, this lookup),
        and once a letter is typed the mass of those that match added to `total` (before, it
        is part of `<unk>`'s, already in the model's whole mass)."""
        if match.partial:
            mass = self.unknown.mass(match, filters)
            total = logaddexp(total, self.logprob + mass)
        listed = self.unknown.position
        merged = {w.text: self._plus_share(w) if w.text in listed else w for w in words}
        bar = sorted((w.logprob for w in merged.values()), reverse=True)[:extra]
        if len(bar) < extra or self.logprob + self.unknown.best(match) > bar[-1]:
            for text in self.unknown.candidates(match, filters, extra):
                if text not in merged:
                    merged[text] = known(text)
        return list(merged.values()), total

    def _plus_share(self, word: Word) -> Word:
        """`word` with its share of `<unk>` added (unchanged for a word not listed)."""
        share = self.unknown.share(word.text)
        if share <= 0:
            return word
        logprob = logaddexp(word.logprob, self.logprob + math.log(share))
        return Word(word.text, logprob, word.ids)


def after(bundle: Bundle, codec: TextCodec, logprobs: np.ndarray) -> UnkAfter | None:
    """A word model's unknown words after a context whose next-token log-probs are `logprobs`
    (None for other kinds, or without them, or where `<unk>` has no probability)."""
    unknown = of_bundle(bundle, codec)
    if unknown is None or codec.unk_id is None:
        return None
    logprob = float(logprobs[codec.unk_id])
    return UnkAfter(unknown, logprob) if math.isfinite(logprob) else None
