"""The suggestions of PredictNext and TypingSession, for every tokenizer kind.

Word models' suggestions are their next tokens; character and BPE models' are whole words
found by the word search (server/word_search.py). A typing session keeps what its last keystroke
computed (`Memory`): a keystroke that only adds letters to the partial word, in the same
context, filters the words found before instead of running the model again, and searches
again only when they may not hold the k likeliest words that match: when a hypothesis the
search left (`Unsearched`) could still beat the k-th of them. The model steps that sessions
ask for in one turn of the event loop run as one batch of the engine (`_Joint`).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from server import oov_words
from server.config import ConfigError, ServerConfig
from server.engine import Engine
from server.requests import Extension, State
from server.text import TextCodec
from server.word_cache import (
    Mixer,
    WordCache,
    WordCacheSettings,
    piece_known,
    vocab_known,
    with_cached_top,
)
from server.word_search import PieceTable, SearchResult, piece_table, search
from server.words import (
    SEARCHED_KINDS,
    FewestKeys,
    Filters,
    Matcher,
    Suggestion,
    Word,
    WordSettings,
    choose,
    logaddexp,
    read_word_list,
    vocab_words,
)

# A word model's likeliest matching tokens among which `Ask.fewest_keys` chooses, besides
# those passed over. (On 500 validation lines of the shipped word model, version 6, with the
# word cache: 8 saved 0.4218 of the keys, 6 0.4218, 16 0.4216, for 13 % less of the servicer's
# CPU an event than 16, `scripts/typing_servicer.py --fewest-keys`; on version 5's 300 lines,
# 16 saved 0.4171, 32 and 1,000 0.4172, 8 0.4170.)
FEWEST_KEYS_CANDIDATES = 8


def word_settings(config: ServerConfig) -> WordSettings:
    """The server's word-prediction settings, with its --blocklist file read."""
    blocklist: frozenset[str] = frozenset()
    if config.blocklist is not None:
        try:
            blocklist = read_word_list(config.blocklist.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--blocklist {config.blocklist}: cannot be read ({e})") from e
    return WordSettings(
        width=config.word_search_width,
        depth=config.word_search_depth,
        budget_ms=config.word_search_ms,
        user_word_boost=config.user_word_boost,
        user_word_floor=config.user_word_floor,
        blocklist=blocklist,
        typing_fewest_keys=config.typing_selection == "fewest-keys",
    )


def word_cache_settings(config: ServerConfig) -> WordCacheSettings:
    """The server's word-cache settings."""
    return WordCacheSettings(
        config.word_cache,
        config.word_cache_weight,
        config.word_cache_decay,
        config.word_cache_bigram,
    )


@dataclass
class Memory:
    """What a typing session keeps between its events."""

    context: tuple[int, ...] | None = None  # the ids last predicted after (searched models:
    cached: bool = False  # the search's context), and with or without the continuous cache
    logprobs: np.ndarray | None = None  # word models: the next-token log-probs there
    state: State | None = None  # ... and the model's state there, when the engine gave it
    match: Matcher | None = None  # searched models: what the last search matched
    found: SearchResult | None = None  # ... and what it found
    blocked: set[str] = field(default_factory=set)  # folded words the session blocked
    user_words: list[str] = field(default_factory=list)  # the session's user words
    word_cache: WordCache | None = None  # the words of the session's text (server/word_cache.py)
    # Choosing the fewest keys: the words shown since the word being typed began, and the
    # `context` (the object itself) and partial word they were last shown at.
    shown: frozenset[str] = frozenset()
    shown_at: tuple[tuple[int, ...] | None, Matcher] | None = None

    def same_context(self, context: Sequence[int], cached: bool) -> bool:
        return self.context == tuple(context) and self.cached == cached


@dataclass(frozen=True)
class Ask:
    """One suggestion request apart from its context: the model's codec, how many suggestions,
    matching which partial word, filtered by what, the search's settings, with or without the
    continuous cache, the session's memory (read and updated) and the word cache to mix in.
    `join`: whether its model steps may join other calls' in one engine run (`_Joint`); a
    caller that knows no other call is under way sets it False and skips the wait for them."""

    codec: TextCodec
    k: int
    match: Matcher
    filters: Filters
    settings: WordSettings
    memory: Memory
    cached: bool = False
    mixer: Mixer | None = None
    join: bool = True
    fewest_keys: bool = False  # show the words that save the most keys (server/fewest_keys.py)


@dataclass(frozen=True)
class Predicted:
    """One reply's suggestions; whether they were searched words; the model steps they cost."""

    suggestions: list[Suggestion]
    words: bool
    steps: int


Contexts = Sequence[Sequence[int] | np.ndarray]
# A word search's contexts: whole, or as an extension of a state the engine gave.
Items = Sequence[np.ndarray | Extension]
Stepped = tuple[np.ndarray, State | None]


class _Counted:
    """The engine's next-token calls (of many contexts at once), counting the contexts."""

    def __init__(self, engine: Engine, cached: bool, join: bool = True) -> None:
        self._engine = engine
        self._cached = cached
        self._join = join
        self.steps = 0

    async def __call__(self, contexts: Contexts) -> list[np.ndarray]:
        self.steps += len(contexts)
        if self._cached:  # the continuous cache's calls run one context at a time anyway
            return await self._engine.next_token_logprobs_many(contexts, True)
        if not self._join:  # nothing to wait for: a task and a turn of the loop saved
            return await self._engine.next_token_logprobs_many(contexts)
        return await _joint(self._engine, False)(contexts)

    async def stepped(self, items: Items) -> list[Stepped]:
        """The word search's calls: each item's next-token log-probs, and the model's state
        after it when the engine keeps its states in this process (else None, and every item
        is a whole context)."""
        if self._cached or not self._engine.holds_states:
            contexts = [item for item in items if not isinstance(item, Extension)]
            if len(contexts) != len(items):  # no state was given, so none is extended
                raise ValueError("an extension of a state the engine did not give")
            return [(row, None) for row in await self(contexts)]
        self.steps += len(items)
        stepped: list[Stepped]
        if not self._join:
            stepped = list(await self._engine.next_token_states_many(items))
        else:
            stepped = await _joint(self._engine, True)(items)
        return stepped


class _Joint:
    """The next-token calls that sessions make in one turn of the event loop, run as one
    call of the engine (one batch): sessions woken together by their keystrokes share a step
    instead of running one step of one row each (the engine runs an idle step on the event
    loop, so it never batches them by itself). With `states`, the word search's calls (each
    answered with the model's state too, `Engine.next_token_states_many`)."""

    def __init__(self, engine: Engine, states: bool) -> None:
        # Weakly: `_JOINTS` is keyed by the engine, and a strong reference here would keep
        # every engine a reload replaced alive.
        self._engine = weakref.ref(engine)
        self._states = states
        self._waiting: list[tuple[Sequence[Any], asyncio.Future[list[Any]]]] = []
        self._runs: set[asyncio.Task[None]] = set()

    async def __call__(self, contexts: Sequence[Any]) -> list[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        if not self._waiting:  # the run starts on the next turn, with every call made by then
            run = loop.create_task(self._run())
            self._runs.add(run)
            run.add_done_callback(self._runs.discard)
        self._waiting.append((contexts, future))
        return await future

    async def _run(self) -> None:
        waiting, self._waiting = self._waiting, []
        try:
            engine = self._engine()
            if engine is None:  # unreachable while a session awaits it; said, not assumed
                raise RuntimeError("the model's engine was closed")
            every = [c for contexts, _ in waiting for c in contexts]
            rows: list[Any]
            if self._states:
                rows = await engine.next_token_states_many(every)
            else:
                rows = await engine.next_token_logprobs_many(every)
        except BaseException as e:  # each session gets the error (or the cancellation)
            for _, future in waiting:
                if future.done():
                    continue
                if isinstance(e, asyncio.CancelledError):
                    future.cancel()
                else:
                    future.set_exception(e)
            if not isinstance(e, Exception):
                raise
            return
        at = 0
        for contexts, future in waiting:
            if not future.done():  # not cancelled: its session is still there
                future.set_result(rows[at : at + len(contexts)])
            at += len(contexts)


_JOINTS: weakref.WeakKeyDictionary[Engine, dict[bool, _Joint]] = weakref.WeakKeyDictionary()


def _joint(engine: Engine, states: bool) -> _Joint:
    joints = _JOINTS.setdefault(engine, {})
    joint = joints.get(states)
    if joint is None:
        joint = joints[states] = _Joint(engine, states)
    return joint


async def predict_tokens(engine: Engine, context: Sequence[int], ask: Ask) -> Predicted:
    """A word model's suggestions: its next tokens (one model step unless `ask.memory` has
    them), with the word cache's words mixed in (`ask.mixer`)."""
    codec, k, match, filters, settings = ask.codec, ask.k, ask.match, ask.filters, ask.settings
    cached, memory, mixer = ask.cached, ask.memory, ask.mixer
    fewest = _fewest_keys(ask, context)
    counted = _Counted(engine, cached, ask.join)
    if memory.logprobs is None or not memory.same_context(context, cached):
        memory.logprobs, memory.state = await _next_tokens(counted, memory, context, cached)
        memory.context, memory.cached = tuple(context), cached
    # Twice k when words shown the same are one suggestion, so that k remain, and when the
    # word cache may raise a word past the model's k-th.
    extra = 2 * k if match.merges or mixer is not None else k
    rank = k  # the suggestions a word of the word cache must be able to reach
    if fewest is not None:  # the words that gain a slot are those hidden for letters to come
        extra = max(extra, FEWEST_KEYS_CANDIDATES) + len(fewest.passed)
        rank = k + len(fewest.passed)
    words, total = vocab_words(codec, memory.logprobs, match, filters, extra)
    known = vocab_known(codec, memory.logprobs)
    # At a word start the cache's words are walked until none could rank: bounded by the
    # model's 4k-th token, not its 2k-th, the walk ends after a few. (With user words, the
    # words walked are those a user word can be boosted among: the walk is kept as it was.)
    unproposed = None
    if mixer is not None and not match.partial and not filters.user_words:
        words, unproposed = with_cached_top(codec, memory.logprobs, words, mixer.cache, filters)
    unknown = oov_words.after(engine.bundle, codec, memory.logprobs)
    if unknown is not None:  # words outside the vocabulary, through <unk> (server/oov_words.py)
        known = unknown.lookup(known)
        words, total = unknown.add(words, total, known, match, filters, extra)
        if unproposed is not None:  # a listed word's share of <unk> adds to its token's
            unproposed = logaddexp(unproposed, unknown.best(match))
    if mixer is not None:
        words, mixed = mixer.mix(words, total, match, filters, rank, known, unproposed)
        total = total if mixed is None else mixed
    suggestions = choose(words, k, match, filters, settings, total, fewest)
    return Predicted(_remembered(fewest, ask, suggestions), False, counted.steps)


async def _next_tokens(
    counted: _Counted, memory: Memory, context: Sequence[int], cached: bool
) -> Stepped:
    """A word model's next-token log-probs after `context`, and the model's state there (None
    with the continuous cache, or when the engine does not give states). A context that
    extends the one the session last predicted after, whose state it holds (typing a word and
    a separator), is stepped from that state by its new tokens alone: no lookup of the whole
    context in the state cache, which also keeps the session's own contexts out of it."""
    if cached:
        (logprobs,) = await counted([list(context)])
        return logprobs, None
    before = memory.context
    if memory.state is not None:  # set with `before`, by a call without the continuous cache
        assert before is not None
        n = len(before)
        if len(context) > n and tuple(context[:n]) == before:
            extension = Extension(memory.state, tuple(context[n:]))
            ((logprobs, after),) = await counted.stepped([extension])
            return logprobs, after
    ((logprobs, after),) = await counted.stepped([np.array(context, dtype=np.int64)])
    return logprobs, after


async def predict_words(
    engine: Engine, context: Sequence[int], after_space: bool, ask: Ask
) -> Predicted:
    """A character or BPE model's suggestions: searched words, filtered from `ask.memory`'s
    when the keystroke only extends the partial word and enough of them still match, with the
    word cache's words mixed in (`ask.mixer`)."""
    codec, k, match, filters, settings = ask.codec, ask.k, ask.match, ask.filters, ask.settings
    cached, memory, mixer = ask.cached, ask.memory, ask.mixer
    fewest = _fewest_keys(ask, context)
    # The k likeliest words the session did not show already are among the likeliest `need`.
    need = k if fewest is None else k + sum(map(match.matches, fewest.passed))
    mixed = _mixing(mixer, codec, after_space, need, match, filters)
    earlier = memory.match
    resume = None
    if earlier is not None and memory.same_context(context, cached) and match.extends(earlier):
        resume = memory.found
    if resume is not None and resume.complete(need, match, filters):
        suggestions = choose(mixed(resume.words), k, match, filters, settings, None, fewest)
        return Predicted(_remembered(fewest, ask, suggestions), True, 0)
    counted = _Counted(engine, cached, ask.join)
    table: PieceTable = piece_table(codec, match.folding, engine.bundle.lexicon)
    want = max(need, settings.keep)
    result = await search(
        counted.stepped, context, table, after_space, match, filters, settings, want, resume
    )
    memory.context, memory.cached = tuple(context), cached
    memory.match, memory.found = match, result
    suggestions = choose(mixed(result.words), k, match, filters, settings, None, fewest)
    return Predicted(_remembered(fewest, ask, suggestions), True, result.steps)


def _fewest_keys(ask: Ask, context: Sequence[int]) -> FewestKeys | None:
    """How `ask` chooses its words: None for the likeliest; else the words that save the most
    keys, less those the session showed for the word being typed when this event only adds
    letters to it (the typist passed them over: shown again, they would take a slot for
    nothing)."""
    if not ask.fewest_keys:
        return None
    memory, match = ask.memory, ask.match
    at = memory.shown_at
    # The same context: still the one they were shown after (no event with the likeliest has
    # moved it since) and still this event's.
    if at is None or at[0] is not memory.context or not memory.same_context(context, ask.cached):
        return FewestKeys()
    if not match.extends(at[1]) or match.key == at[1].key:  # not a letter more
        return FewestKeys()
    return FewestKeys(memory.shown)


def _remembered(
    fewest: FewestKeys | None, ask: Ask, suggestions: list[Suggestion]
) -> list[Suggestion]:
    """`suggestions`, remembered by the session as shown (choosing the fewest keys)."""
    if fewest is not None:
        memory = ask.memory
        memory.shown_at = (memory.context, ask.match)  # the context just predicted after
        memory.shown = fewest.passed | {s.text for s in suggestions}
    return suggestions


def _mixing(
    mixer: Mixer | None,
    codec: TextCodec,
    after_space: bool,
    k: int,
    match: Matcher,
    filters: Filters,
) -> Callable[[list[Word]], list[Word]]:
    """Searched words with the word cache mixed in (unchanged without `mixer`). The search's
    stopping rule stays sound: a word it did not reach gains only its cache share, and every
    cached word that matches is added."""
    if mixer is None:
        return lambda words: words
    known = piece_known(codec, after_space)
    return lambda words: mixer.mix(words, None, match, filters, k, known)[0]


def searched(codec: TextCodec) -> bool:
    """Whether `codec`'s model suggests searched words (character and BPE models)."""
    return codec.kind in SEARCHED_KINDS
