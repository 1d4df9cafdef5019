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

A typing session keeps its text's counts (server/word_counts.py) and updates them with the
words an event appends, instead of counting the whole window again at every separator.
"""

from __future__ import annotations

import bisect
import functools
import heapq
import math
import operator
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from server.text import TextCodec
from server.word_counts import CACHE_CHARS, WordCounts
from server.words import Filters, Matcher, Word, top_ids

__all__ = ["CACHE_CHARS", "Mixer", "WordCache", "WordCacheSettings", "piece_known", "vocab_known"]

_MAX_CHAR = "\U0010ffff"


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
        word_cache, None when unset). `previous` (the session's cache for its last text) is
        reused when it is of the same text (a keystroke that only extends the partial word),
        and updated with the words appended when `text` extends it (a separator, a tap)."""
        if not (self.default if asked is None else asked):
            return None
        if previous is not None and previous.text == text:
            return Mixer(previous, self.weight)
        counts = None
        if previous is not None and (previous.counts.kind, previous.counts.decay) == (
            kind,
            self.decay,
        ):
            counts = previous.counts.follow(text)  # updated in place: `previous` is replaced
        if counts is None:
            counts = WordCounts.of(text, kind, self.decay)
        return Mixer(WordCache.of_counts(counts, self.bigram), self.weight)


@dataclass(frozen=True)
class WordCache:
    """The word cache of one text: each counted word's weight (see the module doc), summing to
    `total` (1 with a bigram share).

    A view of the text's `WordCounts` at that text, valid until they follow a longer one: a
    word's weight is its scaled count times `scale`, plus its share of the words that
    followed the last word (`follows`)."""

    text: str
    counts: WordCounts
    total: float
    scale: float
    follows: dict[str, float]

    @staticmethod
    def of(text: str, kind: str, decay: float, bigram: float = 0.0) -> WordCache:
        """The cache of `text`'s complete words (one still being typed at its end is left out).

        With `bigram`, a word's weight is (1 - bigram) times its share of the words plus
        `bigram` times its share of the words that followed the text's last word before."""
        return WordCache.of_counts(WordCounts.of(text, kind, decay), bigram)

    @staticmethod
    def of_counts(counts: WordCounts, bigram: float) -> WordCache:
        after = counts.after_last() if bigram else {}
        if not after:
            scale = counts.scale
            return WordCache(counts.text, counts, counts.total * scale, scale, {})
        follow = sum(after.values())
        follows = {w: bigram * c / follow for w, c in after.items()}
        return WordCache(counts.text, counts, 1.0, (1 - bigram) / counts.total, follows)

    def weight(self, word: str) -> float:
        """`word`'s weight (0 when it is not counted)."""
        scaled = self.counts.scaled.get(word)
        if scaled is None:
            return 0.0
        bonus = self.follows.get(word)
        return scaled * self.scale if bonus is None else scaled * self.scale + bonus

    @property
    def weights(self) -> dict[str, float]:
        """Every counted word's weight."""
        return {w: self.weight(w) for w in self.counts.scaled}

    def by_weight(self) -> Iterator[tuple[str, float]]:
        """Every counted word and its weight, the heaviest first (of equal weights, the one
        seen last first), computed as they are read."""
        scale, follows = self.scale, self.follows
        plain = (
            (c * scale, newest, w) for c, newest, w in self.counts.ranked() if w not in follows
        )
        if not follows:
            return ((w, -c) for c, _, w in plain)
        newest = self.counts.newest
        boosted = sorted((-self.weight(w), -newest[w], w) for w in follows)
        return ((w, -c) for c, _, w in heapq.merge(plain, boosted))

    def mass(
        self,
        match: Matcher,
        filters: Filters,
        matching: Iterable[tuple[str, float]] | None = None,
    ) -> float:
        """The weight of this cache's words that match, less the blocked ones (`matching`:
        `self.matching(match)` when the caller has made it already)."""
        if match.partial:
            entries = self.matching(match) if matching is None else matching
            return sum(c for w, c in entries if filters.allows(w))
        by_fold = self.counts.by_fold
        if len(filters.blocked) < len(by_fold):
            keys: Iterable[str] = filters.blocked
        else:
            keys = [k for k in by_fold if k in filters.blocked]
        blocked = sum(self.weight(w) for k in keys for w in by_fold.get(k, ()))
        return self.total - blocked

    def matching(self, match: Matcher) -> Iterable[tuple[str, float]]:
        """The cached words that match the partial word, the heaviest first."""
        if not match.partial:
            return self.by_weight()
        counts = self.counts
        if match.folding:
            lo = bisect.bisect_left(counts.folded, (match.key,))
            hi = bisect.bisect_left(counts.folded, (match.key + _MAX_CHAR,))
            words = [w for _, w in counts.folded[lo:hi]]
        else:
            lo = bisect.bisect_left(counts.exact, match.key)
            hi = bisect.bisect_left(counts.exact, match.key + _MAX_CHAR)
            words = counts.exact[lo:hi]
        # `weight`, inlined: every counted word has a scaled weight.
        scaled, scale, follows = counts.scaled, self.scale, self.follows
        if follows:
            weighed = [(w, scaled[w] * scale + follows.get(w, 0.0)) for w in words]
        else:
            weighed = [(w, scaled[w] * scale) for w in words]
        return sorted(weighed, key=_second, reverse=True)  # stable: ties keep their order


