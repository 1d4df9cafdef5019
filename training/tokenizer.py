"""Fit the three tokenizer kinds on training text, as Hugging Face `tokenizers` files.

Every kind has an end-of-line token `eos` that encoding produces for each "\\n", so the model
learns line structure and the server can condition on it:

- `word`: words and single punctuation characters; "\\n" becomes `<eos>`; words outside the
  vocabulary (capped by frequency) become `<unk>`. Decoding joins words with spaces and turns
  `<eos>` back into a newline.
- `char`: every character is a token, "\\n" included; characters not seen in training (or cut by
  the cap) become `<unk>`. Decoding is the exact inverse for seen characters.
- `bpe`: byte-level BPE (GPT-2 style) over 256 byte symbols, so nothing is unknown; "\\n" is
  always its own token. Decoding is the exact inverse.

`<unk>` and `<eos>` are ordinary vocabulary entries, not "special" added tokens, so that
`tokenizer.decode(ids)` keeps them (the default `skip_special_tokens=True` would drop them).
"""

from __future__ import annotations

from collections import Counter

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

KINDS = ("word", "char", "bpe")
UNK = "<unk>"
EOS_WORD = "<eos>"
# Used when `vocab_size` is None; None means no cap (every seen symbol gets a token).
DEFAULT_VOCAB_SIZES: dict[str, int | None] = {"word": 10000, "char": None, "bpe": 4096}
BYTE_ALPHABET_SIZE = 256

# `<eos>` and `<unk>` stay whole (corpora such as Penn Treebank contain a literal `<unk>`);
# otherwise a token is a run of word characters or one punctuation character.
_WORD_PATTERN = r"<eos>|<unk>|\w+|[^\w\s]"


def _word_tokenizer(vocab: dict[str, int]) -> Tokenizer:
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Replace("\n", f" {EOS_WORD} ")
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(_WORD_PATTERN), behavior="removed", invert=True)
    # WordPiece joins tokens with spaces; then "<eos>" and the spaces around it become "\n".
    tok.decoder = decoders.Sequence(
        [
            decoders.WordPiece(prefix="##", cleanup=False),
            decoders.Fuse(),
            decoders.Replace(f" {EOS_WORD}", EOS_WORD),
            decoders.Replace(f"{EOS_WORD} ", EOS_WORD),
            decoders.Replace(EOS_WORD, "\n"),
        ]
    )
    return tok


def _char_tokenizer(vocab: dict[str, int]) -> Tokenizer:
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return tok


def _capped_vocab(counts: Counter[str], first: list[str], cap: int | None) -> dict[str, int]:
    """`first` at the lowest ids, then the most frequent symbols (ties: first seen) up to `cap`."""
    symbols = list(first)
    for symbol, _ in counts.most_common():
        if cap is not None and len(symbols) >= cap:
            break
        if symbol not in first:
            symbols.append(symbol)
    return {s: i for i, s in enumerate(symbols)}


def fit_tokenizer(kind: str, text: str, vocab_size: int | None = None) -> Tokenizer:
    """Fit a tokenizer of `kind` on `text`; `vocab_size` None takes `DEFAULT_VOCAB_SIZES`."""
    if kind not in KINDS:
        raise ValueError(f"--tokenizer must be one of {', '.join(KINDS)}, not {kind!r}")
    cap = DEFAULT_VOCAB_SIZES[kind] if vocab_size is None else vocab_size
    if kind == "word":
        if cap is not None and cap < 3:
            raise ValueError(
                f"--vocab-size must be at least 3 for word (<unk>, <eos>, a word), not {cap}"
            )
        tok = _word_tokenizer({UNK: 0, EOS_WORD: 1})
        normalized = tok.normalizer.normalize_str(text)
        words = Counter(w for w, _ in tok.pre_tokenizer.pre_tokenize_str(normalized))
        return _word_tokenizer(_capped_vocab(words, [UNK, EOS_WORD], cap))
    if kind == "char":
        if cap is not None and cap < 2:
            raise ValueError(
                f"--vocab-size must be at least 2 for char (<unk>, newline), not {cap}"
            )
        return _char_tokenizer(_capped_vocab(Counter(text), [UNK, "\n"], cap))
    if cap is None or cap < BYTE_ALPHABET_SIZE:
        raise ValueError(
            f"--vocab-size must be at least {BYTE_ALPHABET_SIZE} for bpe (the byte alphabet), "
            f"not {cap}"
        )
    tok = Tokenizer(models.BPE())
    # "\n" is split off first so that it is always exactly one token: the eos token.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("\n", behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cap,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer)
    return tok


def special_tokens(tokenizer: Tokenizer, kind: str) -> dict[str, int | None]:
    """The ids of `unk` (None for bpe, where every byte has a token) and `eos`."""
    if kind == "word":
        unk, eos = tokenizer.token_to_id(UNK), tokenizer.token_to_id(EOS_WORD)
    elif kind == "char":
        unk, eos = tokenizer.token_to_id(UNK), tokenizer.token_to_id("\n")
    elif kind == "bpe":
        unk = None
        (eos,) = tokenizer.encode("\n").ids
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {', '.join(KINDS)}")
    if eos is None or (kind != "bpe" and unk is None):
        raise ValueError(f"the {kind} tokenizer has no <unk> or end-of-line token")
    return {"unk": unk, "eos": eos}
