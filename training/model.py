"""The recurrent language model family: embedding, stacked recurrent layers, decoder.

One class covers LSTM, GRU and Elman RNNs (tanh or ReLU). The recurrent state is always an
explicit argument and an explicit result, a tuple of `[layers, batch, hidden]` tensors (two for
LSTM: h and c; one otherwise), so that training can carry it across BPTT windows and the ONNX
export can make it a graph input and output.

With `adaptive_cutoffs` the decoder is an adaptive softmax (Grave et al. 2017): the most
frequent words (the lowest ids: the tokenizers number words by frequency) get a full-width
output, rarer ones a narrower one behind a cluster token, so a training step costs a fraction
of a full softmax over a large vocabulary. `logits` still returns the full `[B, T, V]` (they
are log-probabilities), so the exporter, the bundle and the server do not change.

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
    adaptive_cutoffs: tuple[int, ...] = ()  # () : a full softmax; else see `AdaptiveSoftmax`
    adaptive_div: int = 4  # each tail cluster's width is the previous one's divided by this

    def __post_init__(self) -> None:
        # JSON gives a list; the config must stay hashable and comparable.
        object.__setattr__(self, "adaptive_cutoffs", tuple(self.adaptive_cutoffs))
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {', '.join(CELLS)}, not {self.cell!r}")
        for name in ("vocab_size", "embedding", "hidden", "layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), not {self.dropout}")
        if self.adaptive_div < 1:
            raise ValueError(f"adaptive_div must be at least 1, not {self.adaptive_div}")
        cuts = self.adaptive_cutoffs
        if cuts and (list(cuts) != sorted(set(cuts)) or cuts[0] < 1 or cuts[-1] >= self.vocab_size):
            raise ValueError(
                f"adaptive_cutoffs must increase strictly and lie between 1 and the "
                f"vocabulary size {self.vocab_size} (exclusive), not {list(cuts)}"
            )
        if cuts and self.decoder_dim // self.adaptive_div ** len(cuts) < 1:
            raise ValueError(
                f"adaptive_div {self.adaptive_div} leaves the last of {len(cuts)} tail "
                f"clusters no width (decoder input {self.decoder_dim})"
            )

    @property
    def decoder_dim(self) -> int:
        """The width of the decoder's input: the embedding size when tied, else the hidden."""
        return self.embedding if self.tied else self.hidden

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


def recurrent_layer(cell: str, input_size: int, hidden: int) -> nn.Module:
    """One single-layer recurrent module of `cell`, batch first."""
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
        self.adaptive = (
            AdaptiveSoftmax(c.decoder_dim, c.vocab_size, c.adaptive_cutoffs, c.adaptive_div)
            if c.adaptive_cutoffs
            else None
        )
        # Tied to an adaptive softmax, the input embedding is its "adaptive input" (Baevski and
        # Auli 2019): the same matrices read the other way.
        shared = c.tied and self.adaptive is not None
        self.embed = None if shared else nn.Embedding(c.vocab_size, c.embedding)
        self.rnns = nn.ModuleList(
            recurrent_layer(c.cell, c.embedding if i == 0 else c.hidden, c.hidden)
            for i in range(c.layers)
        )
        # Tying needs the decoder input to match the embedding; project when sizes differ.
        self.proj = nn.Linear(c.hidden, c.embedding) if c.tied and c.hidden != c.embedding else None
        self.decoder = nn.Linear(c.decoder_dim, c.vocab_size) if self.adaptive is None else None
        self._init_weights()
        if c.tied and self.decoder is not None and self.embed is not None:
            self.decoder.weight = self.embed.weight

    def _init_weights(self) -> None:
        if self.embed is not None:
            nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        if self.decoder is not None:
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
        x = self.embed(tokens) if self.embed is not None else self._adaptive().embed(tokens)
        p = self.regularization.embed_dropout
        if not self.training or p == 0.0:
            return x
        # A dropped vocabulary entry is zero wherever it occurs in the batch (word dropout).
        mask = x.new_empty(self.config.vocab_size).bernoulli_(1.0 - p)
        return x * (mask / (1.0 - p))[tokens].unsqueeze(-1)

    def _adaptive(self) -> AdaptiveSoftmax:
        assert self.adaptive is not None
        return self.adaptive

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

    def _decoder_input(self, features: Tensor) -> Tensor:
        x = self._dropout(features, self.config.dropout)
        return self.proj(x) if self.proj is not None else x

    def logits(self, features: Tensor) -> Tensor:
        """Decode last-layer outputs `[B, T, hidden]` to next-token logits `[B, T, V]`.

        With an adaptive softmax they are log-probabilities (logits up to a constant)."""
        x = self._decoder_input(features)
        if self.decoder is not None:
            return self.decoder(x)
        return self._adaptive().log_probs(x)

    def nll(self, features: Tensor, targets: Tensor) -> Tensor:
        """Float32 negative log-likelihood `[B, T]` of each target; an adaptive softmax
        computes only the clusters the targets fall in."""
        x = self._decoder_input(features)
        if self.decoder is not None:
            logits = self.decoder(x)
            return F.cross_entropy(
                logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), reduction="none"
            ).view(targets.shape)
        return self._adaptive().nll(x, targets)

    def forward(
        self, tokens: Tensor, state: State, targets: Tensor | None = None
    ) -> tuple[Tensor, State]:
        """Logits `[B, T, V]` and the next state; given `targets`, the `nll` of each instead
        (one forward for training, so that a DistributedDataParallel wrapper sees it)."""
        features, new_state = self.features(tokens, state)
        if targets is not None:
            return self.nll(features, targets), new_state
        return self.logits(features), new_state


