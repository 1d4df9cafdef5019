"""A word model's unknown words: the words of its training text it learned as `<unk>`.

These are the words outside its vocabulary and, with `--unk-replace P`, the vocabulary's words
seen once (training replaced them by `<unk>` with probability P, so their own tokens learned
next to nothing: counted P times here). `rnnlm export --unknown-words FILE` writes them into
the bundle as `unknown_words.txt` (one `word<TAB>count` a line, the most frequent first), with
`unk_tokens` in the manifest: the `<unk>` tokens the model learned from in FILE, which is its
training text (training/data.py `replace_rare`). The server
suggests these words with `<unk>`'s probability times count / unk_tokens (server/oov_words.py).

For a bundle already written (its tokenizer and manifest give the vocabulary and P):

    python -m exporter.unknown_words BUNDLE_DIR TRAINING_TEXT
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter
from pathlib import Path

from tokenizers import Tokenizer

from rnnlm.bundle import BundleError, add_unknown_words, read_manifest
from server.words import is_word


class UnknownWordsError(Exception):
    """The unknown words cannot be made for this model or text."""


def unknown_words_of(
    tokenizer: Tokenizer, specials: dict[str, int], text: str, unk_replace: float
) -> tuple[str, int]:
    """The unknown-words file of `text` for a word model (its `tokenizer` and special token
    ids), and the `<unk>` tokens it learned from there with `--unk-replace unk_replace`."""
    if "unk" not in specials:
        raise UnknownWordsError("the model's tokenizer has no <unk> token")
    if not 0 <= unk_replace <= 1:
        raise UnknownWordsError(f"unk_replace must be in [0, 1], not {unk_replace}")
    vocab = tokenizer.get_vocab()
    pieces = _pieces(tokenizer, text)
    unknown = Counter(p for p in pieces if p not in vocab)
    known = Counter(p for p in pieces if p in vocab)
    special = set(specials.values())
    seen_once = sum(1 for p, n in known.items() if n == 1 and vocab[p] not in special)
    unk_tokens = sum(unknown.values()) + known.get(_text_of(tokenizer, specials["unk"]), 0)
    unk_tokens += math.ceil(unk_replace * seen_once)  # whole tokens, at least the counts
    counts: dict[str, float] = {w: n for w, n in unknown.items() if is_word(w)}
    if unk_replace > 0:  # the vocabulary's words seen once, as often as they were <unk>
        counts |= {p: unk_replace for p, n in known.items() if n == 1 and vocab[p] not in special}
    words = sorted(((w, n) for w, n in counts.items() if is_word(w)), key=lambda x: (-x[1], x[0]))
    if not words:
        raise UnknownWordsError("the text has no word the model learned as <unk>")
    return "".join(f"{w}\t{n:g}\n" for w, n in words), unk_tokens


def _pieces(tokenizer: Tokenizer, text: str) -> list[str]:
    """`text` split as the word tokenizer splits it: one piece per token."""
    normalizer, pre = tokenizer.normalizer, tokenizer.pre_tokenizer
    if tokenizer.model.__class__.__name__ != "WordLevel" or pre is None:
        raise UnknownWordsError("unknown words are for word-level tokenizers only")
    normalized = normalizer.normalize_str(text) if normalizer is not None else text
    return [piece for piece, _ in pre.pre_tokenize_str(normalized)]


def _text_of(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.id_to_token(token_id) or ""


def add_to_bundle(bundle_dir: Path, text: str) -> int:
    """Add the unknown words of `text` (the model's training text) to a written bundle; the
    number of words written."""
    manifest = read_manifest(bundle_dir)
    if manifest.get("tokenizer", {}).get("kind") != "word":
        raise UnknownWordsError(f"{bundle_dir}: unknown words are for word models only")
    tokenizer = Tokenizer.from_file(str(bundle_dir / manifest["tokenizer"]["file"]))
    specials = manifest["tokenizer"].get("special_tokens", {})
    unk_replace = manifest.get("provenance", {}).get("train_args", {}).get("unk_replace") or 0.0
    words, unk_tokens = unknown_words_of(tokenizer, specials, text, float(unk_replace))
    add_unknown_words(bundle_dir, words, unk_tokens)
    return words.count("\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle_dir", type=Path, metavar="BUNDLE_DIR")
    parser.add_argument("text", type=Path, metavar="TRAINING_TEXT")
    args = parser.parse_args(argv)
    try:
        count = add_to_bundle(args.bundle_dir, args.text.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, UnknownWordsError, BundleError) as e:
        print(f"unknown words: error: {' '.join(str(e).split())[:300]}", file=sys.stderr)
        return 2
    print(f"{args.bundle_dir}: {count} unknown words")
    return 0


if __name__ == "__main__":
    sys.exit(main())
