"""Next words for every tokenizer kind: matching, the blocklist, user words, and choosing what
is shown.

Word models predict words directly (one token each): `vocab_words` takes a row of next-token
log-probs to the words that match. Character and BPE models predict pieces of words: their
words come from the word search (server/word_search.py). Either way `choose` picks the k shown.

A word is made of word characters: letters, digits and apostrophes. Everything else (spaces,
punctuation, end of line) is a boundary. For BPE, a piece that starts with a space and then has
word characters only begins a word; a piece of word characters only continues one.

`partial_word` is matched exactly or ignoring case and accents (`fold`); a suggestion keeps the
letters the user typed ("Lo" -> "Lord"). Blocked words are compared folded, and removed before
top-k. User words that match are boosted (see `WordSettings`).
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from server.fewest_keys import fewest_keys
from server.sampling import native_top_k
from server.text import TextCodec

# How `partial_word` is matched when the request does not say: word models keep their exact
# (case-sensitive) matching; character and BPE models ignore case and accents.
FOLD_DEFAULT = {"word": False, "char": True, "bpe": True}
# Tokenizer kinds whose predictions come from the word search.
SEARCHED_KINDS = frozenset({"char", "bpe"})
_WORD_PUNCT = "'\u2019"
# Highest code point: `prefix + MAX_CHAR` sorts after every string that starts with `prefix`.
MAX_CHAR = "\U0010ffff"


@dataclass(frozen=True)
class WordSettings:
    """The server's word-prediction settings (flags of `rnnlm serve`)."""

    # Hypotheses kept per round of the search (--word-search-width). On the shipped character
    # model with its lexicon (250 held-out lines): 6 saved as many keys as 8 (0.401 and 0.400)
    # for 18 % fewer steps; 4 saved fewer (0.393 against 0.397 on 120 lines).
    width: int = 6
    depth: int = 16  # the most pieces a searched word has (--word-search-depth)
    budget_ms: float = 50.0  # a search stops after its round that passes this (--word-search-ms)
    # The fewest complete words (at least k) a search finds before it may stop. More leave more
    # to filter on later keystrokes but cost more steps: on the shipped character model, 12
    # instead of 3 asked for 47 % more contexts per keystroke and spared hardly any searches.
    keep: int = 3
    user_word_boost: float = 10.0  # a matching user word's probability is multiplied by this
    user_word_floor: float = 0.05  # ... after raising it to at least this (--user-word-floor)
    blocklist: frozenset[str] = frozenset()  # folded words never suggested (--blocklist)
    # A TypingSession event that does not say suggests the words that save the most keys
    # (--typing-selection fewest-keys) instead of the likeliest.
    typing_fewest_keys: bool = False

    def __post_init__(self) -> None:
        for name in ("width", "depth", "keep"):
            if getattr(self, name) < 1:
                raise ValueError(f"word search {name} must be >= 1, not {getattr(self, name)}")
        if not self.budget_ms > 0:
            raise ValueError(f"word search budget must be > 0 ms, not {self.budget_ms}")
        if not (self.user_word_boost >= 1 and math.isfinite(self.user_word_boost)):
            raise ValueError(f"user word boost must be >= 1, not {self.user_word_boost}")
        if not 0 < self.user_word_floor <= 1:
            raise ValueError(f"user word floor must be in (0, 1], not {self.user_word_floor}")


@functools.lru_cache(maxsize=1 << 16)
def fold(text: str) -> str:
    """`text` without case and accents: "Été" -> "ete" (cached: the same words recur)."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def logaddexp(a: float, b: float) -> float:
    """log(exp(a) + exp(b)) of two floats, as numpy's `logaddexp` computes it (numpy's costs
    about a microsecond a call on Python floats; this, a fifth of that)."""
    if a < b:
        a, b = b, a
    if b == -math.inf:
        return a
    return a + math.log1p(math.exp(b - a))


@functools.lru_cache(maxsize=1 << 16)
def is_word(text: str) -> bool:
    """Whether `text` is made of word characters only (and is not empty)."""
    return bool(text) and all(c.isalnum() or c in _WORD_PUNCT for c in text)


def read_word_list(text: str) -> frozenset[str]:
    """The folded words of a word list: one a line; blank lines and lines from '#' ignored."""
    words = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return frozenset(fold(w) for w in words if w)


# The value types made for every candidate of every keystroke are named tuples: as immutable as
# frozen dataclasses, and made in a third of the time (a frozen dataclass sets each field through
# `object.__setattr__`: about 1 us for three fields against 0.35).


class Word(NamedTuple):
    """A candidate next word as the model spells it, with its pieces' token ids."""

    text: str
    logprob: float
    ids: tuple[int, ...]


