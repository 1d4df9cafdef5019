"""Encoding a text that extends a recent one from near its end gives the whole text's ids."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from server import prefix_encoder
from server.prefix_encoder import MIN_CHARS, Encoded, PrefixEncoder
from training.tokenizer import fit_tokenizer

# Awkward pieces: double spaces, tabs, newlines, punctuation, contractions, accents, the
# word-level tokenizer's own "<eos>" and "<unk>", and words it never saw.
PIECES = ["the", " ", "  ", "\n", "\t", ".", ",", "'s", "cat", "<eos>", "<unk>", "é", "zzyzx"]


def whole(tokenizer: Tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False).ids)


@pytest.fixture(scope="module")
def corpus(tiny_corpus: Path) -> str:
    return tiny_corpus.read_text(encoding="utf-8")


@pytest.fixture(scope="module", params=["word", "char", "bpe"])
def tokenizer(request: pytest.FixtureRequest, corpus: str) -> Tokenizer:
    return fit_tokenizer(request.param, corpus, 300 if request.param == "bpe" else None)


def test_growing_texts_encode_as_whole_texts(tokenizer: Tokenizer, corpus: str) -> None:
    encoder = PrefixEncoder(tokenizer)
    assert encoder.enabled
    rng = random.Random(0)
    for _ in range(40):
        start = rng.randrange(len(corpus) // 2)
        text = corpus[start : start + rng.randrange(MIN_CHARS, 2 * MIN_CHARS)]
        for _ in range(6):  # the typing pattern: the same text, a little longer each time
            text += "".join(rng.choice(PIECES) for _ in range(rng.randrange(1, 4)))
            assert encoder.encode(text) == whole(tokenizer, text), repr(text[-40:])


def test_extensions_cut_anywhere_encode_as_whole_texts(tokenizer: Tokenizer) -> None:
    encoder = PrefixEncoder(tokenizer)
    rng = random.Random(1)
    for _ in range(60):
        text = "".join(rng.choice(PIECES) for _ in range(MIN_CHARS))
        for cut in (len(text) - 1, len(text) - 5, len(text) - 17):
            encoder.encode(text[:cut])
            assert encoder.encode(text) == whole(tokenizer, text)


def test_a_session_extends_its_own_encoding_as_whole_texts(
    tokenizer: Tokenizer, corpus: str
) -> None:
    """`extend` from the session's last result equals encoding the whole text, for short and
    long texts, with nothing remembered in the shared memory of `encode`; a text that does not
    extend the last one (a reset) is encoded whole."""
    encoder = PrefixEncoder(tokenizer)
    rng = random.Random(2)
    for _ in range(30):
        start = rng.randrange(len(corpus) // 2)
        text = corpus[start : start + rng.randrange(0, 2 * MIN_CHARS)]
        known: Encoded | None = None
        for _ in range(8):  # the typing pattern: a word or a separator more each event
            text += "".join(rng.choice(PIECES) for _ in range(rng.randrange(1, 4)))
            known = encoder.extend(known, text)
            assert known.text == text
            assert known.ids == whole(tokenizer, text), repr(text[-40:])
        longer = text + " cat"
        restart = known.entry.restart_char  # only from there on
        assert encoder.chars_to_encode(known, longer) == len(longer) - restart
        other = corpus[:MIN_CHARS]
        assert encoder.chars_to_encode(known, other) == len(other)  # not an extension: all
        assert encoder.extend(known, other).ids == whole(tokenizer, other)
    assert not encoder._entries  # nothing went through the shared memory of `encode`


def test_a_session_never_changes_the_ids_it_extends(tokenizer: Tokenizer, corpus: str) -> None:
    encoder = PrefixEncoder(tokenizer)
    first = encoder.extend(None, corpus[:MIN_CHARS])
    before = list(first.ids)
    encoder.extend(first, corpus[: MIN_CHARS + 40])
    assert first.ids == before


def test_results_are_fresh_lists(tokenizer: Tokenizer, corpus: str) -> None:
    encoder = PrefixEncoder(tokenizer)
    text = corpus[: 2 * MIN_CHARS]
    first = encoder.encode(text)
    first.clear()
    assert encoder.encode(text) == whole(tokenizer, text)


def test_short_texts_are_not_remembered(tokenizer: Tokenizer) -> None:
    encoder = PrefixEncoder(tokenizer)
    assert encoder.encode("the cat") == whole(tokenizer, "the cat")
    assert len(encoder._entries) == 0


def test_memory_stays_bounded(
    tokenizer: Tokenizer, corpus: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prefix_encoder, "MAX_ENTRIES", 5)
    encoder = PrefixEncoder(tokenizer)
    for start in range(0, 600, 10):
        encoder.encode(corpus[start : start + MIN_CHARS + 20])
    assert len(encoder._entries) == 5
    assert sum(encoder._lengths.values()) == 5
    assert encoder._tokens == sum(len(e.ids) for e in encoder._entries.values())


def test_tokenizers_it_cannot_vouch_for_are_encoded_whole(corpus: str) -> None:
    vocab = {"[UNK]": 0, "▁the": 1, "▁cat": 2}
    metaspace = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    metaspace.pre_tokenizer = pre_tokenizers.Metaspace()  # prefixes the first word only
    assert not PrefixEncoder(metaspace).enabled
    added = fit_tokenizer("word", corpus)
    added.add_special_tokens(["<special>"])
    encoder = PrefixEncoder(added)
    assert not encoder.enabled
    text = "the cat <special> sees " * 30
    assert encoder.encode(text) == whole(added, text)


def test_long_texts_are_encoded_in_pieces_as_whole_texts(
    tokenizer: Tokenizer, corpus: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prefix_encoder, "PIECE_CHARS", 300)
    encoder = PrefixEncoder(tokenizer)
    rng = random.Random(2)
    for _ in range(20):
        text = corpus * 2 + "".join(rng.choice(PIECES) for _ in range(rng.randrange(900)))
        assert encoder.encode(text) == whole(tokenizer, text)
    assert len(encoder._entries) == 0  # documents are not remembered
    unbroken = "x" * 1000  # no place to cut: encoded whole
    assert encoder.encode(unbroken) == whole(tokenizer, unbroken)
