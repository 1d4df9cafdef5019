"""The word cache: suggestions adapt to the words already in the user's text.

A keyboard learns the words its user types. Here the text is the context the keyboard sends
(the text before the cursor, its last CACHE_CHARS characters): its words, counted with a
recency decay, make a "cache language model" (Kuhn & De Mori, 1990), and a suggestion's
probability is the mixture

    p(w) = (1 - weight) * p_model(w | context) + weight * p_cache(w)

with p_cache(w) = (1 - bigram) * (decayed count of w) / (decayed count of every word)
                  + bigram * (decayed count of w after the last word) / (... of any word there),
conditioned on the partial word by keeping the words that match it (the server renormalises
over them). Cached words the model did not propose join the candidates: for a character or BPE
model the words its search did not reach, for a word model the vocabulary words below its top
candidates and the words it lacks (names the user typed, out of its vocabulary). The server's
`--no-word-cache`, or `word_cache: false` on a request, leaves the suggestions the model's.
"""

from __future__ import annotations

import bisect
import functools
import heapq
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from server.text import TextCodec
from server.words import Filters, Matcher, Word, fold

# A word in the text, as the suggestions are made of: a word model's tokenizer splits off every
# character but letters, digits and underscores; the word search of character and BPE models
# keeps apostrophes inside words (server/words.py `is_word`).
_WORDS = {
    "word": re.compile(r"\w+"),
    "char": re.compile(r"(?:[^\W_]|['\u2019])+"),
    "bpe": re.compile(r"(?:[^\W_]|['\u2019])+"),
}
_MAX_CHAR = "\U0010ffff"
# The cache holds the words of the context's last this many characters (a longer context costs
# no more; at the tuned decay, a word this far back counts for nothing).
CACHE_CHARS = 8192


@dataclass(frozen=True)
class WordCacheSettings:
    """The server's word-cache settings (flags of `rnnlm serve`)."""

    default: bool = True  # mixed in when a request does not say (--word-cache)
    # Tuned on the validation lines of Tiny Shakespeare (docs/typing.md, the word cache, measured).
    weight: float = 0.1  # the cache's share of the mixture (--word-cache-weight)
    decay: float = 0.98  # an occurrence counts decay**(words after it) (--word-cache-decay)
    bigram: float = 0.3  # the share of the words that followed the last word (--word-cache-bigram)

    def __post_init__(self) -> None:
        if not 0 < self.weight < 1:
            raise ValueError(f"word cache weight must be in (0, 1), not {self.weight}")
        if not 0 < self.decay <= 1:
            raise ValueError(f"word cache decay must be in (0, 1], not {self.decay}")
        if not 0 <= self.bigram < 1:
            raise ValueError(f"word cache bigram share must be in [0, 1), not {self.bigram}")

    def mixer(
        self, asked: bool | None, previous: WordCache | None, text: str, kind: str
    ) -> Mixer | None:
        """The word cache of `text` to mix in, or None when off (`asked`: the request's
        word_cache, None when unset). `previous` is reused when it is of the same text (a
        keystroke that only extends the partial word)."""
        if not (self.default if asked is None else asked):
            return None
        if previous is not None and previous.text == text:
            return Mixer(previous, self.weight)
        return Mixer(WordCache.of(text, kind, self.decay, self.bigram), self.weight)


