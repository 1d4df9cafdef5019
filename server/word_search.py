"""The word search: next words from a character or BPE model, whose tokens are pieces of words.

`search` extends the context with a batched beam search over pieces until each candidate
reaches a word boundary: a word's log-probability is the sum of its pieces' log-probabilities
plus the log of the probability that the word ends there (the total probability of the
boundary tokens after it). Each round asks the engine for the next-token log-probs of every
live hypothesis at once, so the engine runs them in one batch. What a search leaves it bounds
from above (`Unsearched`), so a later keystroke that only adds letters can go on from there, or
know that it need not.

The pieces a hypothesis may grow by come from the tokenizer (`PieceTable`: word starts,
continuations and boundaries) and, when the bundle has one, its lexicon (the words of its
training text), which keeps fragments out of the words found.
"""

from __future__ import annotations

import bisect
import functools
import math
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from server.requests import Extension, State
from server.text import TextCodec
from server.words import (
    MAX_CHAR,
    Filters,
    Matcher,
    Word,
    WordSettings,
    add_word,
    fold,
    is_word,
    logsumexp_rows,
)

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
        hi = bisect.bisect_left(self.sorted_keys, rest + MAX_CHAR)
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
            return Extension(self.parent, self.ids[-1:])
        return np.append(base, np.array(self.ids, np.int64))


class Unsearched(NamedTuple):  # a tuple: a search makes one a hypothesis a round
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
        words = [
            j
            for j, h in enumerate(live)
            if table.is_word(h.text) and match.matches(h.text) and filters.allows(h.text)
        ]
        if words:  # each word's probability of ending there, for all of them at once
            ends = logsumexp_rows(grid[words][:, table.boundary]).tolist()
            for j, end in zip(words, ends, strict=True):
                h = live[j]
                add_word(found, Word(h.text, h.logprob + end, h.ids), merge=False)
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
