"""The batch as data: the active requests and their recurrent states, stacked on the batch axis.

As TGI's `CausalLMBatch`: a `Batch` is a value. `of` builds one from requests, `concatenate`
joins batches, `filter` keeps some rows, `stepped` swaps in the states a step computed; each
returns a new batch and none calls the model (server/step.py does). The request objects carry
what is per request (the prompt or document fed so far, whether it is done or cancelled); the
batch carries the arrays a step takes: one `[layers, N, hidden]` float32 array per state
tensor (after a decode run on a GPU, still there: `DeviceStates`, server/runner.py, read on
the host with `host_states`); every row's generation data as vectors (`SamplingRows`,
server/sampler.py: sampling parameters, the counter-based random stream's seed and position,
which is also the tokens generated, the limits and the last token; rows that do not generate
hold neutral parameters); and which rows sit the next step out (`resting`: generations
waiting for their turn, see server/scheduler.py). A step advances the sampled rows' positions
and last tokens in place.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from server.requests import GenerateRequest, Request, State
from server.runner import DeviceStates
from server.sampler import NO_LIMITS, ROW_ARRAYS, SamplingRows
from server.sampling import SamplingParams

NEUTRAL = SamplingParams()  # the sampling row of a request that does not generate
# Batches of up to this many requests that do not generate share their neutral sampling rows
# (a typing keystroke's lone call, a word search's round of hypotheses), cached by size: a
# copy costs a round of six hypotheses 18 us of its 130 us of Python.
SHARED_NEUTRAL = 64


@dataclass(frozen=True, slots=True)
class Batch:
    """Requests and their stacked states (see the module docstring)."""

    requests: tuple[Request, ...]
    states: tuple[np.ndarray, ...] | DeviceStates  # [layers, N, hidden] each
    sampling: SamplingRows
    resting: frozenset[int] = field(default_factory=frozenset)  # rows the next step skips
    turn: int = 0  # whose held-back chunk goes first next (rows take turns, server/step.py)

    @staticmethod
    def empty(num_states: int, vocab_size: int) -> Batch:
        states = tuple(np.empty((0, 0, 0), np.float32) for _ in range(num_states))
        return Batch((), states, SamplingRows.from_params([], [], vocab_size))

    @staticmethod
    def of(requests: Sequence[Request], vocab_size: int) -> Batch:
        """A batch of new requests, each starting from its own `state` (taken over here); each
        one's sampling row is built here, once (a request without a seed draws one)."""
        if not requests:
            raise ValueError("a batch of no requests has no state shapes: use Batch.empty")
        states = _stacked(requests)
        gens = [r if isinstance(r, GenerateRequest) else None for r in requests]
        if any(g is not None for g in gens):
            sampling = SamplingRows.from_params(
                [NEUTRAL if g is None else g.params for g in gens],
                [None if g is None else g.prompt for g in gens],
                vocab_size,
                [NO_LIMITS if g is None else (g.max_tokens, g.stop_ids) for g in gens],
            )
            for row, g in enumerate(gens):
                if g is not None and g.sampling is not None:
                    _carry(sampling, row, g.sampling)
                    g.sampling = None
        elif len(requests) <= SHARED_NEUTRAL:  # no row samples (next-token calls, scores)
            sampling = _neutral_rows(vocab_size, len(requests))
        else:
            one = _neutral_rows(vocab_size, 1)
            sampling = one.filter(np.zeros(len(requests), dtype=np.intp))
        return Batch(tuple(requests), states, sampling)

    def __len__(self) -> int:
        return len(self.requests)

    def concatenate(self, others: Sequence[Batch]) -> Batch:
        """This batch's rows, then each of `others`' rows."""
        parts = [b for b in (self, *others) if len(b)]
        if len(parts) <= 1:
            return parts[0] if parts else self
        requests = tuple(r for b in parts for r in b.requests)
        each = [b.host_states() for b in parts]
        states = tuple(np.concatenate(arrays, axis=1) for arrays in zip(*each, strict=True))
        sampling = SamplingRows.concatenate([b.sampling for b in parts])
        return Batch(requests, states, sampling, turn=self.turn)

    def filter(self, rows: Sequence[int]) -> Batch:
        """The given rows, in that order."""
        if len(rows) == len(self.requests) and all(i == r for i, r in enumerate(rows)):
            return Batch(self.requests, self.states, self.sampling, turn=self.turn)
        idx = np.asarray(rows, dtype=np.intp)
        requests = tuple(self.requests[i] for i in rows)
        states = tuple(s[:, idx, :] for s in self.host_states())
        return Batch(requests, states, self.sampling.filter(idx), turn=self.turn)

    def live(self) -> Batch:
        """The rows whose requests are neither done nor cancelled."""
        keep = [i for i, r in enumerate(self.requests) if not (r.done or r.cancelled)]
        return self if len(keep) == len(self.requests) else self.filter(keep)

    def stepped(self, states: Sequence[np.ndarray] | DeviceStates) -> Batch:
        """The same rows after a step: its new states, every row running again, the next
        turn."""
        kept = states if isinstance(states, DeviceStates) else tuple(states)
        return Batch(self.requests, kept, self.sampling, turn=self.turn + 1)

    def rest(self, rows: frozenset[int]) -> Batch:
        """The same batch with `rows` sitting the next step out."""
        return Batch(self.requests, self.states, self.sampling, rows, self.turn)

    def decoding(self) -> np.ndarray:
        """[N] bool: the rows of generations past their first token (one sampled token a
        step, their input the last: `SamplingRows.last_token`)."""
        return self.sampling.position > 0

    def host_states(self) -> tuple[np.ndarray, ...]:
        """The states as host arrays (copied from the device the first time, if there)."""
        states = self.states
        return states.host() if isinstance(states, DeviceStates) else states

    def row_state(self, row: int) -> State:
        """A read-only copy of one row's state."""
        state = tuple(s[:, row, :].copy() for s in self.host_states())
        for s in state:
            s.setflags(write=False)
        return state