class Suggestion(NamedTuple):
    """A word as suggested: the text shown, its probability and its pieces."""

    text: str
    probability: float
    ids: tuple[int, ...]


@dataclass(frozen=True)
class Matcher:
    """Matching of words against the letters typed so far."""

    partial: str
    folding: bool

    @functools.cached_property
    def key(self) -> str:
        return self.norm(self.partial)

    def norm(self, text: str) -> str:
        return fold(text) if self.folding else text

    def matches(self, word: str) -> bool:
        """Whether `word` (leading whitespace aside: a BPE token's) starts as typed."""
        if not self.partial:  # at a word start (most calls): every word, and no folding
            return True
        return self.norm(word.lstrip()).startswith(self.key)

    def extends(self, earlier: Matcher) -> bool:
        """Whether every word this matches, `earlier` matched too (a keystroke added letters)."""
        return self.folding == earlier.folding and self.key.startswith(earlier.key)

    def shown(self, word: str) -> str:
        """`word` with the letters the user typed, in the case they were typed."""
        n = len(self.partial)
        if not n or self.norm(word[:n]) != self.key:
            return word
        rest = word[n:]
        if self._shouting:
            rest = rest.upper()
        return self.partial + rest

    @property
    def _shouting(self) -> bool:
        """Typed in capitals (two letters at least): the rest of a word is shown so too."""
        return len(self.partial) > 1 and self.partial.isupper()

    @property
    def merges(self) -> bool:
        """Whether two different words that match can be shown the same ("Lord" and "lord"
        after "lo" when folding; "THee" and "THEE" after "TH")."""
        return self.folding or self._shouting


@dataclass(frozen=True)
class FewestKeys:
    """Suggest the words that save a typist the most keys (`server/fewest_keys.py`), before
    those in `passed`: shown earlier for the word being typed, the typist passed them over."""

    passed: frozenset[str] = frozenset()

    def choose(self, ranked: list[_Ranked], match: Matcher, k: int) -> list[_Ranked]:
        """Of `ranked` (likeliest first), the k words to show, likeliest first: those chosen
        among the words not passed over; in the slots left, the likeliest not passed over,
        then the likeliest passed over (better shown again than an empty slot)."""
        words = [item for item in ranked if is_word(item[0])]
        fresh = [i for i, (text, _) in enumerate(words) if text not in self.passed]
        if match.folding:
            keyed = [(fold(words[i][0]), words[i][1][0]) for i in fresh]
        else:  # a word model's default: the words as they are, no call a word
            keyed = [(words[i][0], words[i][1][0]) for i in fresh]
        picked = {fresh[j] for j in fewest_keys(keyed, len(match.key), k)}
        for i in itertools.chain(fresh, range(len(words))):
            if len(picked) >= k:
                break
            picked.add(i)
        return [words[i] for i in sorted(picked)]


# A suggestion as `choose` ranks it: its text, probability and token ids.
_Ranked = tuple[str, tuple[float, tuple[int, ...]]]


@dataclass(frozen=True)
class Filters:
    """What a reply leaves out (blocked, folded) and favours (user words, as typed)."""

    blocked: frozenset[str] = frozenset()
    user_words: tuple[str, ...] = ()

    def allows(self, word: str) -> bool:
        return not self.blocked or fold(word.strip()) not in self.blocked


def add_word(found: dict[str, Word], word: Word, merge: bool) -> None:
    """Add `word`; a word already there is kept, the likelier of the two (`merge`: one word
    with both's probability, as for "Lord" and "lord" both shown "Lord")."""
    old = found.get(word.text)
    if old is None:
        found[word.text] = word
    elif merge:
        best = old if old.logprob >= word.logprob else word
        found[word.text] = Word(word.text, logaddexp(old.logprob, word.logprob), best.ids)
    elif word.logprob > old.logprob:
        found[word.text] = word