_second = operator.itemgetter(1)

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
        unproposed: float | None = None,
    ) -> tuple[list[Word], float | None]:
        """`words` (the model's candidates, log-probabilities under it) with the cache mixed in,
        and `total` (the log of the model's mass of the matching words, when known) mixed too.

        Cached words that match and are not among `words` are added (with `known`'s model
        probability, else none), heaviest first, until no lighter one could rank in the top
        2k (twice k: words shown alike are merged into one suggestion). `unproposed`: the log
        of a bound on the model's probability of any word not in `words`, when the caller has
        a tighter one than the 2k-th of `words` (`with_cached_top`).
        """
        words = list(words)
        cache = self.cache
        lam, n = self.weight, cache.total
        if not n:
            return words, total
        keep, mixed = math.log1p(-lam), {}
        weight, checked = cache.weight, bool(match.partial or filters.blocked)
        for w in words:
            text = w.text
            if checked and not (match.matches(text) and filters.allows(text)):
                continue
            c = weight(text)  # most candidates are not in the cache: `_mixed` of 0, inlined
            logprob = w.logprob + keep if c <= 0 else _mixed(w.logprob, keep, lam * c / n)
            mixed[text] = Word(text, logprob, w.ids)
        # A word the model did not propose has at most the 2k-th proposal's probability (a
        # word model's proposals are its top 2k; a search's words are all it found).
        if total is None:
            floor = 0.0
        else:
            bound = _bar(words, 2 * k) if unproposed is None else unproposed
            floor = math.exp(bound + keep)
        top = sorted((w.logprob for w in mixed.values()), reverse=True)[: 2 * k]
        heapq.heapify(top)  # the 2k highest log-probabilities, the lowest first
        bar = math.exp(top[0]) if len(top) >= 2 * k else 0.0
        share = lam / n
        entries = cache.matching(match)  # a list once a letter is typed, else read lazily
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
            # Once a letter is typed, `entries` is a list: summed again, not made again.
            mass = cache.mass(match, filters, entries if match.partial else None)
            total = _mixed(total, keep, lam * mass / n)
        return list(mixed.values()), total


def _mixed(logprob: float, keep: float, cached: float) -> float:
    """log((1 - weight) * exp(logprob) + cached), with keep = log(1 - weight)."""
    model = logprob + keep
    if cached <= 0:
        return model
    return float(math.log(cached) + math.log1p(math.exp(model - math.log(cached))))


def _bar(words: Iterable[Word], n: int) -> float:
    """The n-th highest log-probability among `words` (-inf when fewer)."""
    top = sorted((w.logprob for w in words), reverse=True)
    return top[n - 1] if len(top) >= n else -math.inf


def with_cached_top(
    codec: TextCodec, logprobs: np.ndarray, words: list[Word], cache: WordCache, filters: Filters
) -> tuple[list[Word], float]:
    """A word model's proposals at a word start (`words`, its likeliest tokens) with the cached
    words `filters` allow among twice as many of its likeliest tokens added (the proposals'
    own bars are unchanged: every word added is less likely), and the log of the last of those
    tokens' probability: a bound on every other word's, below the proposals' last, so that
    `Mixer.mix` stops walking the cache after a few words (bounded by the last proposal, it
    walked 40 on average at a word start, and the whole cache in one of seven). Twice: on the
    held-out text's 120 lines, 1,169 Python calls an event against 1,266 with 4 times and
    1,271 with 1.25 times as many tokens as proposals (1,767 before)."""
    top = top_ids(logprobs, 2 * len(words))
    scores = logprobs[top]
    have = {w.text for w in words}
    counted, texts, special = cache.counts.scaled, codec.token_texts, codec.special_ids
    added = [
        Word(texts[i], float(score), (i,))
        for i, score in zip(top.tolist(), scores.tolist(), strict=True)
        if texts[i] in counted
        and texts[i] not in have
        and i not in special
        and filters.allows(texts[i])
    ]
    return words + added, float(scores.min())


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
