"""The decayed counts of a text's words, kept up to date as the text grows (the word cache's
memory, server/word_cache.py).

The counted words are the complete words of the text's last CACHE_CHARS characters: a word
still being typed at the end is left out, and so is the window's first word once the text is
longer than the window (perhaps cut). The newest counts 1 and each older one `decay` times the
one after it. A typing session's text grows by a word or two an event, so `WordCounts.follow`
counts only what was appended and forgets the words that left the window, instead of counting
the whole window again (up to 1.5 ms an event at 8,192 characters).

Each occurrence is stored scaled, `decay ** -index` (the index of the word in the text), so
that appending a word does not rescale the others: a weight is its scaled sum times
`decay ** newest`. Consecutive pairs are counted the same way, for the words that followed
the last word before (the bigram share).
"""

from __future__ import annotations

import bisect
import itertools
import math
import re
from collections import Counter, deque
from collections.abc import Iterator

from server.words import fold

# A word in the text, as the suggestions are made of: a word model's tokenizer splits off every
# character but letters, digits and underscores; the word search of character and BPE models
# keeps apostrophes inside words (server/words.py `is_word`).
WORDS = {
    "word": re.compile(r"\w+"),
    "char": re.compile(r"(?:[^\W_]|['\u2019])+"),
    "bpe": re.compile(r"(?:[^\W_]|['\u2019])+"),
}
# The words of the text's last this many characters are counted (a longer context costs no
# more; at the tuned decay, a word this far back counts for nothing).
CACHE_CHARS = 8192
# The scaled weights are rescaled (the newest word's to 1) when the newest would be above e to
# this power (far from overflowing a float).
_RESCALE_LOG = 300.0