def logsumexp(values: np.ndarray) -> float:
    """log(sum(exp(values))) of a 1-D array, in float64 (-inf when empty; the largest value
    when that is infinite). `logsumexp_rows` is the same rule for each row of a 2-D array."""
    if values.size == 0:
        return -math.inf
    top = float(values.max())
    if not math.isfinite(top):
        return top
    return top + math.log(float(np.exp(values.astype(np.float64) - top).sum()))


def logsumexp_rows(values: np.ndarray) -> np.ndarray:
    """`logsumexp` of each row of float32 `values` `[n, m]`, in float64, in one pass."""
    if values.shape[1] == 0:
        return np.full(len(values), -math.inf)
    top = values.max(axis=1).astype(np.float64)
    finite = np.isfinite(top)
    shift = np.where(finite, top, 0.0)
    sums = np.exp(values.astype(np.float64) - shift[:, None]).sum(axis=1)
    return np.where(finite, top + np.log(np.where(finite, sums, 1.0)), top)


# ---- choosing the suggestions ------------------------------------------------------------------


def choose(
    words: Iterable[Word],
    k: int,
    match: Matcher,
    filters: Filters,
    settings: WordSettings,
    total: float | None = None,
    fewest: FewestKeys | None = None,
) -> list[Suggestion]:
    """The k likeliest of `words` that match and are not blocked, shown as typed; with
    `fewest`, the k words (punctuation left out) that save a typist the most keys (see
    `FewestKeys`), most likely first.

    With `total` (a word model: the log of the mass of all its matching tokens), probabilities
    are the model's over that mass. Without (searched words), they are renormalised over the
    k returned. Matching user words are boosted (see `WordSettings`) over the matching mass
    first, and the k returned then renormalised. Words shown the same ("Lord" and "lord"
    after "Lo") are one suggestion with both's probability.
    """
    merged: dict[str, Word] = {}
    blocking = bool(filters.blocked)
    if match.partial or blocking:
        for w in words:
            if match.matches(w.text) and (not blocking or filters.allows(w.text)):
                shown = match.shown(w.text)
                add_word(
                    merged, w if shown == w.text else Word(shown, w.logprob, w.ids), merge=True
                )
    else:  # at a word start, nothing blocked: every word, shown as it is
        for w in words:
            add_word(merged, w, merge=True)
    if total is None:
        mass = logsumexp(np.array([w.logprob for w in merged.values()], dtype=np.float64))
    else:
        mass = total
    probs = {t: (math.exp(w.logprob - mass), w.ids) for t, w in merged.items()}
    boosted = _boost(probs, match, filters, settings)
    ranked = sorted(boosted.items(), key=lambda item: (-item[1][0], item[0]))
    ranked = ranked[:k] if fewest is None else fewest.choose(ranked, match, k)
    scale = 1.0
    if total is None or boosted is not probs:
        scale = 1.0 / (sum(p for _, (p, _) in ranked) or 1.0)
    return [Suggestion(t, p * scale, ids) for t, (p, ids) in ranked if p > 0]


def _boost(
    probs: dict[str, tuple[float, tuple[int, ...]]],
    match: Matcher,
    filters: Filters,
    settings: WordSettings,
) -> dict[str, tuple[float, tuple[int, ...]]]:
    """`probs` with the matching user words boosted (the same dict when none matches).

    Once a letter is typed, a matching user word's probability is first raised to the floor
    (so a word the model does not know is added); before that, only the user words the model
    predicted are boosted, by their own probability, so they do not fill every word start."""
    users = {
        match.shown(u)
        for u in filters.user_words
        if match.matches(u) and filters.allows(u) and (match.partial or match.shown(u) in probs)
    }
    if not users:
        return probs
    floor = settings.user_word_floor if match.partial else 0.0
    out = dict(probs)
    for u in users:
        p, ids = probs.get(u, (0.0, ()))
        out[u] = (max(p, floor) * settings.user_word_boost, ids)
    return out


# ---- word models -------------------------------------------------------------------------------

# Every how many of a row's values `top_ids` samples for its threshold.
_TOP_STRIDE = 16


