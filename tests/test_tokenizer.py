"""The three tokenizer kinds: eos at line ends, unk, the vocabulary cap, decode, save/load."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer

from training.tokenizer import fit_tokenizer, special_tokens

TEXT = (
    "The cat sat on the mat.\n"
    "\n"
    "The dog, it's said, ran to the cat...\n"
    "Où est le café ? the cat asked.\n"
)


def _eos(tok: Tokenizer, kind: str) -> int:
    eos = special_tokens(tok, kind)["eos"]
    assert eos is not None
    return eos


def _round_trip(tok: Tokenizer, text: str) -> str:
    return tok.decode(tok.encode(text).ids)


def test_word_level_splits_punctuation_and_marks_line_ends() -> None:
    tok = fit_tokenizer("word", TEXT, None)
    special = special_tokens(tok, "word")
    assert special == {"unk": tok.token_to_id("<unk>"), "eos": tok.token_to_id("<eos>")}
    enc = tok.encode("The cat sat.\nThe dog, ran\n")
    assert enc.tokens == ["The", "cat", "sat", ".", "<eos>", "The", "dog", ",", "ran", "<eos>"]
    assert enc.ids.count(_eos(tok, "word")) == 2
    # An empty line is a lone eos.
    assert tok.encode("a\n\nb").tokens.count("<eos>") == 2


def test_word_level_decode_joins_words_and_restores_newlines() -> None:
    tok = fit_tokenizer("word", TEXT, None)
    assert _round_trip(tok, "The cat sat on the mat.\n\nThe dog ran\n") == (
        "The cat sat on the mat .\n\nThe dog ran\n"
    )
    assert tok.decode([_eos(tok, "word")]) == "\n"


def test_word_level_unknown_words_become_unk() -> None:
    tok = fit_tokenizer("word", TEXT, None)
    unk = special_tokens(tok, "word")["unk"]
    enc = tok.encode("the zebra sat\n")
    assert enc.ids[1] == unk
    assert _round_trip(tok, "the zebra sat\n") == "the <unk> sat\n"
    # A literal <unk> in a corpus (Penn Treebank has them) is the unk token, not "<", "unk", ">".
    assert tok.encode("the <unk> sat").ids[1] == unk


def test_word_level_vocabulary_cap_keeps_the_most_frequent() -> None:
    tok = fit_tokenizer("word", TEXT, 5)
    vocab = tok.get_vocab()
    assert tok.get_vocab_size() == 5
    # <unk> and <eos> first, then "the" (5 times), "cat" (3) and "." (4 as a token).
    assert set(vocab) == {"<unk>", "<eos>", "the", "cat", "."}
    assert tok.encode("The dog").tokens == ["<unk>", "<unk>"]


def test_char_level_round_trips_exactly() -> None:
    tok = fit_tokenizer("char", TEXT, None)
    eos = _eos(tok, "char")
    assert tok.id_to_token(eos) == "\n"
    assert tok.get_vocab_size() == len(set(TEXT)) + 1  # every character, plus <unk>
    assert _round_trip(tok, TEXT) == TEXT
    enc = tok.encode("at\n\n")
    assert enc.tokens == ["a", "t", "\n", "\n"]
    assert enc.ids[-2:] == [eos, eos]


def test_char_level_unseen_characters_become_unk_and_the_cap_applies() -> None:
    tok = fit_tokenizer("char", TEXT, None)
    unk = special_tokens(tok, "char")["unk"]
    assert tok.encode("a€z").ids == [tok.token_to_id("a"), unk, unk]
    capped = fit_tokenizer("char", TEXT, 4)
    assert set(capped.get_vocab()) == {"<unk>", "\n", " ", "t"}


def test_bpe_round_trips_exactly_and_has_no_unk() -> None:
    tok = fit_tokenizer("bpe", TEXT * 3, 300)
    special = special_tokens(tok, "bpe")
    assert special["unk"] is None
    assert 256 <= tok.get_vocab_size() <= 300
    unseen = "Zebras ☃ and emoji 🦓 were never seen\n\n  \n"
    for text in (TEXT, unseen):
        assert _round_trip(tok, text) == text


def test_bpe_newline_is_always_one_eos_token() -> None:
    tok = fit_tokenizer("bpe", ("line one  \n\n\nline two\n" * 20), 300)
    eos = _eos(tok, "bpe")
    ids = tok.encode("a  \n\n\nb\n").ids
    assert ids.count(eos) == 4
    assert tok.decode([eos]) == "\n"


def test_save_and_load_keep_encoding_and_decoding(tmp_path: Path) -> None:
    for kind, size in (("word", None), ("char", None), ("bpe", 300)):
        tok = fit_tokenizer(kind, TEXT, size)
        path = tmp_path / f"{kind}.json"
        tok.save(str(path))
        loaded = Tokenizer.from_file(str(path))
        assert loaded.encode(TEXT).ids == tok.encode(TEXT).ids
        assert loaded.decode(tok.encode(TEXT).ids) == _round_trip(tok, TEXT)
        assert special_tokens(loaded, kind) == special_tokens(tok, kind)


@pytest.mark.parametrize(
    ("kind", "size", "message"),
    [
        ("sentencepiece", None, "--tokenizer must be one of word, char, bpe"),
        ("word", 2, "--vocab-size must be at least 3 for word"),
        ("char", 1, "--vocab-size must be at least 2 for char"),
        ("bpe", 100, "--vocab-size must be at least 256 for bpe"),
    ],
)
def test_bad_kind_or_vocabulary_size(kind: str, size: int | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fit_tokenizer(kind, TEXT, size)