@dataclass(frozen=True)
class WordCache:
    """The words of one text with their decayed counts (`weights`, summing to `total`)."""

    text: str
    weights: dict[str, float]
    total: float

    @staticmethod
    def of(text: str, kind: str, decay: float, bigram: float = 0.0) -> WordCache:
        """The cache of `text`'s complete words (one still being typed at its end is left out).

        With `bigram`, a word's weight is (1 - bigram) times its share of the words plus
        `bigram` times its share of the words that followed the text's last word before."""
        found = _WORDS.get(kind, _WORDS["word"]).findall(text[-CACHE_CHARS:])
        if found and text.endswith(found[-1]):
            found.pop()  # still being typed
        if len(text) > CACHE_CHARS and found:
            found.pop(0)  # perhaps cut
        weights: dict[str, float] = {}
        after: dict[str, float] = {}  # the words that followed the last one, weighted
        weight = 1.0
        last = found[-1] if found else ""
        for i in range(len(found) - 1, -1, -1):  # the newest first, its weight 1
            w = found[i]
            weights[w] = weights.get(w, 0.0) + weight
            if bigram and i and found[i - 1] == last and i < len(found) - 1:
                after[w] = after.get(w, 0.0) + weight
            weight *= decay
        total = sum(weights.values())
        if not after:
            return WordCache(text, weights, total)
        follow = sum(after.values())
        mixed = {
            w: (1 - bigram) * c / total + bigram * after.get(w, 0.0) / follow
            for w, c in weights.items()
        }
        return WordCache(text, mixed, 1.0)

    @functools.cached_property
    def by_weight(self) -> list[tuple[str, float]]:
        return sorted(self.weights.items(), key=lambda item: -item[1])

    def _index(self, folding: bool) -> tuple[list[str], list[str]]:
        norm = fold if folding else _same
        keyed = sorted((norm(w), w) for w in self.weights)
        return [k for k, _ in keyed], [w for _, w in keyed]

    @functools.cached_property
    def _exact(self) -> tuple[list[str], list[str]]:
        return self._index(False)

    @functools.cached_property
    def _folded(self) -> tuple[list[str], list[str]]:
        return self._index(True)

    @functools.cached_property
    def _folded_weights(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for w, c in self.weights.items():
            out[fold(w)] = out.get(fold(w), 0.0) + c
        return out

    def mass(self, entries: list[tuple[str, float]], match: Matcher, filters: Filters) -> float:
        """The weight of `entries` (this cache's words that match) less the blocked ones."""
        if match.partial:
            return sum(c for w, c in entries if filters.allows(w))
        folded = self._folded_weights
        if len(filters.blocked) < len(folded):
            return self.total - sum(folded.get(b, 0.0) for b in filters.blocked)
        return self.total - sum(c for w, c in folded.items() if w in filters.blocked)

    def matching(self, match: Matcher) -> list[tuple[str, float]]:
        """The cached words that match the partial word, the heaviest first."""
        if not match.partial:
            return self.by_weight
        keys, words = self._folded if match.folding else self._exact
        lo = bisect.bisect_left(keys, match.key)
        hi = bisect.bisect_left(keys, match.key + _MAX_CHAR)
        return sorted(((w, self.weights[w]) for w in words[lo:hi]), key=lambda item: -item[1])


def _same(text: str) -> str:
    return text


# A cached word the model did not propose, with its log-probability under the model (a word
# model's vocabulary word below its top candidates; -inf for a word the model lacks, or one a
# search did not reach) and its pieces.
KnownWord = Callable[[str], Word]


@dataclass(frozen=True)
class Mixer:
    """The word cache of a context with the server's settings, mixed into one reply's words."""

    cache: WordCache
    weight: float

    def mix(
        self,
        words: Iterable[Word],
        total: float | None,
        match: Matcher,
        filters: Filters,
        k: int,
        known: KnownWord,
    ) -> tuple[list[Word], float | None]:
        """`words` (the model's candidates, log-probabilities under it) with the cache mixed in,
        and `total` (the log of the model's mass of the matching words, when known) mixed too.

        Cached words that match and are not among `words` are added (with `known`'s model
        probability, else none), heaviest first, until no lighter one could rank in the top
        2k (twice k: words shown alike are merged into one suggestion)."""
        words = list(words)
        lam, n = self.weight, self.cache.total
        if not n:
            return words, total
        keep, mixed = math.log1p(-lam), {}
        for w in words:
            if match.matches(w.text) and filters.allows(w.text):
                c = self.cache.weights.get(w.text, 0.0)
                mixed[w.text] = Word(w.text, _mixed(w.logprob, keep, lam * c / n), w.ids)
        # A word the model did not propose has at most the 2k-th proposal's probability (a
        # word model's proposals are its top 2k; a search's words are all it found).
        floor = math.exp(_bar(words, 2 * k) + keep) if total is not None else 0.0
        top = heapq.nlargest(2 * k, (w.logprob for w in mixed.values()))
        heapq.heapify(top)  # the 2k highest log-probabilities, the lowest first
        bar = math.exp(top[0]) if len(top) >= 2 * k else 0.0
        share = lam / n
        entries = self.cache.matching(match)
        for text, c in entries:
            if share * c + floor < bar:
                break  # lighter words rank lower still
            if text in mixed or not filters.allows(text):
                continue
            model = known(text)
            word = Word(text, _mixed(model.logprob, keep, share * c), model.ids)
            mixed[text] = word
            if len(top) < 2 * k:
                heapq.heappush(top, word.logprob)
            else:
                heapq.heappushpop(top, word.logprob)
            bar = math.exp(top[0]) if len(top) >= 2 * k else 0.0
        if total is not None:
            total = _mixed(total, keep, lam * self.cache.mass(entries, match, filters) / n)
        return list(mixed.values()), total


def _mixed(logprob: float, keep: float, cached: float) -> float:
    """log((1 - weight) * exp(logprob) + cached), with keep = log(1 - weight)."""
    model = logprob + keep
    if cached <= 0:
        return model
    return float(math.log(cached) + math.log1p(math.exp(model - math.log(cached))))


def _bar(words: Iterable[Word], n: int) -> float:
    """The n-th highest log-probability among `words` (-inf when fewer)."""
    top = heapq.nlargest(n, (w.logprob for w in words))
    return top[-1] if len(top) >= n else -math.inf


def vocab_known(codec: TextCodec, logprobs: np.ndarray) -> KnownWord:
    """A word model's words by their text, with their log-probabilities in `logprobs`."""
    index = _vocab_index(codec)

    def known(text: str) -> Word:
        i = index.get(text)
        return Word(text, -math.inf, ()) if i is None else Word(text, float(logprobs[i]), (i,))

    return known


def piece_known(codec: TextCodec, after_space: bool) -> KnownWord:
    """A searched model's words by their text, spelled in its pieces, the model's probability
    unknown (-inf: the search did not reach them)."""
    space = " " if after_space else ""

    def known(text: str) -> Word:
        ids = codec.tokenizer.encode(space + text, add_special_tokens=False).ids
        return Word(text, -math.inf, tuple(ids))

    return known


@functools.lru_cache(maxsize=32)
def _vocab_index(codec: TextCodec) -> dict[str, int]:
    """A word model's ordinary tokens by their text."""
    return {
        text.strip(): i
        for i, text in enumerate(codec.token_texts)
        if i not in codec.special_ids and text.strip()
    }