def vocab_words(
    codec: TextCodec,
    logprobs: np.ndarray,
    match: Matcher,
    filters: Filters,
    extra: int,
) -> tuple[list[Word], float]:
    """A model's next tokens as candidates for `choose` (a word model's words; the pieces of
    others with `next_tokens`): the `extra` likeliest that match and are not blocked, and the
    log of the mass of all matching tokens (0: no letter typed, the model's own mass)."""
    excluded, count = _excluded(codec, filters.blocked)
    if match.partial:
        ids = matching_ids(codec, match)  # ordinary tokens only
        scores = logprobs[ids].astype(np.float64)
        if filters.blocked:
            scores[excluded[ids]] = -math.inf
        total = logsumexp(scores)
    else:  # the likeliest hold enough ordinary, unblocked ones: the row is not copied
        ids = top_ids(logprobs, extra + count)
        scores = logprobs[ids].astype(np.float64)
        scores[excluded[ids]] = -math.inf
        total = 0.0
    top = top_ids(scores, extra)
    chosen = dict(zip(ids[top].tolist(), scores[top].tolist(), strict=True))
    # The user words the model knows, with their own probability however unlikely.
    index = _ids_by_folded_text(codec)
    for word in filters.user_words:
        for i in index.get(fold(word), ()):
            if codec.token_texts[i].strip() == word and i not in codec.special_ids:
                chosen.setdefault(i, -math.inf if excluded[i] else float(logprobs[i]))
    words = [
        Word(codec.token_texts[i], score, (i,))
        for i, score in chosen.items()
        if math.isfinite(score)
    ]
    return words, total


def top_ids(values: np.ndarray, k: int) -> np.ndarray:
    """The indices of the `k` largest of 1-D `values` (all when k >= size), in no order.

    Natively where the extension is built (`native_top_k`). Else: an argpartition of a whole
    10,000-token row costs 100 to 190 us here; so the k-th largest of every 16th value, which
    at least k values reach, picks about 16 k candidates in one vectorised pass, and only
    those are partitioned (about 20 us)."""
    n = values.size
    if k >= n:
        return np.arange(n)
    if k > 0:
        native = native_top_k(values, k)
        if native is not None:
            return native
    sample = values[::_TOP_STRIDE]
    if sample.size > k:
        floor = np.partition(sample, sample.size - k)[sample.size - k]
        candidates = np.flatnonzero(values >= floor)
        if candidates.size >= k:  # always, unless the row holds NaN
            top = np.argpartition(values[candidates], candidates.size - k)
            return candidates[top[candidates.size - k :]]
    return np.argpartition(values, n - k)[n - k :]


def matching_ids(codec: TextCodec, match: Matcher) -> np.ndarray:
    """Ids of the ordinary tokens whose text (leading space aside) matches."""
    if not match.folding:
        return codec.ids_with_prefix(match.partial)
    keys, ids = _folded_index(codec)
    lo = bisect.bisect_left(keys, match.key)
    hi = bisect.bisect_left(keys, match.key + MAX_CHAR)
    return ids[lo:hi]


@functools.lru_cache(maxsize=32)
def _folded_index(codec: TextCodec) -> tuple[list[str], np.ndarray]:
    keyed = sorted(
        (fold(text.lstrip()), i)
        for i, text in enumerate(codec.token_texts)
        if i not in codec.special_ids and text.strip()
    )
    return [k for k, _ in keyed], np.array([i for _, i in keyed], dtype=np.int64)


@functools.lru_cache(maxsize=32)
def _ids_by_folded_text(codec: TextCodec) -> dict[str, tuple[int, ...]]:
    out: dict[str, list[int]] = {}
    for i, text in enumerate(codec.token_texts):
        out.setdefault(fold(text.strip()), []).append(i)
    return {k: tuple(v) for k, v in out.items()}


def blocked_ids(codec: TextCodec, blocked: frozenset[str]) -> np.ndarray:
    """The ids of a word model's tokens that spell a blocked word."""
    index = _ids_by_folded_text(codec)
    ids = [i for word in blocked for i in index.get(word, ())]
    return np.array(sorted(ids), dtype=np.int64)


@functools.lru_cache(maxsize=64)
def _excluded(codec: TextCodec, blocked: frozenset[str]) -> tuple[np.ndarray, int]:
    """Which ids are never a suggestion (special and blocked tokens), as a mask over the
    vocabulary, and how many: made once per blocklist, not on every keystroke."""
    mask = np.zeros(codec.vocab_size, dtype=bool)
    mask[codec.special_id_array] = True
    mask[blocked_ids(codec, blocked)] = True
    return mask, int(mask.sum())