class WordCounts:
    """The counted words of one text (see the module doc), updated as it is appended to."""

    def __init__(self, kind: str, decay: float) -> None:
        self.kind, self.decay = kind, decay
        self._pattern = WORDS.get(kind, WORDS["word"])
        self.text = ""
        self._ends: deque[int] = deque()  # where the complete words in the window end
        self._scan = 0  # where the next scan starts: a word still being typed, else the end
        self._next = 0  # the index the next complete word gets
        self._words: deque[str] = deque()  # the counted words, the oldest first
        self._first = 0  # the index of the oldest counted word
        self._base = 0  # scaled weights are decay ** (base - index)
        self.scaled: dict[str, float] = {}  # each counted word's scaled weight
        self.total = 0.0  # their sum
        self._count: dict[str, int] = {}
        self.newest: dict[str, int] = {}  # each word's newest index
        self.pairs: dict[str, dict[str, float]] = {}  # previous word -> word -> scaled weight
        self._pair_count: dict[tuple[str, str], int] = {}
        # Indexes of the counted words, each made when first read (a PredictNext reads one,
        # a session most), then kept as words come and go:
        self._ranked: list[tuple[float, int, str]] | None = None  # (-scaled, -newest, word)
        self._exact: list[str] | None = None  # the words, sorted
        self._folded: list[tuple[str, str]] | None = None  # (folded, word), sorted
        self._by_fold: dict[str, set[str]] | None = None  # folded -> words

    @staticmethod
    def of(text: str, kind: str, decay: float) -> WordCounts:
        """The counts of `text`, counted anew (in one pass, its words ranked and indexed once)."""
        counts = WordCounts(kind, decay)
        counts._scan = max(0, len(text) - CACHE_CHARS)
        new = counts._scan_words(text)
        counts._first = counts._window_start()
        counts._count_all(new[counts._first :])
        return counts

    def follow(self, text: str) -> WordCounts:
        """The counts of `text`: these, updated, when `text` extends the counted text by at
        most the window; else counted anew."""
        if text == self.text:
            return self
        if text.startswith(self.text) and len(text) - len(self.text) <= CACHE_CHARS:
            self._append(text)
            return self
        return WordCounts.of(text, self.kind, self.decay)

    # ---- the weights -----------------------------------------------------------------------

    @property
    def scale(self) -> float:
        """What a scaled weight is multiplied by: decay ** (newest index - base)."""
        return self.decay ** (self._first + len(self._words) - 1 - self._base)

    @property
    def last(self) -> str:
        """The newest counted word ("" when none)."""
        return self._words[-1] if self._words else ""

    def after_last(self) -> dict[str, float]:
        """The scaled weights of the words that followed the newest word before (the newest
        word's own occurrence left out)."""
        if len(self._words) < 2:
            return {}
        last = self._words[-1]
        after = dict(self.pairs.get(last, {}))
        if self._words[-2] == last:  # the newest pair is (last, last): not a follower
            if self._pair_count[(last, last)] == 1:
                del after[last]
            else:
                after[last] -= self._unit(self._first + len(self._words) - 1)
        return after

    def ranked(self) -> Iterator[tuple[float, int, str]]:
        """(-scaled weight, -newest index, word) of every counted word, the heaviest first
        (of equal weights, the one seen last first)."""
        if self._ranked is None:
            self._ranked = sorted((-c, -self.newest[w], w) for w, c in self.scaled.items())
        return iter(self._ranked)

    @property
    def exact(self) -> list[str]:
        """The counted words, sorted."""
        if self._exact is None:
            self._exact = sorted(self.scaled)
        return self._exact

    @property
    def folded(self) -> list[tuple[str, str]]:
        """(folded, word) of every counted word, sorted."""
        if self._folded is None:
            self._folded = sorted((fold(w), w) for w in self.scaled)
        return self._folded

    @property
    def by_fold(self) -> dict[str, set[str]]:
        """The counted words by their folded text."""
        if self._by_fold is None:
            self._by_fold = {}
            for w in self.scaled:
                self._by_fold.setdefault(fold(w), set()).add(w)
        return self._by_fold

    # ---- counting --------------------------------------------------------------------------

    def _append(self, text: str) -> None:
        """Count the words `text` adds after the counted text (which it extends)."""
        new = self._scan_words(text)
        if new and self._rescaled_at(self._next - 1) > _RESCALE_LOG:
            self._rescale(self._next - 1)
        for word in new:
            self._add(word)
        first = self._window_start()
        while self._words and self._first < first:
            self._remove()

    def _scan_words(self, text: str) -> list[str]:
        """The complete words `text` has after where the last scan stopped (`text` extends
        the text scanned), their runs noted; `text` becomes the counted text."""
        matches = list(self._pattern.finditer(text, self._scan))
        self.text, self._scan = text, len(text)
        if matches and matches[-1].end() == len(text):  # still being typed
            self._scan = matches.pop().start()
        self._ends.extend([m.end() for m in matches])
        self._next += len(matches)
        return [m.group() for m in matches]

    def _window_start(self) -> int:
        """The index of the oldest word to count: the runs that left the window forgotten,
        and the window's first one left out once the text is longer (perhaps cut)."""
        start = len(self.text) - CACHE_CHARS
        ends = self._ends
        while ends and ends[0] <= start:
            ends.popleft()
        return self._next - len(ends) + (start > 0) if ends else self._next

    def _count_all(self, words: list[str]) -> None:
        """Count `words` (the counted words, none counted yet), the newest first, each weight
        `decay` times the next's."""
        self._words = deque(words)
        self._base = self._first + len(words) - 1
        units = [1.0] * len(words)
        unit = 1.0
        for i in range(len(words) - 1, -1, -1):
            units[i] = unit
            self.scaled[words[i]] = self.scaled.get(words[i], 0.0) + unit
            unit *= self.decay
        self._count = dict(Counter(words))
        self.newest = {w: i for i, w in enumerate(words, self._first)}
        self._pair_count = dict(Counter(itertools.pairwise(words)))
        for before, word, unit in zip(words, words[1:], units[1:], strict=False):
            followers = self.pairs.setdefault(before, {})
            followers[word] = followers.get(word, 0.0) + unit
        self.total = sum(self.scaled.values())

    def _rescaled_at(self, index: int) -> float:
        return (index - self._base) * -math.log(self.decay) if self.decay < 1 else 0.0

    def _unit(self, index: int) -> float:
        return float(self.decay ** (self._base - index))

    def _add(self, word: str) -> None:
        index = self._first + len(self._words)
        unit = self._unit(index)
        if self._words:
            self._pair(self._words[-1], word, unit, 1)
        self._words.append(word)
        old = self.scaled.get(word)
        if old is None:
            self._index_word(word)
        else:
            self._unrank(word)
        self.scaled[word] = (old or 0.0) + unit
        self._count[word] = self._count.get(word, 0) + 1
        self.newest[word] = index
        self._rank(word)
        self.total += unit

    def _remove(self) -> None:
        """Forget the oldest counted word."""
        word = self._words.popleft()
        index = self._first
        self._first += 1
        unit = self._unit(index)
        if self._words:
            self._pair(word, self._words[0], self._unit(index + 1), -1)
        self._unrank(word)
        self._count[word] -= 1
        if self._count[word]:
            self.scaled[word] -= unit
            self._rank(word)
        else:
            del self._count[word], self.scaled[word], self.newest[word]
            self._unindex_word(word)
        self.total = self.total - unit if self._words else 0.0

    def _pair(self, before: str, word: str, unit: float, sign: int) -> None:
        key = (before, word)
        n = self._pair_count.get(key, 0) + sign
        followers = self.pairs.setdefault(before, {})
        if n:
            self._pair_count[key] = n
            followers[word] = followers.get(word, 0.0) + sign * unit
            return
        del self._pair_count[key], followers[word]
        if not followers:
            del self.pairs[before]

    def _rescale(self, base: int) -> None:
        """Make `base` the index whose scaled weight is 1 (the others rescaled alike): the
        newest word's, so that the words appended before the next rescale stay far from
        overflowing."""
        factor = self.decay ** (base - self._base)
        self._base = base
        self.scaled = {w: c * factor for w, c in self.scaled.items()}
        self.pairs = {b: {w: c * factor for w, c in f.items()} for b, f in self.pairs.items()}
        self.total = sum(self.scaled.values())
        self._ranked = None  # ranked again when read

    def _rank(self, word: str) -> None:
        if self._ranked is not None:
            bisect.insort(self._ranked, (-self.scaled[word], -self.newest[word], word))

    def _unrank(self, word: str) -> None:
        if self._ranked is not None:
            key = (-self.scaled[word], -self.newest[word], word)
            del self._ranked[bisect.bisect_left(self._ranked, key)]

    def _index_word(self, word: str) -> None:
        if self._exact is not None:
            bisect.insort(self._exact, word)
        if self._folded is not None:
            bisect.insort(self._folded, (fold(word), word))
        if self._by_fold is not None:
            self._by_fold.setdefault(fold(word), set()).add(word)

    def _unindex_word(self, word: str) -> None:
        if self._exact is not None:
            del self._exact[bisect.bisect_left(self._exact, word)]
        if self._folded is not None:
            del self._folded[bisect.bisect_left(self._folded, (fold(word), word))]
        if self._by_fold is not None:
            same = self._by_fold[fold(word)]
            same.discard(word)
            if not same:
                del self._by_fold[fold(word)]
