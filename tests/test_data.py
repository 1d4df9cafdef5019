"""Corpus reading and splitting, encoding, BPTT batching with a contiguous stream, and the
replacement of rare training words by <unk>."""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import pytest
import torch

from training.data import (
    CorpusError,
    batchify,
    encode,
    get_batch,
    load_corpus,
    num_windows,
    replace_rare,
    singletons,
    split_counts,
)
from training.tokenizer import fit_tokenizer, special_tokens


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_split_is_90_5_5_by_lines() -> None:
    assert split_counts(40000) == (36000, 2000, 2000)
    assert split_counts(100) == (90, 5, 5)
    assert split_counts(3) == (1, 1, 1)


def test_load_corpus_splits_lines_in_order_and_hashes_the_bytes(tmp_path: Path) -> None:
    lines = [f"line {i}" for i in range(40)]
    data = ("\r\n".join(lines) + "\r\n").encode()
    path = tmp_path / "c.txt"
    path.write_bytes(data)
    corpus = load_corpus(corpus=path)
    assert corpus.train == "".join(f"{line}\n" for line in lines[:36])
    assert corpus.valid == "line 36\nline 37\n"
    assert corpus.test == "line 38\nline 39\n"
    assert corpus.sha256 == hashlib.sha256(data).hexdigest()


def test_load_corpus_from_three_files(tmp_path: Path) -> None:
    files = {name: _write(tmp_path / f"{name}.txt", f"{name} text\n") for name in ("a", "b", "c")}
    corpus = load_corpus(train=files["a"], valid=files["b"], test=files["c"])
    assert (corpus.train, corpus.valid, corpus.test) == ("a text\n", "b text\n", "c text\n")
    expected = hashlib.sha256(b"a text\nb text\nc text\n").hexdigest()
    assert corpus.sha256 == expected


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "--corpus .*: no such file"),
        (b"", "the file is empty"),
        (b"  \n\n \t\n", "the file is empty"),
        (b"caf\xe9\n", "not UTF-8 text \\(bad byte at offset 3\\)"),
        (b"one\ntwo\n", "2 lines is too short; at least 3 are needed"),
    ],
)
def test_bad_corpus_files(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "corpus.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CorpusError, match=message):
        load_corpus(corpus=path)


def test_a_directory_is_not_a_corpus(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match=r"--valid .*: not a regular file"):
        load_corpus(train=_write(tmp_path / "t.txt", "x\n"), valid=tmp_path, test=tmp_path)


@pytest.mark.parametrize("kind", ["word", "char", "bpe"])
def test_encode_puts_eos_at_every_line_end_and_equals_whole_text_encoding(kind: str) -> None:
    text = "the cat sat .\n\nthe dog ran  \nend\n"
    tok = fit_tokenizer(kind, text * 4, 300 if kind == "bpe" else None)
    ids = encode(tok, text)
    assert ids.dtype == torch.long
    assert ids.tolist() == tok.encode(text).ids
    eos = special_tokens(tok, kind)["eos"]
    assert ids.tolist().count(eos) == 4
    assert ids[-1] == eos


def test_batchify_cuts_the_stream_into_contiguous_rows() -> None:
    data = torch.arange(103)
    streams = batchify(data, 4)
    assert streams.shape == (4, 25)
    for row in range(4):
        assert streams[row].tolist() == list(range(row * 25, row * 25 + 25))


def test_windows_carry_over_the_stream() -> None:
    """Targets are inputs shifted by one, and window i+1 starts where window i's targets end."""
    streams = batchify(torch.arange(4 * 30), 4)
    bptt = 7
    n = num_windows(streams, bptt)
    assert n == 5  # 29 predictions per row: 7 + 7 + 7 + 7 + 1
    windows = [get_batch(streams, i, bptt) for i in range(n)]
    for x, y in windows:
        assert x.shape == y.shape
        assert torch.equal(y[:, :-1], x[:, 1:])
        assert torch.equal(y, x + 1)  # the stream is arange, so the next token is x + 1
    for (_, y_prev), (x_next, _) in itertools.pairwise(windows):
        assert torch.equal(y_prev[:, -1], x_next[:, 0])
    assert windows[-1][0].shape == (4, 1)
    # Every token of each row is predicted exactly once.
    targets = torch.cat([y for _, y in windows], dim=1)
    assert torch.equal(targets, streams[:, 1:])


def test_singletons_are_the_ids_seen_once_except_the_kept_ones() -> None:
    ids = torch.tensor([0, 2, 3, 3, 4, 1, 5])
    once = singletons(ids, 7, keep=(0, 1, None))
    assert once.tolist() == [False, False, True, False, True, True, False]


def test_rare_words_become_unk_at_the_asked_rate_the_same_way_for_a_seed() -> None:
    streams = torch.arange(10).repeat(4, 500)  # [4, 5000]: ids 0-9
    rare = torch.zeros(10, dtype=torch.bool)
    rare[[3, 7]] = True
    once = replace_rare(streams, rare, unk=0, p=0.5, seed=11)
    assert torch.equal(once, replace_rare(streams, rare, unk=0, p=0.5, seed=11))
    assert not torch.equal(once, replace_rare(streams, rare, unk=0, p=0.5, seed=12))
    changed = once != streams
    assert set(streams[changed].tolist()) == {3, 7} and (once[changed] == 0).all()
    assert 0.45 < changed.sum().item() / (rare[streams]).sum().item() < 0.55
    assert torch.equal(replace_rare(streams, rare, unk=0, p=0.0, seed=1), streams)
    assert (replace_rare(streams, rare, unk=0, p=1.0, seed=1)[rare[streams]] == 0).all()
