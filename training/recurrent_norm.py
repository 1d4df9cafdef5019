"""A cap on the spectral norm of each Elman layer's hidden-to-hidden matrix, so that a ReLU RNN
stays stable over streams of any length.

A ReLU RNN's state is `h_t = relu(W h_{t-1} + u_t)`, and `|relu(z)| <= |z|`, so
`|h_t| <= sigma(W) |h_{t-1}| + |u_t|`: with the largest singular value `sigma(W) <= rho < 1`
the state stays below `max |u_t| / (1 - rho)` however long the stream, while with
`sigma(W) > 1` nothing stops it from growing without bound. Trained from the identity (the IRNN
of Le et al. 2015) a ReLU RNN's matrices drift above 1: on 60 KB of Tiny Shakespeare a 2 x 32
model ended at 1.06 and 1.07, and scored perplexity 572 in the trainer's 10 short evaluation
streams but 5.9e11 as one 730-token document (docs/training.md, "ReLU RNNs").

After every optimizer step, a matrix whose spectral norm is above the limit is scaled down to
it (a hard limit, where the spectral normalisation of Miyato et al. 2018 reparametrises); the
run starts from the identity scaled to the limit. The default limit, 0.6, was the best of 0.4
to 0.95 over word and character models (docs/training.md, "ReLU RNNs"). The
norm is computed exactly (an SVD of the `hidden x hidden` matrix): power iteration, cheaper,
trailed the norm by up to 6 % on a capped tanh RNN, whose top singular values the cap crowds
together, and a shipped model must be below 1, not near it. The exact norm costs about 0.3 ms
per layer at hidden 32, 8 ms at 256 and 40 ms at 512 on one CPU core.
"""

from __future__ import annotations

import torch

from training.model import RNNLM

DEFAULT_LIMIT = {"rnn_relu": 0.6}  # the cells capped by default, and at what (docs/training.md)
CAPPABLE = ("rnn_relu", "rnn_tanh")  # Elman cells: one square hidden-to-hidden matrix


def default_limit(cell: str) -> float:
    """The cap of `cell` when `--recurrent-norm` is not given (0: none)."""
    return DEFAULT_LIMIT.get(cell, 0.0)


def _matrices(model: RNNLM) -> list[torch.Tensor]:
    return [rnn.get_parameter("weight_hh_l0") for rnn in model.rnns]


@torch.no_grad()
def cap_recurrent_norm(model: RNNLM, limit: float) -> None:
    """Scale each layer's hidden-to-hidden matrix down to spectral norm `limit` where it is
    above (0: no cap)."""
    if not limit:
        return
    for w in _matrices(model):
        sigma = torch.linalg.matrix_norm(w.float(), 2)
        if sigma > limit:
            w.mul_(limit / sigma)


@torch.no_grad()
def spectral_norms(model: RNNLM) -> list[float] | None:
    """The largest singular value of each layer's hidden-to-hidden matrix, for the Elman cells
    (None for LSTM and GRU, whose matrices stack several gates)."""
    if model.config.cell not in CAPPABLE:
        return None
    return [float(torch.linalg.matrix_norm(w.float().cpu(), 2)) for w in _matrices(model)]
