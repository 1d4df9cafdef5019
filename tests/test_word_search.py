"""The word search of character models restricted to a bundle's lexicon, on a real engine.

A lexicon (the bundle's `lexicon.txt`) limits a search to its words: it extends a hypothesis
only by pieces that keep it a beginning of one, and stores only whole words, so a keystroke's
stored words hold no fragment. The words it returns keep their exact probability under the
model, recomputed here one context at a time, and a keystroke answered from stored words
(no model step) returns what a fresh, unpruned search would.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

from rnnlm.bundle import LEXICON_FILE, BundleError, add_lexicon, load_manifest
from rnnlm.cli import main
from server.bundle import load_bundle
from server.engine import Engine, EngineConfig
from server.requests import Extension, State
from server.sampling import SamplingParams
from server.text import TextCodec
from server.typing import Ask, Memory, predict_words
from server.word_search import (
    NextLogprobs,
    lexicon_of,
    piece_table,
    read_lexicon,
    search,
    search_context,
)
from server.words import Filters, Matcher, WordSettings, logaddexp, logsumexp, logsumexp_rows

CONTEXT = "the cat sees the "
# Words of the tiny corpus and two it never has; "the", "moon" and "man" are left out.
T = TypeVar("T")
LEXICON = "# test lexicon\nball\nboat\nbird\ntree\nriver\nred\nsmall\nthee\nthen\nmy\na\n"


@pytest.fixture(scope="module")
def bundle_dir(
    tiny_bundle_factory: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("lexicon") / "char"
    shutil.copytree(tiny_bundle_factory("gru", "char"), out)
    add_lexicon(out, LEXICON)
    return out


_LOOP: asyncio.AbstractEventLoop | None = None  # the engine fixture's event loop


@pytest.fixture(scope="module")
def engine(bundle_dir: Path) -> Iterator[Engine]:
    global _LOOP
    _LOOP = asyncio.new_event_loop()
    engine = Engine(load_bundle(bundle_dir), EngineConfig(state_cache_bytes=0))
    _LOOP.run_until_complete(engine.start())
    yield engine
    _LOOP.run_until_complete(engine.close())
    _LOOP.close()
    _LOOP = None


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    assert _LOOP is not None
    return _LOOP.run_until_complete(coroutine)


def _exact(engine: Engine, codec: TextCodec, word: str) -> float:
    """A word's log-probability after CONTEXT, one context at a time: its characters', then
    the boundary tokens' total."""
    table = piece_table(codec, True)
    ids = codec.encode(CONTEXT)
    total = 0.0
    for ch in word:
        row = _run(engine.next_token_logprobs(ids))
        (i,) = codec.encode(ch)
        total += float(row[i])
        ids = [*ids, i]
    row = _run(engine.next_token_logprobs(ids))
    end = np.logaddexp.reduce(row[table.boundary].astype(np.float64))
    return total + float(end)


