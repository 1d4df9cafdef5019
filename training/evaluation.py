"""Held-out loss: the validation and test text scored with the state carried.

`evaluate` scores text laid out as parallel streams (`--eval-batch-size` of them), each from the
zero state, in windows of about `EVAL_TOKENS` tokens: fast enough to run every epoch, and what
chooses the best weights. `score_document` scores a text as one stream from the eos state, as
the server's `Score` does: what the checkpoint and the bundle manifest record as the shipped
weights' validation and test perplexity (docs/training.md, "Losses").
"""

from __future__ import annotations

import torch

from training import distributed as ddp
from training.data import get_batch, num_windows
from training.model import RNNLM

# Evaluation windows hold about this many tokens (at least --bptt long): the state is carried
# across windows either way, so longer ones only save per-call overhead.
EVAL_TOKENS = 2048


@torch.no_grad()
def evaluate(
    model: RNNLM, streams: torch.Tensor, bptt: int, group: ddp.Group | None = None
) -> float:
    """Mean negative log-likelihood per token over the streams, state carried throughout.

    In a distributed run each rank scores its share of the streams and the sums are added up,
    so every rank gets the same value as one process scoring them all.
    """
    group = group or ddp.Group()
    was_training = model.training
    model.eval()
    mine = ddp.eval_rows(streams, group)
    total, count = 0.0, 0
    if mine.size(0) > 0:
        window = max(bptt, EVAL_TOKENS // mine.size(0))
        state = model.initial_state(mine.size(0), mine.device)
        for i in range(num_windows(mine, window)):
            x, y = get_batch(mine, i, window)
            nll, state = model(x, state, y)
            total += nll.sum().item()
            count += y.numel()
    model.train(was_training)
    summed = ddp.all_sum([total, float(count)], group, streams.device)
    return summed[0] / summed[1]


@torch.no_grad()
def score_document(model: RNNLM, ids: torch.Tensor, eos: int) -> float:
    """Mean negative log-likelihood per token of `ids` read as one document, the way the
    server's `Score` reads a text: one stream from the state after eos (the state every request
    starts from), each token scored given eos and all the tokens before it."""
    was_training = model.training
    model.eval()
    stream = torch.cat([ids.new_tensor([eos]), ids]).view(1, -1)
    state = model.initial_state(1, ids.device)
    total = 0.0
    for i in range(num_windows(stream, EVAL_TOKENS)):
        x, y = get_batch(stream, i, EVAL_TOKENS)
        nll, state = model(x, state, y)
        total += nll.double().sum().item()
    model.train(was_training)
    return total / ids.numel()
