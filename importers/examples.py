"""`rnnlm import pytorch-examples`: a pytorch/examples `word_language_model` checkpoint.

The checkpoint is what its `main.py --save` writes, `torch.save(model)` of its `RNNModel`
(LSTM, GRU, RNN_TANH or RNN_RELU, tied or not), or a `state_dict` of one. It is read with
`importers.safe_load`: `model.RNNModel` is rebuilt as a stand-in module, only for its tensors and
`rnn_type`, and only the torch.nn classes an `RNNModel` holds are allowed.

The vocabulary is rebuilt as its `data.Corpus` builds it: over train.txt, valid.txt and
test.txt in that order, each line split on whitespace (`str.split()`) and followed by `<eos>`,
ids by first appearance. The bundle's tokenizer reproduces those ids (checked on the data before
anything is written): a line end is `<eos>`, words split on exactly Python's whitespace, and
`<unk>`, when the corpus has it (Penn Treebank and WikiText do), takes unknown words.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from torch import Tensor, nn

from importers.errors import ImportFailure
from importers.safe_load import load_allowed
from importers.torch_source import build_source, export_graphs, infer_shape, is_tied, to_rnnlm
from importers.write import Imported, source_record
from rnnlm.bundle import sha256_file
from training.tokenizer import EOS_WORD, UNK, _word_tokenizer

SPLITS = ("train.txt", "valid.txt", "test.txt")
FORMAT = "pytorch-examples"
RNN_TYPES = {"LSTM": "lstm", "GRU": "gru", "RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu"}
# Every character Python's str.split() splits on, so the tokenizer splits as the Corpus does.
PY_WHITESPACE = "".join(chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace())
# The corpus's text checked against the tokenizer (characters per split).
CHECK_CHARS = 4 << 20


class RNNModelStandIn(nn.Module):
    """Stands for pytorch/examples' `model.RNNModel` while unpickling: nn.Module's own
    `__setstate__` fills in the attributes; none of the source's methods exist here."""


def _allowed() -> dict[str, Any]:
    classes: list[type] = [nn.Dropout, nn.Embedding, nn.Linear, nn.LSTM, nn.GRU, nn.RNN]
    allowed: dict[str, Any] = {f"{c.__module__}.{c.__qualname__}": c for c in classes}
    allowed["model.RNNModel"] = RNNModelStandIn
    allowed["__main__.RNNModel"] = RNNModelStandIn  # when main.py defined the class itself
    return allowed


def read_checkpoint(path: Path, cell: str | None) -> tuple[dict[str, Tensor], str, str]:
    """(state_dict, cell, what the file held) of a saved `RNNModel` or its `state_dict`."""
    obj = load_allowed(path, _allowed(), "pytorch/examples word_language_model checkpoint")
    if isinstance(obj, RNNModelStandIn):
        state = module_tensors(obj)
        rnn_type = obj.__dict__.get("rnn_type")
        if isinstance(rnn_type, str) and rnn_type in RNN_TYPES:
            declared = RNN_TYPES[rnn_type]
            if cell is not None and cell != declared:
                raise ImportFailure(f"{path}: --cell {cell} but the model says {rnn_type}")
            cell = declared
        return state, str(infer_shape(state, cell)["cell"]), "torch.save(model)"
    if isinstance(obj, Mapping) and all(isinstance(v, Tensor) for v in obj.values()):
        state = {str(k): v for k, v in obj.items()}
        return state, str(infer_shape(state, cell)["cell"]), "state_dict"
    raise ImportFailure(f"{path}: holds a {type(obj).__name__}, not an RNNModel or its state_dict")


def module_tensors(module: nn.Module, prefix: str = "") -> dict[str, Tensor]:
    """A unpickled module's parameters and buffers by state_dict name, read from its
    attributes only (no method of it runs: no state_dict hooks a pickle could have set)."""
    found: dict[str, Tensor] = {}
    attrs = vars(module)
    for table in ("_parameters", "_buffers"):
        for name, value in attrs.get(table, {}).items():
            if isinstance(value, Tensor):
                found[prefix + name] = value
    for name, child in attrs.get("_modules", {}).items():
        if isinstance(child, nn.Module):
            found.update(module_tensors(child, f"{prefix}{name}."))
    return found


