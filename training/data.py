"""Corpus to BPTT batches: read and split the text, encode it, lay it out as parallel streams.

The token stream of a split is cut into `batch_size` contiguous streams (rows of a
`[batch_size, n]` tensor; the pytorch/examples word_language_model calls them columns). Window
`i` of the training loop is `tokens[:, i*bptt : i*bptt + bptt]` and its targets are the same
window shifted by one, so each row reads on where the previous window stopped: that is what lets
the trainer carry the recurrent state from one window to the next.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import Tensor


class CorpusError(Exception):
    """A corpus file is missing, unreadable, empty or too short; the message names it."""


SPLITS = ("lines", "nanogpt")
NANOGPT_TRAIN_FRACTION = 0.9


@dataclass(frozen=True)
class Corpus:
    """The three splits as text and a hash of the raw bytes.

    Split by lines, every line of a split ends in "\\n". The nanoGPT split cuts the characters
    wherever 90% falls, so its training text may end, and its validation text begin, mid-line;
    it has no test split: `test` is the validation text (`test_is_valid`).
    """

    train: str
    valid: str
    test: str
    sha256: str
    sources: dict[str, str]  # split -> the file (and line or character range) it came from
    test_is_valid: bool = False


def read_text(path: Path, flag: str) -> bytes:
    """The bytes of a corpus file; errors name the option and the file."""
    path = Path(path)
    if not path.exists():
        raise CorpusError(f"{flag} {path}: no such file")
    if not path.is_file():
        raise CorpusError(f"{flag} {path}: not a regular file")
    try:
        return path.read_bytes()
    except OSError as e:
        raise CorpusError(f"{flag} {path}: cannot be read ({e.strerror})") from e


def decode_text(data: bytes, flag: str, path: Path) -> str:
    """UTF-8 text, "\\r\\n" read as "\\n" (as Python's text mode reads it); empty is an error."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{flag} {path}: not UTF-8 text (bad byte at offset {e.start})") from e
    if not text.strip():
        raise CorpusError(f"{flag} {path}: the file is empty (no text to train on)")
    return text.replace("\r\n", "\n")


def decode_lines(data: bytes, flag: str, path: Path) -> list[str]:
    """UTF-8 text split into lines ("\\r\\n" counts as "\\n"); empty text is an error."""
    text = decode_text(data, flag, path)
    if text.endswith("\n"):
        text = text[:-1]
    return text.split("\n")


def join_lines(lines: list[str]) -> str:
    return "".join(line + "\n" for line in lines)


def split_counts(n_lines: int) -> tuple[int, int, int]:
    """Line counts of train, validation and test: 90/5/5, at least one line each."""
    n_valid = n_test = max(1, round(n_lines * 0.05))
    return n_lines - n_valid - n_test, n_valid, n_test


def nanogpt_split(corpus: Path) -> Corpus:
    """nanoGPT's split: the first 90% of the characters train, the last 10% validate.

    Exactly `n = len(text); train = text[:int(n * 0.9)]; val = text[int(n * 0.9):]`.
    """
    data = read_text(corpus, "--corpus")
    text = decode_text(data, "--corpus", corpus)
    n = len(text)
    cut = int(n * NANOGPT_TRAIN_FRACTION)
    valid = f"{corpus} characters {cut + 1}-{n}"
    return Corpus(
        train=text[:cut],
        valid=text[cut:],
        test=text[cut:],
        sha256=hashlib.sha256(data).hexdigest(),
        sources={"train": f"{corpus} characters 1-{cut}", "valid": valid, "test": valid},
        test_is_valid=True,
    )


def load_corpus(
    corpus: Path | None = None,
    train: Path | None = None,
    valid: Path | None = None,
    test: Path | None = None,
    split: str = "lines",
) -> Corpus:
    """One corpus split by lines (first 90% train, next 5% valid, last 5% test) or by nanoGPT's
    character split, or three files.

    The hash is over the raw bytes of the file, or of the three files in that order.
    """
    if corpus is not None and split == "nanogpt":
        return nanogpt_split(corpus)
    if corpus is not None:
        data = read_text(corpus, "--corpus")
        lines = decode_lines(data, "--corpus", corpus)
        n_train, n_valid, _ = split_counts(len(lines))
        if n_train < 1:
            raise CorpusError(
                f"--corpus {corpus}: {len(lines)} lines is too short; at least 3 are needed to "
                "split it by lines into train, validation and test (90/5/5)"
            )
        a, b = n_train, n_train + n_valid
        return Corpus(
            train=join_lines(lines[:a]),
            valid=join_lines(lines[a:b]),
            test=join_lines(lines[b:]),
            sha256=hashlib.sha256(data).hexdigest(),
            sources={
                "train": f"{corpus} lines 1-{a}",
                "valid": f"{corpus} lines {a + 1}-{b}",
                "test": f"{corpus} lines {b + 1}-{len(lines)}",
            },
        )
    files = {"train": train, "valid": valid, "test": test}
    texts: dict[str, str] = {}
    digest = hashlib.sha256()
    for split, path in files.items():
        assert path is not None, "the caller checks that all three files are given"
        data = read_text(path, f"--{split}")
        texts[split] = join_lines(decode_lines(data, f"--{split}", path))
        digest.update(data)
    return Corpus(
        train=texts["train"],
        valid=texts["valid"],
        test=texts["test"],
        sha256=digest.hexdigest(),
        sources={split: str(path) for split, path in files.items()},
    )


def encode(tokenizer: Tokenizer, text: str) -> Tensor:
    """The token ids of `text` as one int64 stream, eos at every line end.

    Lines are encoded in a batch (in parallel); no kind's tokens cross a line end, so this equals
    encoding the whole text at once. A last line without "\\n" (a nanoGPT split) gets no eos.
    """
    *whole, rest = text.split("\n")
    lines = [line + "\n" for line in whole] + ([rest] if rest else [])
    encodings = tokenizer.encode_batch(lines, add_special_tokens=False)
    ids = [i for encoding in encodings for i in encoding.ids]
    return torch.tensor(ids, dtype=torch.long)


def batchify(data: Tensor, batch_size: int) -> Tensor:
    """Cut a token stream into `batch_size` contiguous rows `[batch_size, n]`; drop the rest."""
    n = data.numel() // batch_size
    return data[: n * batch_size].view(batch_size, n)


def num_windows(streams: Tensor, bptt: int) -> int:
    """How many BPTT windows cover the streams (the last may be shorter than `bptt`)."""
    return -(-(streams.size(1) - 1) // bptt)


def get_batch(streams: Tensor, index: int, bptt: int) -> tuple[Tensor, Tensor]:
    """Window `index`: inputs `[B, T]` and next-token targets `[B, T]`, `T <= bptt`."""
    start = index * bptt
    seq_len = min(bptt, streams.size(1) - 1 - start)
    return streams[:, start : start + seq_len], streams[:, start + 1 : start + 1 + seq_len]


def singletons(ids: Tensor, vocab_size: int, keep: tuple[int | None, ...]) -> Tensor:
    """Bool `[vocab_size]`: the ids that occur exactly once in `ids`, except those in `keep`."""
    once = torch.bincount(ids, minlength=vocab_size) == 1
    for i in keep:
        if i is not None:
            once[i] = False
    return once


def replace_rare(streams: Tensor, rare: Tensor, unk: int, p: float, seed: int) -> Tensor:
    """A copy of `streams` with each token marked in `rare` replaced by `unk` with probability
    `p`, the same way for the same `seed` (so a resumed epoch sees the same text)."""
    draw = torch.rand(streams.shape, generator=torch.Generator().manual_seed(seed))
    hit = rare[streams.cpu()] & (draw < p)
    return torch.where(hit.to(streams.device), unk, streams)