def _stacked(requests: Sequence[Request]) -> tuple[np.ndarray, ...]:
    """The requests' states stacked on the batch axis, taken over from the requests. A lone
    request's are views of its own (read-only) arrays: a step never writes a batch's
    states, it returns new ones."""
    first = requests[0].state
    assert first is not None, "the request already belongs to a batch"
    if len(requests) == 1:
        states = tuple(s[:, None, :] for s in first)
    else:
        # One concatenation of [layers, 1, hidden] views: np.stack's per-array Python costs
        # twice as much (13.6 against 7.6 us for six rows of two 2 x 512 states).
        states = tuple(
            np.concatenate([r.state[j][:, None, :] for r in requests], axis=1)  # type: ignore[index]
            for j in range(len(first))
        )
    for r in requests:
        r.state = None
    return states


def _carry(rows: SamplingRows, row: int, own: SamplingRows) -> None:
    """Row `row` of `rows` (built from the same parameters) goes on where `own`, the request's
    one row from the batch it started in, left off: its seed (drawn there when the request had
    none), stream position (tokens generated), last token and seen tokens."""
    rows.seed[row] = own.seed[0]
    rows.position[row] = own.position[0]
    rows.last_token[row] = own.last_token[0]
    rows.seen[row] = own.seen[0]


@functools.lru_cache(maxsize=2 * SHARED_NEUTRAL)
def _neutral_rows(vocab_size: int, n: int) -> SamplingRows:
    """`n` sampling rows of neutral parameters (never sampled: requests that do not
    generate), for a vocabulary of `vocab_size`. Shared by every such batch, so read-only: a
    batch gains sampled rows only by `concatenate`, which makes new arrays."""
    rows = SamplingRows.from_params([NEUTRAL] * n, [None] * n, vocab_size)
    for name in ROW_ARRAYS:  # its masks are None: no row is penalised
        getattr(rows, name).setflags(write=False)
    return rows
