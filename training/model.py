"""The recurrent language model family: embedding, stacked recurrent layers, decoder.

One class covers LSTM, GRU and Elman RNNs (tanh or ReLU). The recurrent state is always an
explicit argument and an explicit result, a tuple of `[layers, batch, hidden]` tensors (two for
LSTM: h and c; one otherwise), so that training can carry it across BPTT windows and the ONNX
export can make it a graph input and output.

Each layer is its own single-layer `nn.LSTM`/`nn.GRU`/`nn.RNN`, so that residual connections and
dropout can sit between layers; the exporters still emit one native recurrent node per layer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
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
    dropout: float = 0.0
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


def _recurrent_layer(cell: str, input_size: int, hidden: int) -> nn.Module:
    if cell == "lstm":
        return nn.LSTM(input_size, hidden, batch_first=True)
    if cell == "gru":
        return nn.GRU(input_size, hidden, batch_first=True)
    nonlinearity = "tanh" if cell == "rnn_tanh" else "relu"
    return nn.RNN(input_size, hidden, nonlinearity=nonlinearity, batch_first=True)


class RNNLM(nn.Module):
    """tokens `[B, T]` and a state -> next-token logits `[B, T, V]` and the next state."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.embedding)
        self.drop = nn.Dropout(c.dropout)
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

    def features(self, tokens: Tensor, state: State) -> tuple[Tensor, State]:
        """The last layer's outputs `[B, T, hidden]` and the next state."""
        x = self.drop(self.embed(tokens))
        next_h: list[Tensor] = []
        next_c: list[Tensor] = []
        for i, rnn in enumerate(self.rnns):
            if self.config.cell == "lstm":
                y, (h, c) = rnn(x, (state[0][i : i + 1], state[1][i : i + 1]))
                next_c.append(c)
            else:
                y, h = rnn(x, state[0][i : i + 1])
            next_h.append(h)
            if self.config.residual and y.shape[-1] == x.shape[-1]:
                y = y + x
            x = self.drop(y) if i < len(self.rnns) - 1 else y
        new_state: State = (
            (torch.cat(next_h, 0), torch.cat(next_c, 0)) if next_c else (torch.cat(next_h, 0),)
        )
        return x, new_state

    def logits(self, features: Tensor) -> Tensor:
        """Decode last-layer outputs `[B, T, hidden]` to next-token logits `[B, T, V]`."""
        x = self.drop(features)
        if self.proj is not None:
            x = self.proj(x)
        return self.decoder(x)

    def forward(self, tokens: Tensor, state: State) -> tuple[Tensor, State]:
        features, new_state = self.features(tokens, state)
        return self.logits(features), new_state


def detach_state(state: State) -> State:
    """Cut the graph between BPTT windows while keeping the values (truncated BPTT)."""
    return tuple(s.detach() for s in state)
