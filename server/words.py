"""Next words for every tokenizer kind: matching, the blocklist, user words and the word search.

Word models predict words directly (one token each). Character and BPE models predict pieces of
words, so `search` extends the context with a batched beam search over pieces until each
candidate reaches a word boundary: a word's log-probability is the sum of its pieces'
log-probabilities plus the log of the probability that the word ends there (the total
probability of the boundary tokens after it). Each round asks the engine for the next-token
log-probs of every live hypothesis at once, so the engine runs them in one batch.

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
import re
import time
import unicodedata
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from server.fewest_keys import fewest_keys
from server.requests import Extension, State
from server.sampling import native_top_k
from server.text import TextCodec

# How `partial_word` is matched when the request does not say: word models keep their exact
# (case-sensitive) matching; character and BPE models ignore case and accents.
FOLD_DEFAULT = {"word": False, "char": True, "bpe": True}
# Tokenizer kinds whose predictions come from the word search.
SEARCHED_KINDS = frozenset({"char", "bpe"})
_WORD_PUNCT = "'\u2019"
# Highest code point: `prefix + _MAX_CHAR` sorts after every string that starts with `prefix`.
_MAX_CHAR = "\U0010ffff"


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
        keyed = [(match.norm(words[i][0]), words[i][1][0]) for i in fresh]
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


# ---- the vocabulary's pieces -------------------------------------------------------------------


@dataclass(frozen=True)
class _Pieces:
    """Pieces of one kind (word starts or continuations), indexed by their normalised text."""

    ids: np.ndarray
    texts: list[str]  # each id's text as it adds to a word (a BPE word start's space dropped)
    sorted_keys: list[str] = field(repr=False)
    sorted_ids: np.ndarray = field(repr=False)

    @staticmethod
    def of(items: list[tuple[int, str]], norm: Callable[[str], str]) -> _Pieces:
        keyed = sorted((norm(text), i) for i, text in items)
        return _Pieces(
            np.array([i for i, _ in items], dtype=np.int64),
            [text for _, text in items],
            [k for k, _ in keyed],
            np.array([i for _, i in keyed], dtype=np.int64),
        )

    def compatible(self, rest: str) -> np.ndarray:
        """Ids whose normalised text starts with `rest` or is a proper beginning of it."""
        lo = bisect.bisect_left(self.sorted_keys, rest)
        hi = bisect.bisect_left(self.sorted_keys, rest + _MAX_CHAR)
        found = [self.sorted_ids[lo:hi]]
        for n in range(1, len(rest)):
            at = bisect.bisect_left(self.sorted_keys, rest[:n])
            while at < len(self.sorted_keys) and self.sorted_keys[at] == rest[:n]:
                found.append(self.sorted_ids[at : at + 1])
                at += 1
        return np.concatenate(found)


class Lexicon:
    """The words a search may suggest (a bundle's `lexicon.txt`: the words of its training
    text), as typed there. A search restricted to them extends a hypothesis only by the pieces
    that keep it a beginning of one of them, and finds only them: fragments such as "th" are
    never stored words, and a bound on what a hypothesis left covers only the words it can
    still reach."""

    def __init__(self, words: Iterable[str]) -> None:
        self.words = frozenset(w for w in words if is_word(w))
        self.prefixes = frozenset(w[:n] for w in self.words for n in range(1, len(w) + 1))

    def __len__(self) -> int:
        return len(self.words)

    def allowed(self, pieces: _Pieces, text: str) -> np.ndarray:
        """The ids of `pieces` that keep `text` a beginning of a word."""
        mask = np.array([text + t in self.prefixes for t in pieces.texts], dtype=bool)
        return pieces.ids[mask]


class _IdCache:
    """Id arrays by key, up to a total size in bytes (then it starts again empty)."""

    def __init__(self, limit_bytes: int) -> None:
        self._limit = limit_bytes
        self._bytes = 0
        self._ids: dict[tuple[bool, str], np.ndarray] = {}

    def get(self, key: tuple[bool, str]) -> np.ndarray | None:
        return self._ids.get(key)

    def put(self, key: tuple[bool, str], ids: np.ndarray) -> None:
        if self._bytes + ids.nbytes > self._limit:
            self._ids.clear()
            self._bytes = 0
        self._ids[key] = ids
        self._bytes += ids.nbytes


# The bytes of the lexicon-allowed piece ids a piece table keeps (per text a search reached).
_ALLOWED_CACHE_BYTES = 16 << 20


def lexicon_of(text: str) -> str:
    """A lexicon file's text from any text (a training corpus, a word list): its distinct
    words (runs of word characters), sorted, one a line."""
    words = {w for w in _NOT_WORD.split(text) if is_word(w)}
    return "".join(f"{w}\n" for w in sorted(words))


_NOT_WORD = re.compile(r"[^\w'\u2019]|_")


@functools.lru_cache(maxsize=8)
def read_lexicon(text: str) -> Lexicon | None:
    """A bundle's lexicon file (one word a line, as typed; '#' starts a comment); None when
    it lists no word (cached: one per served bundle)."""
    words = (line.split("#", 1)[0].strip() for line in text.splitlines())
    lexicon = Lexicon(w for w in words if w)
    return lexicon if len(lexicon) else None


@dataclass(frozen=True)
class PieceTable:
    """A char or BPE vocabulary split into word starts, continuations and boundaries."""

    starts: _Pieces  # pieces that begin a word after a space (BPE: " the"); char: letters
    inner: _Pieces  # pieces that continue a word (or begin one with no space before it)
    boundary: np.ndarray  # ids that end a word: spaces, punctuation, eos
    text: dict[int, str]  # each start or inner id's text as it adds to a word
    lexicon: Lexicon | None = None  # the words a search may find (None: any word)
    # (whether `starts`, text) -> the ids `allowed_ids` gave (a search asks again and again).
    _allowed: _IdCache = field(
        default_factory=lambda: _IdCache(_ALLOWED_CACHE_BYTES), repr=False, compare=False
    )

    def allowed_ids(self, pieces: _Pieces, text: str) -> np.ndarray:
        """The ids of `pieces` (`starts` or `inner`) that may follow `text` (all of them
        without a lexicon)."""
        if self.lexicon is None:
            return pieces.ids
        key = (pieces is self.starts, text)
        ids = self._allowed.get(key)
        if ids is None:
            ids = self.lexicon.allowed(pieces, text)
            self._allowed.put(key, ids)
        return ids

    def is_word(self, text: str) -> bool:
        """Whether a search may find `text` as a word."""
        return bool(text) and (self.lexicon is None or text in self.lexicon.words)


@functools.lru_cache(maxsize=32)
def piece_table(codec: TextCodec, folding: bool, lexicon: str = "") -> PieceTable:
    """`codec`'s pieces, normalised for matching with or without folding, and the words of
    `lexicon` (a bundle's lexicon file's text; "": any word) (cached)."""
    norm = fold if folding else _same
    starts: list[tuple[int, str]] = []
    inner: list[tuple[int, str]] = []
    boundary: list[int] = []
    for i, text in enumerate(codec.token_texts):
        if i in codec.special_ids and i != codec.eos_id:
            continue
        if is_word(text):
            inner.append((i, text))
        elif codec.kind == "bpe" and text[:1] == " " and is_word(text[1:]):
            starts.append((i, text[1:]))
        else:
            boundary.append(i)
    if codec.kind != "bpe":
        starts = inner
    return PieceTable(
        _Pieces.of(starts, norm),
        _Pieces.of(inner, norm),
        np.array(boundary, dtype=np.int64),
        dict(starts) | dict(inner),
        read_lexicon(lexicon) if lexicon else None,
    )


def _same(text: str) -> str:
    return text


def search_context(codec: TextCodec, text: str) -> tuple[str, bool]:
    """The context a search extends, and whether its first piece must begin a word after a
    space: a BPE model spells a word's space with the word (" the"), so one trailing space
    moves from the context into the search."""
    if codec.kind == "bpe" and text.endswith(" "):
        return text[:-1], True
    return text, False


# ---- the search --------------------------------------------------------------------------------


class _Hypothesis(NamedTuple):
    logprob: float
    ids: tuple[int, ...]
    text: str
    # The model's state before the last piece, as the engine gave it (None: not known, the
    # whole context is stepped): the hypothesis is stepped from there by that piece alone.
    parent: State | None = None

    def item(self, base: np.ndarray) -> np.ndarray | Extension:
        """What the engine steps for this hypothesis after the context `base`."""
        if self.parent is not None and self.ids:
            return Extension(self.parent, self.ids[-1])
        return np.append(base, np.array(self.ids, np.int64))


@dataclass(frozen=True)
class Unsearched:
    """Words a search did not reach, bounded from above (extending a text only lowers its
    probability): words that extend `key` (the hypothesis's text, normalised) have at most its
    log-probability; with `row`, the hypothesis was extended by some of `pieces`, and the
    words through any piece `i` it was not have at most its log-probability plus `row[i]`
    (-inf for the pieces it was extended by, and those a lexicon rules out there)."""

    key: str
    hypothesis: _Hypothesis
    row: np.ndarray | None = None
    pieces: _Pieces | None = None
    best: float = -math.inf  # the most of `row` over `pieces`
    state: State | None = None  # the model's state after the hypothesis, with `row`

    def _dropped(self, key: str) -> np.ndarray:
        """The ids of the pieces not kept that lead to words matching `key`."""
        if self.pieces is None or self.row is None:
            return np.zeros(0, dtype=np.int64)
        if self.key.startswith(key):
            ids = self.pieces.ids
        elif key.startswith(self.key):
            ids = self.pieces.compatible(key[len(self.key) :])
        else:
            return np.zeros(0, dtype=np.int64)
        return ids[np.isfinite(self.row[ids])]

    def bound(self, key: str) -> float:
        """The most log-probability a word that matches `key` (normalised) has here."""
        if self.row is None or self.pieces is None:
            compatible = self.key.startswith(key) or key.startswith(self.key)
            return self.hypothesis.logprob if compatible else -math.inf
        if self.key.startswith(key):
            return self.hypothesis.logprob + self.best
        if not key.startswith(self.key):
            return -math.inf
        ids = self.pieces.compatible(key[len(self.key) :])
        return self.hypothesis.logprob + (float(self.row[ids].max()) if ids.size else -math.inf)

    def reopen(self, key: str, table: PieceTable) -> list[_Hypothesis]:
        """The hypotheses to search for words that match `key` (normalised)."""
        if self.row is None:
            return [self.hypothesis] if self.bound(key) > -math.inf else []
        h = self.hypothesis
        ids = self._dropped(key)
        scores = self.row[ids].tolist()
        return [
            _Hypothesis(h.logprob + score, (*h.ids, i), h.text + table.text[i], self.state)
            for i, score in zip(ids.tolist(), scores, strict=True)
        ]


@dataclass(frozen=True)
class SearchResult:
    """The complete words a search found (each at most once), what it left unsearched, and
    the model steps it cost."""

    words: list[Word]
    steps: int
    unsearched: list[Unsearched] = field(default_factory=list)

    def complete(self, k: int, match: Matcher, filters: Filters) -> bool:
        """Whether the k likeliest words that match (a keystroke may have added letters since
        the search) are among `words`: no unsearched word that matches can beat the k-th."""
        found = sorted(
            (w.logprob for w in self.words if match.matches(w.text) and filters.allows(w.text)),
            reverse=True,
        )
        bar = found[k - 1] if len(found) >= k else -math.inf
        return all(u.bound(match.key) <= bar for u in self.unsearched)


# The next-token log-probs after each of many contexts (one batch of the engine), with the
# model's state there when the engine keeps it in this process (else None). A hypothesis goes
# as an `Extension` of its parent's state when that is known, else as its whole context, an
# array (the engine would turn a list into one for every hypothesis).
NextLogprobs = Callable[
    [list[np.ndarray | Extension]], Awaitable[list[tuple[np.ndarray, State | None]]]
]


async def search(
    next_logprobs: NextLogprobs,
    context: Sequence[int],
    table: PieceTable,
    after_space: bool,
    match: Matcher,
    filters: Filters,
    settings: WordSettings,
    want: int,
    resume: SearchResult | None = None,
) -> SearchResult:
    """The likeliest complete words after `context` that match and are not blocked (see the
    module doc), and bounds on the words it did not reach (`Unsearched`). With `resume` (an
    earlier search of the same context, for fewer letters typed), it goes on from where that
    one stopped: from its words that match and the hypotheses it left that can still match.

    Stops when no hypothesis is left, after `settings.depth` rounds, after the round that
    passes `settings.budget_ms` once it has a word to show (a late answer beats an empty one;
    the depth still bounds it), or when `want` words were found that are all likelier than
    every live hypothesis (extending a hypothesis only makes it less likely).
    """
    deadline = time.perf_counter() + settings.budget_ms / 1000
    base = np.asarray(context, dtype=np.int64)
    live, found, left = _start(resume, table, match, filters, settings.width, want)
    steps = 0
    for _ in range(settings.depth + 1):
        if not live:
            break
        stepped = await next_logprobs([h.item(base) for h in live])
        steps += len(live)
        grid = np.array([row for row, _ in stepped])  # np.stack: 3.5 against 0.9 us for 5 rows
        for h, logprobs in zip(live, grid, strict=True):
            if table.is_word(h.text) and match.matches(h.text) and filters.allows(h.text):
                end = _logsumexp(logprobs[table.boundary])
                _add(found, Word(h.text, h.logprob + end, h.ids), merge=False)
        best = sorted((w.logprob for w in found.values()), reverse=True)
        bar = best[want - 1] if len(best) >= want else -math.inf
        states = [state for _, state in stepped]
        expand = _Round(live, grid, states, table, after_space, match, settings.depth)
        live, rest = expand.grow(settings.width, bar)
        left += rest
        if not live or (found and time.perf_counter() > deadline):
            break
    left += [Unsearched(match.norm(h.text), h) for h in live]
    return SearchResult(list(found.values()), steps, left)


def _start(
    resume: SearchResult | None,
    table: PieceTable,
    match: Matcher,
    filters: Filters,
    width: int,
    want: int,
) -> tuple[list[_Hypothesis], dict[str, Word], list[Unsearched]]:
    """A search's first hypotheses, the words it starts with, and what it leaves unsearched."""
    if resume is None:
        return [_Hypothesis(0.0, (), "")], {}, []
    found = {w.text: w for w in resume.words if match.matches(w.text) and filters.allows(w.text)}
    reopened = [h for u in resume.unsearched for h in u.reopen(match.key, table)]
    live, dropped = _prune(reopened, found, width, want)
    return live, found, [Unsearched(match.norm(h.text), h) for h in dropped]


def _prune(
    grown: list[_Hypothesis], found: dict[str, Word], width: int, want: int
) -> tuple[list[_Hypothesis], list[_Hypothesis]]:
    """The hypotheses to extend next and those dropped: the `width` likeliest, less those that
    cannot beat the `want` likeliest words found."""
    grown = sorted(grown, key=lambda h: -h.logprob)
    best = sorted((w.logprob for w in found.values()), reverse=True)
    bar = best[want - 1] if len(best) >= want else -math.inf
    live = [h for h in grown[:width] if h.logprob > bar]
    dropped = [h for h in grown[:width] if h.logprob <= bar] + grown[width:]
    return live, dropped


class _Round:
    """One round's hypotheses and their next-piece log-probs, as arrays: each row masked to
    the pieces the hypothesis may be extended by (those the lexicon allows; with depth left)."""

    def __init__(
        self,
        live: list[_Hypothesis],
        grid: np.ndarray,
        states: list[State | None],
        table: PieceTable,
        after_space: bool,
        match: Matcher,
        depth: int,
    ) -> None:
        self.live, self.grid, self.table, self.match = live, grid, table, match
        self.states = states  # the model's state after each (None: not known)
        self.allowed = np.zeros(grid.shape, dtype=bool)  # pieces each may be extended by
        self.matching = np.zeros(grid.shape, dtype=bool)  # ... that can still match
        self.pieces: list[_Pieces | None] = []
        for j, h in enumerate(live):
            if len(h.ids) >= depth:
                self.pieces.append(None)
                continue
            pieces = table.starts if after_space and not h.ids else table.inner
            self.pieces.append(pieces)
            self.allowed[j, table.allowed_ids(pieces, h.text)] = True
            rest = match.key[len(match.norm(h.text)) :]
            if rest:
                self.matching[j, pieces.compatible(rest)] = True
                self.matching[j] &= self.allowed[j]
            else:
                self.matching[j] = self.allowed[j]

    def grow(self, width: int, bar: float) -> tuple[list[_Hypothesis], list[Unsearched]]:
        """The `width` likeliest one-piece extensions that can still match and beat `bar`
        (the `want`-th word found), likeliest first; and what each expanded hypothesis leaves
        unsearched through its other pieces."""
        live, table = self.live, self.table
        logprobs = np.array([h.logprob for h in live])
        scores = np.where(self.matching, self.grid + logprobs[:, None], -np.inf).ravel()
        top = np.argpartition(-scores, width - 1)[:width] if width < scores.size else None
        top = np.arange(scores.size) if top is None else top
        top = top[scores[top] > bar]  # -inf never is
        top = top[np.argsort(-scores[top], kind="stable")]
        rows, ids = np.divmod(top, self.grid.shape[1])
        states = self.states
        children = [
            _Hypothesis(score, (*live[j].ids, i), live[j].text + table.text[i], states[j])
            for j, i, score in zip(rows.tolist(), ids.tolist(), scores[top].tolist(), strict=True)
        ]
        left = np.where(self.allowed, self.grid, -np.inf)
        left[rows, ids] = -np.inf
        most = left.max(axis=1).tolist()
        rest = [
            Unsearched(self.match.norm(h.text), h, left[j], pieces, most[j], states[j])
            for j, (h, pieces) in enumerate(zip(live, self.pieces, strict=True))
            if pieces is not None
        ]
        return children, rest


def _add(found: dict[str, Word], word: Word, merge: bool) -> None:
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


def _logsumexp(values: np.ndarray) -> float:
    if values.size == 0:
        return -math.inf
    top = float(values.max())
    if not math.isfinite(top):
        return top
    return top + math.log(float(np.exp(values.astype(np.float64) - top).sum()))


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
                _add(merged, w if shown == w.text else Word(shown, w.logprob, w.ids), merge=True)
    else:  # at a word start, nothing blocked: every word, shown as it is
        for w in words:
            _add(merged, w, merge=True)
    if total is None:
        mass = _logsumexp(np.array([w.logprob for w in merged.values()], dtype=np.float64))
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
        total = _logsumexp(scores)
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
    hi = bisect.bisect_left(keys, match.key + _MAX_CHAR)
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
