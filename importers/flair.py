"""`rnnlm import flair`: a flair character language model, without installing flair.

A flair LM file (`LanguageModel.save`, the files `FlairEmbeddings` download) is a torch pickle of
a dict: `state_dict` (encoder, a sequence-first LSTM, an optional `proj`, decoder),
`dictionary` (a pickled `flair.data.Dictionary`: `item2idx`, `idx2item` of UTF-8 bytes),
`is_forward_lm`, `hidden_size`, `nlayers`, `embedding_size`, `nout`, `document_delimiter`,
`dropout`. flair pickles with protocol 4, which torch's `weights_only` reader rejects, so it is
read with `importers.safe_load`'s allow-list unpickler: tensors and containers, and
`flair.data.Dictionary` (and newer flair's `CharacterTokenizer`, which only holds one) rebuilt
as a plain stand-in holding the pickled fields. No flair code is needed or run, and any other
class is refused.

The tokenizer maps each character to its dictionary id and an unknown character to id 0, as
flair's `Dictionary.get_idx_for_item` does; the document delimiter ("\\n") is the eos token the
server starts every text with. A backward LM (`is_forward_lm` false) reads text reversed, which
the server does not do, so it is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, models
from torch import Tensor

from importers.errors import ImportFailure
from importers.safe_load import load_allow_listed
from importers.torch_source import build_source, export_graphs, is_tied, to_rnnlm
from importers.write import Imported, read_text, source_record
from training.tokenizer import _char_tokenizer

FORMAT = "flair"
CELLS = {"lstm": "lstm", "gru": "gru"}
# Real text for the parity check when no --test-text is given.
SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog.\nBerlin, 12 May 2021: "
    "prices rose by 3.5% (the largest rise since 1993).\n"
)


class DictionaryStandIn:
    """Stands for `flair.data.Dictionary` while unpickling: holds its fields, runs nothing."""


class CharacterTokenizerStandIn:
    """Stands for newer flair's `CharacterTokenizer`, which holds a `Dictionary`."""


ALLOWED: dict[str, Any] = {
    "flair.data.Dictionary": DictionaryStandIn,
    "flair.models.language_model.CharacterTokenizer": CharacterTokenizerStandIn,
}


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint's dict, checked for the fields a flair LM has."""
    state = load_allow_listed(path, ALLOWED, "flair language model")
    if not isinstance(state, Mapping) or "state_dict" not in state:
        raise ImportFailure(f"{path}: not a flair language model (no 'state_dict' entry)")
    if not state.get("is_forward_lm", True):
        raise ImportFailure(
            f"{path}: a backward flair LM reads text right to left; the server reads it left "
            "to right, so it would score reversed text"
        )
    weights = state["state_dict"]
    if not isinstance(weights, Mapping) or not all(isinstance(v, Tensor) for v in weights.values()):
        raise ImportFailure(f"{path}: 'state_dict' is not a mapping of tensors")
    return dict(state)


def dictionary_items(path: Path, state: Mapping[str, Any]) -> list[str]:
    """The dictionary's items by id, as text."""
    holder = state.get("dictionary")
    if holder is None and isinstance(state.get("tokenizer"), CharacterTokenizerStandIn):
        holder = vars(state["tokenizer"]).get("dictionary")
    if not isinstance(holder, DictionaryStandIn):
        raise ImportFailure(f"{path}: has no pickled character dictionary")
    raw = vars(holder).get("idx2item")
    if not isinstance(raw, list) or not raw:
        raise ImportFailure(f"{path}: the dictionary has no idx2item list")
    items = []
    for item in raw:
        try:
            items.append(item.decode("utf-8") if isinstance(item, bytes) else str(item))
        except UnicodeDecodeError as e:
            raise ImportFailure(f"{path}: a dictionary item is not UTF-8 ({e})") from e
    if len(set(items)) != len(items):
        raise ImportFailure(f"{path}: the dictionary holds an item twice")
    return items


def flair_tokenizer(items: list[str]) -> Tokenizer:
    """Each character its dictionary id; an unknown one id 0 (flair's `get_idx_for_item`)."""
    vocab = {item: i for i, item in enumerate(items)}
    tok = _char_tokenizer(vocab)
    tok.model = models.WordLevel(vocab, unk_token=items[0])
    return tok


def import_flair(checkpoint: Path, test_text: Path | None = None) -> Imported:
    """Read, rebuild and check a flair LM; nothing is written here."""
    state = read_checkpoint(checkpoint)
    items = dictionary_items(checkpoint, state)
    recurrent = str(state.get("recurrent_type", "lstm")).lower()
    if recurrent not in CELLS:
        raise ImportFailure(f"{checkpoint}: recurrent_type {recurrent[:40]!r} is not lstm or gru")
    weights = state["state_dict"]
    nout = weights["proj.weight"].shape[0] if "proj.weight" in weights else None
    source = build_source(weights, CELLS[recurrent], proj=nout)
    if source.encoder.num_embeddings != len(items):
        raise ImportFailure(
            f"{checkpoint}: the model has {source.encoder.num_embeddings} tokens but its "
            f"dictionary {len(items)}"
        )
    delimiter = state.get("document_delimiter", "\n")
    if delimiter not in items:
        raise ImportFailure(f"{checkpoint}: the document delimiter {delimiter!r} has no id")
    tok = flair_tokenizer(items)
    text = SAMPLE_TEXT if test_text is None else read_text(test_text)
    ids = tok.encode(text).ids
    special = {"eos": items.index(delimiter)}
    if items[0] == "<unk>":
        special["unk"] = 0
    model = to_rnnlm(source, is_tied(weights))
    sizes = {k: state.get(k) for k in ("hidden_size", "nlayers", "embedding_size", "nout")}
    return Imported(
        source_path=checkpoint,
        source=source_record(FORMAT, checkpoint, is_forward_lm=True, **sizes),
        config=model.config,
        blobs=export_graphs(model),
        reference=source.reference,
        tokenizer=tok,
        tokenizer_kind="char",
        special_tokens=special,
        real_ids=ids,
        test_ids=ids if test_text is not None else None,
        test_file=None if test_text is None else str(test_text.resolve()),
        notes=[] if nout is None else [f"proj ({nout} wide) is folded into the decoder"],
    )