def test_the_bundle_carries_its_lexicon(bundle_dir: Path, tmp_path: Path) -> None:
    assert load_manifest(bundle_dir).lexicon_file == LEXICON_FILE
    lexicon = read_lexicon(load_bundle(bundle_dir).lexicon)
    assert lexicon is not None and "thee" in lexicon.words and "the" not in lexicon.words
    assert read_lexicon("# only a comment\n\n") is None
    broken = tmp_path / "broken"
    shutil.copytree(bundle_dir, broken)
    manifest = json.loads((broken / "manifest.json").read_text(encoding="utf-8"))
    del manifest["files"][LEXICON_FILE]
    (broken / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(BundleError, match="lexicon"):
        load_manifest(broken)


def _whole_contexts(engine: Engine) -> NextLogprobs:
    """The search's engine calls as an engine in another process makes them: every
    hypothesis a whole context, no state kept."""

    async def call(items: list[np.ndarray | Extension]) -> list[tuple[np.ndarray, State | None]]:
        contexts = [item for item in items if not isinstance(item, Extension)]
        assert len(contexts) == len(items)
        return [(row, None) for row in await engine.next_token_logprobs_many(contexts)]

    return call


@pytest.mark.parametrize("states", [True, False], ids=["states", "contexts"])
@pytest.mark.parametrize("partial", ["", "t", "b", "r"])
def test_a_lexicon_search_returns_the_likeliest_lexicon_words_exactly(
    engine: Engine, partial: str, states: bool
) -> None:
    """With a width above the vocabulary the search is exact: its k words are the k likeliest
    lexicon words that match, each with its model probability; whether it steps its
    hypotheses from their parents' states or sends their whole contexts."""
    codec = TextCodec(engine.bundle)
    table = piece_table(codec, True, engine.bundle.lexicon)
    lexicon = read_lexicon(engine.bundle.lexicon)
    assert table.lexicon is lexicon is not None
    settings = WordSettings(width=512, budget_ms=60_000.0)
    match = Matcher(partial, True)
    ids = codec.encode(CONTEXT)
    step = engine.next_token_states_many if states else _whole_contexts(engine)
    result = _run(search(step, ids, table, False, match, Filters(), settings, 3))
    found = {w.text: w.logprob for w in result.words}
    assert found and set(found) <= lexicon.words
    exact = {w: _exact(engine, codec, w) for w in lexicon.words if w.startswith(partial)}
    for word, logprob in found.items():
        assert math.isclose(logprob, exact[word], rel_tol=1e-4, abs_tol=1e-4), word
    top = sorted(exact, key=lambda w: -exact[w])[:3]
    assert sorted(found, key=lambda w: -found[w])[: len(top)] == top


def test_a_keystroke_answered_from_stored_words_equals_a_fresh_search(engine: Engine) -> None:
    """A narrow search leaves hypotheses behind; a keystroke that filters the stored words
    (no model step) must return what an unpruned search returns for the same letters."""
    codec = TextCodec(engine.bundle)
    ids = codec.encode(CONTEXT)
    narrow = WordSettings(width=2, budget_ms=60_000.0)
    wide = WordSettings(width=512, budget_ms=60_000.0)
    memory = Memory()
    filtered = 0
    for typed in ("t", "th", "the", "thee"):
        match = Matcher(typed, True)
        got = _run(
            predict_words(engine, ids, False, Ask(codec, 2, match, Filters(), narrow, memory)),
        )
        assert {s.text for s in got.suggestions} <= {"thee", "then", "tree"}
        if got.steps:
            continue
        filtered += 1
        fresh = _run(
            predict_words(engine, ids, False, Ask(codec, 2, match, Filters(), wide, Memory())),
        )
        assert [(s.text, round(s.probability, 6)) for s in got.suggestions] == [
            (s.text, round(s.probability, 6)) for s in fresh.suggestions
        ]
    assert filtered >= 1  # a lexicon leaves few words per letter: later keystrokes filter


def test_export_writes_the_words_of_a_text_as_the_lexicon(
    tiny_checkpoint_factory: Callable[..., Path],
    tiny_corpus: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    checkpoint = str(tiny_checkpoint_factory("gru", "char"))
    out = tmp_path / "bundle"
    assert main(["export", checkpoint, str(out), "--lexicon", str(tiny_corpus)]) == 0
    text = load_bundle(out).lexicon
    assert text == lexicon_of(tiny_corpus.read_text(encoding="utf-8"))
    assert text.splitlines()[:3] == ["a", "ball", "bird"]  # sorted, punctuation left out
    assert lexicon_of("O'er the hill_top, 'tis Été.") == "'tis\nO'er\nhill\nthe\ntop\nÉté\n"
    missing = tmp_path / "missing.txt"
    assert main(["export", checkpoint, str(tmp_path / "bad"), "--lexicon", str(missing)]) == 2
    assert "--lexicon" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_a_bpe_search_finds_only_lexicon_words(
    tiny_bundle_factory: Callable[..., Path], tmp_path: Path
) -> None:
    """BPE pieces span several letters and a word start carries its space: the lexicon is
    checked on the word they spell."""
    out = tmp_path / "bpe"
    shutil.copytree(tiny_bundle_factory("rnn_tanh", "bpe"), out)
    add_lexicon(out, "tree\nthee\nsmall\nsees\n")

    async def main() -> list[str]:
        engine = Engine(load_bundle(out), EngineConfig(state_cache_bytes=0))
        await engine.start()
        try:
            codec = TextCodec(engine.bundle)
            context, after_space = search_context(codec, CONTEXT)
            assert after_space
            settings = WordSettings(width=512, budget_ms=60_000.0)
            ask = Ask(codec, 3, Matcher("", True), Filters(), settings, Memory())
            got = await predict_words(engine, codec.encode(context), after_space, ask)
            return [s.text for s in got.suggestions]
        finally:
            await engine.close()

    words = asyncio.run(main())
    assert words and set(words) <= {"tree", "thee", "small", "sees"}


@pytest.mark.parametrize("lexicon", [False, True])
def test_every_keystroke_answered_from_stored_words_is_exact(
    tiny_bundle_factory: Callable[..., Path], tmp_path: Path, lexicon: bool
) -> None:
    """Typing words letter by letter after several contexts, with a narrow search: whenever a
    keystroke costs no model step, its suggestions are those of an unpruned search."""
    out = tmp_path / "char"
    shutil.copytree(tiny_bundle_factory("gru", "char"), out)
    if lexicon:
        add_lexicon(out, LEXICON)
    cases = [("the cat sees the ", "tree"), ("a dog ", "follows"), ("my friend hears ", "the")]

    async def main() -> tuple[int, int]:
        engine = Engine(load_bundle(out), EngineConfig(state_cache_bytes=0))
        await engine.start()
        narrow = WordSettings(width=2, budget_ms=60_000.0)
        wide = WordSettings(width=512, budget_ms=60_000.0)
        filtered = compared = 0
        try:
            codec = TextCodec(engine.bundle)
            for context, word in cases:
                ids, memory = codec.encode(context), Memory()
                for n in range(len(word) + 1):
                    args = (codec, 3, Matcher(word[:n], True), Filters())
                    got = await predict_words(engine, ids, False, Ask(*args, narrow, memory))
                    if got.steps:
                        continue
                    filtered += 1
                    fresh = await predict_words(engine, ids, False, Ask(*args, wide, Memory()))
                    shown = [(s.text, round(s.probability, 6)) for s in got.suggestions]
                    compared += shown == [
                        (s.text, round(s.probability, 6)) for s in fresh.suggestions
                    ]
        finally:
            await engine.close()
        return filtered, compared

    filtered, compared = asyncio.run(main())
    assert filtered >= 1 and compared == filtered


@pytest.mark.parametrize("busy", [False, True])
def test_a_state_extended_by_a_token_equals_the_whole_context(bundle_dir: Path, busy: bool) -> None:
    """`next_token_states_many`: a context's log-probs and state, then extensions of that
    state by one token each (run inline when idle; through the workers with a long feed
    beside them while a generation runs), equal the whole contexts' log-probs; extensions are
    not cached, and a token outside the vocabulary is refused."""
    bundle = load_bundle(bundle_dir)
    context = TextCodec(bundle).encode(CONTEXT)
    long = [*context, *TextCodec(bundle).encode(" the dog likes the red ball")] if busy else []

    async def main() -> tuple[list[np.ndarray], list[np.ndarray], int, int]:
        engine = Engine(bundle, EngineConfig())
        await engine.start()
        try:
            stream = engine.generate([3], 200, SamplingParams(temperature=1.0, seed=1))
            if busy:
                await anext(stream)  # a generation keeps the workers busy meanwhile
            ((row, state),) = await engine.next_token_states_many([np.array(context)])
            cached = len(engine.cache)
            items = [Extension(state, (t,)) for t in (3, 4, 5)]
            beside = [np.array(long)] if long else []
            stepped = await engine.next_token_states_many([*items, np.array(context), *beside])
            grand = await engine.next_token_states_many([Extension(stepped[0][1], (6,))])
            # Several tokens at once: the state after the context, two tokens further.
            ((pair, _),) = await engine.next_token_states_many([Extension(state, (3, 6))])
            with pytest.raises(ValueError, match="outside the vocabulary"):
                await engine.next_token_states_many([Extension(state, (bundle.vocab_size,))])
            with pytest.raises(ValueError, match="token -1 is outside the vocabulary"):
                await engine.next_token_states_many([Extension(state, (3, -1))])
            with pytest.raises(ValueError, match="at least one token"):
                await engine.next_token_states_many([Extension(state, ())])
            after = len(engine.cache) - len(beside)  # the long context was cached
            await stream.aclose()
            whole = [[*context, t] for t in (3, 4, 5)] + [context, [*context, 3, 6]]
            expected = [await engine.next_token_logprobs(c) for c in whole]
            got = [r for r, _ in stepped[:4]] + [grand[0][0]]
            np.testing.assert_allclose(pair, expected[-1], rtol=1e-5, atol=1e-6)
            assert np.array_equal(stepped[3][0], row)  # the context itself: from the cache
            return got, expected, cached, after
        finally:
            await engine.close()

    got, expected, cached, after = asyncio.run(main())
    assert after == cached  # the extensions added no entry to the state cache
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (-1.5, -2.25),
        (-2.25, -1.5),
        (-3.0, -3.0),
        (0.0, -40.0),
        (-math.inf, -0.5),
        (-0.5, -math.inf),
        (-math.inf, -math.inf),
        (-700.0, -701.0),
    ],
)
def test_the_scalar_logaddexp_is_numpys(a: float, b: float) -> None:
    """The words' scalar log-add-exp (numpy's costs a microsecond on Python floats) gives
    numpy's result, to the last bits, and -inf for two -infs."""
    assert logaddexp(a, b) == pytest.approx(float(np.logaddexp(a, b)), rel=1e-15, abs=0.0)


def test_the_rows_logsumexp_is_each_rows_logsumexp() -> None:
    """The search's ends, a row of boundary log-probs each, are summed as `logsumexp` sums one
    row: finite rows, a row of -infs, a row holding +inf, and rows with no columns."""
    rows = np.array(
        [[-1.0, -2.5, -0.25], [-math.inf] * 3, [-3.0, math.inf, -1.0], [-700.0, -701.0, -800.0]],
        dtype=np.float32,
    )
    got = logsumexp_rows(rows)
    for row, value in zip(rows, got, strict=True):
        assert value == pytest.approx(logsumexp(row), rel=1e-12)
    assert logsumexp_rows(rows[:, :0]).tolist() == [-math.inf] * len(rows)
