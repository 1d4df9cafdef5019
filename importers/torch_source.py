"""A sequence-first PyTorch RNN LM rebuilt from a state_dict, and its bundle graphs.

pytorch/examples' `RNNModel` and flair's `LanguageModel` share one network: `encoder`
(`nn.Embedding`), `rnn` (one multi-layer `nn.LSTM`/`nn.GRU`/`nn.RNN`, inputs `[T, B, E]`),
flair's optional `proj` (`nn.Linear`), and `decoder` (`nn.Linear`). `SourceLM` is that network
built from fresh torch modules and the checkpoint's tensors only (no code or module object from
the checkpoint runs), and computes what the source's `forward` computes in eval mode, so it is
the reference the bundle is proved against.

The bundle's graphs are made by `rnnlm export`'s own exporter from an `RNNLM` holding the same
weights (`to_rnnlm`): a multi-layer recurrent module becomes one single-layer module per layer,
and a projection before the decoder is folded into it (`decoder(proj(x))` is one linear map).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor, nn

from exporter.export import align_transposed_weights, export_graph
from importers.errors import ImportFailure
from training.model import RNNLM, ModelConfig

GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
GRAPHS = ("step", "prefill", "score")


class SourceLM(nn.Module):
    """encoder -> rnn -> [proj] -> decoder, sequence-first, as the source computes it."""

    def __init__(
        self,
        cell: str,
        vocab: int,
        embedding: int,
        hidden: int,
        layers: int,
        proj: int | None = None,
        decoder_bias: bool = True,
    ) -> None:
        super().__init__()
        self.cell = cell
        self.encoder = nn.Embedding(vocab, embedding)
        if cell == "lstm":
            self.rnn: nn.Module = nn.LSTM(embedding, hidden, layers)
        elif cell == "gru":
            self.rnn = nn.GRU(embedding, hidden, layers)
        else:
            nonlinearity = "tanh" if cell == "rnn_tanh" else "relu"
            self.rnn = nn.RNN(embedding, hidden, layers, nonlinearity=nonlinearity)
        self.proj = nn.Linear(hidden, proj) if proj is not None else None
        self.decoder = nn.Linear(proj or hidden, vocab, bias=decoder_bias)

    def forward(self, tokens: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """tokens `[T, B]` -> logits `[T, B, V]`, rnn outputs `[T, B, H]`, *final states."""
        emb = self.encoder(tokens)
        hx = state if self.cell == "lstm" else state[0]
        output, final = self.rnn(emb, hx)
        finals = tuple(final) if self.cell == "lstm" else (final,)
        projected = self.proj(output) if self.proj is not None else output
        return (self.decoder(projected), output, *finals)

    def reference(
        self, tokens: np.ndarray, state: tuple[np.ndarray, ...]
    ) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, ...]]:
        """The `importers.parity.Reference` view: batch-first numpy in and out."""
        with torch.no_grad():
            logits, output, *final = self(
                torch.from_numpy(tokens).t(), tuple(torch.from_numpy(s) for s in state)
            )
        return (
            logits.transpose(0, 1).contiguous().numpy(),
            output.transpose(0, 1).contiguous().numpy(),
            tuple(s.numpy() for s in final),
        )


def infer_shape(state: Mapping[str, Tensor], cell: str | None) -> dict[str, int | str]:
    """Vocabulary, sizes, layers and cell from the tensors' shapes (`cell` decides RNN tanh vs
    ReLU, which the weights cannot tell apart)."""
    for key in ("encoder.weight", "rnn.weight_ih_l0", "rnn.weight_hh_l0", "decoder.weight"):
        if key not in state or not isinstance(state[key], Tensor) or state[key].dim() != 2:
            raise ImportFailure(f"the weights have no 2-D {key!r}; is this an RNN LM checkpoint?")
    vocab, embedding = state["encoder.weight"].shape
    rows, hidden = state["rnn.weight_hh_l0"].shape
    gates = rows // hidden
    found = [c for c, g in GATES.items() if g == gates and rows == g * hidden]
    if not found:
        raise ImportFailure(f"rnn.weight_hh_l0 has shape {list(state['rnn.weight_hh_l0'].shape)}")
    if cell is None:
        if gates == 1:
            raise ImportFailure(
                "an Elman RNN's weights do not say tanh or ReLU; pass --cell rnn_tanh or rnn_relu"
            )
        cell = found[0]
    elif GATES.get(cell) != gates:
        raise ImportFailure(f"the weights are not a {cell} ({gates} gate blocks per layer)")
    layers = 0
    while f"rnn.weight_ih_l{layers}" in state:
        layers += 1
    return {"cell": cell, "vocab": int(vocab), "embedding": int(embedding),
            "hidden": int(hidden), "layers": layers}  # fmt: skip


def build_source(state: Mapping[str, Tensor], cell: str, *, proj: int | None = None) -> SourceLM:
    """A `SourceLM` holding exactly `state` (every tensor used, none missing), in eval mode."""
    shape = infer_shape(state, cell)
    model = SourceLM(
        cell,
        int(shape["vocab"]),
        int(shape["embedding"]),
        int(shape["hidden"]),
        int(shape["layers"]),
        proj=proj,
        decoder_bias="decoder.bias" in state,
    )
    tensors = {k: v.detach().to(torch.float32).cpu() for k, v in state.items()}
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise ImportFailure(f"the weights do not fit the network they describe ({detail})") from e
    return model.eval()


def is_tied(state: Mapping[str, Tensor]) -> bool:
    """Whether the decoder reuses the embedding matrix (same storage, as tying saves it)."""
    enc, dec = state["encoder.weight"], state["decoder.weight"]
    return enc.shape == dec.shape and enc.data_ptr() == dec.data_ptr()


def to_rnnlm(source: SourceLM, tied: bool) -> RNNLM:
    """An `RNNLM` computing what `source` computes, for `rnnlm export`'s graph exporter."""
    rnn = source.rnn
    assert isinstance(rnn, nn.RNNBase)
    vocab, embedding = source.encoder.weight.shape
    hidden, layers = rnn.hidden_size, rnn.num_layers
    tied = tied and source.proj is None and embedding == hidden
    config = ModelConfig(cell=source.cell, vocab_size=int(vocab), embedding=int(embedding),
                         hidden=hidden, layers=layers, tied=tied)  # fmt: skip
    model = RNNLM(config)
    weights: dict[str, Tensor] = {"embed.weight": source.encoder.weight}
    for i in range(layers):
        for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            weights[f"rnns.{i}.{kind}_l0"] = getattr(rnn, f"{kind}_l{i}")
    weight: Tensor = source.decoder.weight
    bias: Tensor | None = source.decoder.bias
    if bias is None:
        bias = torch.zeros(weight.shape[0])
    if source.proj is not None:  # decoder(proj(x)) = (Wd Wp) x + (Wd bp + bd)
        weight, bias = weight @ source.proj.weight, weight @ source.proj.bias + bias
    weights["decoder.weight"], weights["decoder.bias"] = weight, bias
    with torch.no_grad():
        model.load_state_dict({k: v.detach().clone() for k, v in weights.items()}, strict=True)
    return model.eval()


def export_graphs(model: RNNLM) -> dict[str, bytes]:
    """The bundle's step, prefill and score graphs, made as `rnnlm export` makes them."""
    blobs = {graph: export_graph(model, graph) for graph in GRAPHS}
    align_transposed_weights(blobs)
    return blobs
