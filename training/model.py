"""The recurrent language model family: embedding, stacked recurrent layers, decoder.

One class covers LSTM, GRU and Elman RNNs (tanh or ReLU). The recurrent state is always an
explicit argument and an explicit result, a tuple of `[layers, batch, hidden]` tensors (two for
LSTM: h and c; one otherwise), so that training can carry it across BPTT windows and the ONNX
export can make it a graph input and output.

Each layer is its own single-layer `nn.LSTM`/`nn.GRU`/`nn.RNN`, so that residual connections and
dropout can sit between layers; the exporters still emit one native recurrent node per layer.

The AWD-LSTM regularizers (Merity et al. 2017: embedding dropout, variational "locked" dropout,
weight-drop on the hidden-to-hidden matrices) act only in training mode and add no parameters:
the weights keep their names and an eval-mode model is the plain network, which is what the
exporter traces.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")

State = tuple[Tensor, ...]


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the network; stored in checkpoints and bundle manifests."""

    cell: str
    vocab_size: int
    embedding: int = 256
    hidden: int = 256
    layers: int = 2
    dropout: float = 0.0  # between layers and before the decoder
    tied: bool = False
    residual: bool = False

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {', '.join(CELLS)}, not {self.cell!r}")
        for name in ("vocab_size", "embedding", "hidden", "layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), not {self.dropout}")

    @property
    def state_names(self) -> tuple[str, ...]:
        """Names of the state tensors, in the order `forward` takes and returns them."""
        return ("h", "c") if self.cell == "lstm" else ("h",)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        known = {f: data[f] for f in cls.__dataclass_fields__ if f in data}
        return cls(**known)


@dataclass(frozen=True)
class Regularization:
    """Training-only noise beyond `ModelConfig.dropout` (AWD-LSTM's); not part of the network.

    It adds no parameters and does nothing in eval mode, so checkpoints and exports do not
    depend on it; the training options record it.
    """

    input_dropout: float | None = None  # on the embedding output; None: `ModelConfig.dropout`
    embed_dropout: float = 0.0  # drop whole vocabulary entries of the embedding
    locked_dropout: bool = False  # one dropout mask per sequence, shared by all time steps
    weight_drop: float = 0.0  # DropConnect on each layer's hidden-to-hidden weights

    def __post_init__(self) -> None:
        for name in ("input_dropout", "embed_dropout", "weight_drop"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), not {value}")


def _recurrent_layer(cell: str, input_size: int, hidden: int) -> nn.Module:
    if cell == "lstm":
        return nn.LSTM(input_size, hidden, batch_first=True)
    if cell == "gru":
        return nn.GRU(input_size, hidden, batch_first=True)
    nonlinearity = "tanh" if cell == "rnn_tanh" else "relu"
    return nn.RNN(input_size, hidden, nonlinearity=nonlinearity, batch_first=True)


class RNNLM(nn.Module):
    """tokens `[B, T]` and a state -> next-token logits `[B, T, V]` and the next state."""

    def __init__(self, config: ModelConfig, regularization: Regularization | None = None) -> None:
        super().__init__()
        self.config = config
        self.regularization = regularization or Regularization()
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.embedding)
        self.rnns = nn.ModuleList(
            _recurrent_layer(c.cell, c.embedding if i == 0 else c.hidden, c.hidden)
            for i in range(c.layers)
        )
        # Tying needs the decoder input to match the embedding; project when sizes differ.
        self.proj = nn.Linear(c.hidden, c.embedding) if c.tied and c.hidden != c.embedding else None
        self.decoder = nn.Linear(c.embedding if c.tied else c.hidden, c.vocab_size)
        self._init_weights()
        if c.tied:
            self.decoder.weight = self.embed.weight

    def _init_weights(self) -> None:
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        if not self.config.tied:
            nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        if self.config.cell == "rnn_relu":
            # IRNN (Le et al. 2015): identity recurrent matrix and zero biases keep ReLU RNN
            # gradients from exploding or vanishing at the start of training.
            for rnn in self.rnns:
                nn.init.eye_(rnn.get_parameter("weight_hh_l0"))
                nn.init.zeros_(rnn.get_parameter("bias_hh_l0"))
                nn.init.zeros_(rnn.get_parameter("bias_ih_l0"))

    def initial_state(self, batch_size: int, device: torch.device | str = "cpu") -> State:
        c = self.config
        return tuple(
            torch.zeros(c.layers, batch_size, c.hidden, device=device) for _ in c.state_names
        )

    def _dropout(self, x: Tensor, p: float) -> Tensor:
        """Dropout on `[B, T, F]`; locked: the same units dropped at every time step."""
        if not self.training or p == 0.0:
            return x
        if not self.regularization.locked_dropout:
            return F.dropout(x, p, training=True)
        mask = x.new_empty(x.size(0), 1, x.size(2)).bernoulli_(1.0 - p)
        return x * mask / (1.0 - p)

    def _embed(self, tokens: Tensor) -> Tensor:
        p = self.regularization.embed_dropout
        if not self.training or p == 0.0:
            return self.embed(tokens)
        # A dropped vocabulary entry is zero wherever it occurs in the batch (word dropout).
        weight = self.embed.weight
        mask = weight.new_empty(weight.size(0), 1).bernoulli_(1.0 - p)
        return F.embedding(tokens, weight * mask / (1.0 - p))

    def _recur(self, rnn: nn.Module, x: Tensor, hx: Tensor | tuple[Tensor, Tensor]) -> tuple:
        p = self.regularization.weight_drop
        if not self.training or p == 0.0:
            return rnn(x, hx)
        # The layer runs once with a dropped copy of its recurrent matrix; the parameter itself
        # (and so the checkpoint and the export) is never changed, and its gradient flows back
        # through the mask.
        dropped = {"weight_hh_l0": F.dropout(rnn.get_parameter("weight_hh_l0"), p, training=True)}
        return torch.func.functional_call(rnn, dropped, (x, hx))

    def features(self, tokens: Tensor, state: State) -> tuple[Tensor, State]:
        """The last layer's outputs `[B, T, hidden]` and the next state."""
        first = self.regularization.input_dropout
        x = self._dropout(self._embed(tokens), self.config.dropout if first is None else first)
        next_h: list[Tensor] = []
        next_c: list[Tensor] = []
        for i, rnn in enumerate(self.rnns):
            if self.config.cell == "lstm":
                y, (h, c) = self._recur(rnn, x, (state[0][i : i + 1], state[1][i : i + 1]))
                next_c.append(c)
            else:
                y, h = self._recur(rnn, x, state[0][i : i + 1])
            next_h.append(h)
            if self.config.residual and y.shape[-1] == x.shape[-1]:
                y = y + x
            x = self._dropout(y, self.config.dropout) if i < len(self.rnns) - 1 else y
        new_state: State = (
            (torch.cat(next_h, 0), torch.cat(next_c, 0)) if next_c else (torch.cat(next_h, 0),)
        )
        return x, new_state

    def logits(self, features: Tensor) -> Tensor:
        """Decode last-layer outputs `[B, T, hidden]` to next-token logits `[B, T, V]`."""
        x = self._dropout(features, self.config.dropout)
        if self.proj is not None:
            x = self.proj(x)
        return self.decoder(x)

    def forward(self, tokens: Tensor, state: State) -> tuple[Tensor, State]:
        features, new_state = self.features(tokens, state)
        return self.logits(features), new_state


def detach_state(state: State) -> State:
    """Cut the graph between BPTT windows while keeping the values (truncated BPTT)."""
    return tuple(s.detach() for s in state)