def corpus_vocabulary(data_dir: Path) -> tuple[dict[str, int], dict[str, list[int]]]:
    """The `data.Corpus` dictionary (word -> id by first appearance) and each split's ids
    (train's only as far as `check_tokenizer` reads: a large corpus's would not fit)."""
    vocab: dict[str, int] = {}
    ids: dict[str, list[int]] = {}
    for split in SPLITS:
        path = data_dir / split
        if not path.is_file():
            raise ImportFailure(f"{path}: missing (--data needs {', '.join(SPLITS)})")
        out: list[int] = []
        with open(path, encoding="utf8") as f:
            for line in f:
                for word in [*line.split(), EOS_WORD]:
                    index = vocab.setdefault(word, len(vocab))
                    if split != "train.txt" or len(out) < CHECK_CHARS:
                        out.append(index)  # train's ids are only checked, up to CHECK_CHARS
        ids[split] = out
    return vocab, ids


def corpus_tokenizer(vocab: dict[str, int]) -> Tokenizer:
    """A tokenizer giving the Corpus's ids: universal newlines, a line end is `<eos>`, words
    split on Python's whitespace; the word-level decoder of `rnnlm train`'s tokenizers."""
    tok = _word_tokenizer(vocab)
    tok.normalizer = normalizers.Sequence(
        [
            normalizers.Replace("\r\n", "\n"),
            normalizers.Replace("\r", "\n"),
            normalizers.Replace("\n", f" {EOS_WORD} "),
        ]
    )
    space = "".join("\\" + c if c in "\\]^-[" else c for c in PY_WHITESPACE)
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(f"[{space}]+"), behavior="removed")
    return tok


def check_tokenizer(tok: Tokenizer, data_dir: Path, ids: dict[str, list[int]]) -> None:
    """The tokenizer gives the Corpus's ids on the start of every split (whole lines)."""
    for split in SPLITS:
        with open(data_dir / split, encoding="utf8") as f:
            text = f.read(CHECK_CHARS)
        if not text:
            continue
        lines = text.splitlines(keepends=True)
        if len(text) == CHECK_CHARS and len(lines) > 1:
            lines = lines[:-1]  # the last line may be cut
        whole = "".join(lines)
        if not whole.endswith(("\n", "\r")):
            whole += "\n"  # the Corpus ends every line, the last one too, with <eos>
        got = tok.encode(whole).ids
        want = ids[split][: len(got)]
        if got != want:
            at = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), 0)
            raise ImportFailure(
                f"{data_dir / split}: the tokenizer does not reproduce data.Corpus's ids "
                f"(first difference at token {at})"
            )


def import_examples(checkpoint: Path, data_dir: Path, cell: str | None = None) -> Imported:
    """Read, rebuild and check a pytorch/examples checkpoint; nothing is written here."""
    state, cell, held = read_checkpoint(checkpoint, cell)
    if not data_dir.is_dir():
        raise ImportFailure(f"{data_dir}: not a directory (--data needs {', '.join(SPLITS)})")
    vocab, ids = corpus_vocabulary(data_dir)
    shape = infer_shape(state, cell)
    if shape["vocab"] != len(vocab):
        raise ImportFailure(
            f"{checkpoint}: the model has {shape['vocab']} tokens but {data_dir}'s data.Corpus "
            f"has {len(vocab)} words; is --data the folder it was trained on?"
        )
    tok = corpus_tokenizer(vocab)
    check_tokenizer(tok, data_dir, ids)
    source = build_source(state, cell)
    tied = is_tied(state)
    model = to_rnnlm(source, tied)
    special = {"eos": vocab[EOS_WORD]}
    notes = []
    if UNK in vocab:
        special["unk"] = vocab[UNK]
    else:
        notes.append(f"the corpus has no {UNK}: a word it never saw cannot be encoded")
    return Imported(
        source_path=checkpoint,
        source=source_record(
            FORMAT,
            checkpoint,
            holds=held,
            rnn_type=next(k for k, v in RNN_TYPES.items() if v == cell),
            tied=tied,
            data={split: source_record_text(data_dir / split) for split in SPLITS},
        ),
        config=model.config,
        blobs=export_graphs(model),
        reference=source.reference,
        tokenizer=tok,
        tokenizer_kind="word",
        special_tokens=special,
        real_ids=ids["valid.txt"] or ids["test.txt"],
        test_ids=ids["test.txt"] or None,
        test_file=str((data_dir / "test.txt").resolve()),
        notes=notes,
    )


def source_record_text(path: Path) -> dict[str, Any]:
    """A data file's sha256 and size, for the provenance."""
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}