class AdaptiveSoftmax(nn.Module):
    """An adaptive softmax over ids `[0, V)` cut at `cutoffs` (Grave et al. 2017), tied.

    The head scores the ids below the first cutoff plus one token per tail cluster; tail
    cluster i scores its ids after projecting the input to `dim / div**(i+1)`. The same
    matrices embed tokens (adaptive input): a head id's row of the head, a tail id's row of
    its cluster projected back to `dim`. Ids must be numbered by falling frequency, as the
    tokenizers do, for the cheap head to cover most tokens.
    """

    def __init__(self, dim: int, vocab: int, cutoffs: tuple[int, ...], div: int) -> None:
        super().__init__()
        self.bounds = (0, *cutoffs, vocab)
        head = cutoffs[0]
        tails = len(cutoffs)
        widths = [dim // div ** (i + 1) for i in range(tails)]
        self.head = nn.Parameter(torch.empty(head + tails, dim).uniform_(-0.1, 0.1))
        self.head_bias = nn.Parameter(torch.zeros(head + tails))
        # Scaled so that a projected tail embedding is about as large as a head one.
        self.proj = nn.ParameterList(
            nn.Parameter(torch.empty(dim, w).uniform_(-((3 / w) ** 0.5), (3 / w) ** 0.5))
            for w in widths
        )
        sizes = [self.bounds[i + 2] - self.bounds[i + 1] for i in range(tails)]
        self.tail = nn.ParameterList(
            nn.Parameter(torch.empty(n, w).uniform_(-0.1, 0.1))
            for n, w in zip(sizes, widths, strict=True)
        )
        self.tail_bias = nn.ParameterList(nn.Parameter(torch.zeros(n)) for n in sizes)

    def _clusters(self) -> list[tuple[int, int, Tensor, Tensor, Tensor]]:
        """(first id, last id + 1, projection, output rows, bias) of each tail cluster."""
        b = self.bounds
        return [
            (b[i + 1], b[i + 2], proj, tail, bias)
            for i, (proj, tail, bias) in enumerate(
                zip(self.proj, self.tail, self.tail_bias, strict=True)
            )
        ]

    def embed(self, tokens: Tensor) -> Tensor:
        """`[..., dim]` input vectors of `tokens` (every id looked up in every part, then the
        right one kept: no data-dependent shapes, so it exports as it trains)."""
        head = self.bounds[1]
        x = F.embedding(tokens.clamp(max=head - 1), self.head[:head])
        for lo, hi, proj, tail, _ in self._clusters():
            rows = F.embedding((tokens - lo).clamp(0, hi - lo - 1), tail) @ proj.t()
            x = torch.where(((tokens >= lo) & (tokens < hi)).unsqueeze(-1), rows, x)
        return x

    def log_probs(self, x: Tensor) -> Tensor:
        """Log-probabilities `[..., V]` of every id."""
        head_size = self.bounds[1]
        head = torch.log_softmax(F.linear(x, self.head, self.head_bias).float(), dim=-1)
        parts = [head[..., :head_size]]
        for i, (_, _, proj, tail, bias) in enumerate(self._clusters()):
            scores = F.linear(x @ proj, tail, bias).float()
            parts.append(torch.log_softmax(scores, dim=-1) + head[..., head_size + i, None])
        return torch.cat(parts, dim=-1)

    def nll(self, x: Tensor, targets: Tensor) -> Tensor:
        """Float32 `[...]`: -log p(target); tail clusters run only on their targets' rows."""
        flat_x = x.reshape(-1, x.size(-1))
        flat_y = targets.reshape(-1)
        head_size = self.bounds[1]
        head = torch.log_softmax(F.linear(flat_x, self.head, self.head_bias).float(), dim=-1)
        in_head = flat_y < head_size
        logp = head.gather(1, torch.where(in_head, flat_y, 0).unsqueeze(1)).squeeze(1)
        logp = torch.where(in_head, logp, 0.0)
        for i, (lo, hi, proj, tail, bias) in enumerate(self._clusters()):
            # Run even with no rows, so every parameter is in the graph (DDP expects it).
            rows = ((flat_y >= lo) & (flat_y < hi)).nonzero().squeeze(1)
            scores = torch.log_softmax(F.linear(flat_x[rows] @ proj, tail, bias).float(), dim=-1)
            picked = scores.gather(1, (flat_y[rows] - lo).unsqueeze(1)).squeeze(1)
            logp = logp.index_add(0, rows, picked + head[rows, head_size + i])
        return (-logp).view(targets.shape)


def detach_state(state: State) -> State:
    """Cut the graph between BPTT windows while keeping the values (truncated BPTT)."""
    return tuple(s.detach() for s in state)
