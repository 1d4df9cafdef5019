"""The request kinds: what each has still to feed, and what it makes of a run's outputs.

Every kind answers through one interface. `work` names the tokens it feeds this step (on which
graph), `absorb` takes what a run gave its row (`RowOutput`) and says where the request stands:
more to feed (None), its next-token logits ready (`READY`: the step finishes all such rows
together, log-probs in one vectorised pass, samples in one sampler call), or the payload that
answers it. `deliver` hands payloads to the caller on the event loop (server/delivery.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, NamedTuple

import numpy as np

from server.continuous_cache import CacheParams, ContinuousCache, mix, next_logprobs
from server.sampling import SamplingParams, log_softmax

if TYPE_CHECKING:
    from server.sampler import SamplingRows

State = tuple[np.ndarray, ...]  # one [layers, hidden] float32 array per state tensor

STEP = "step"
SCORE = "score"
PREFILL = "prefill"
POOLINGS = ("last", "mean", "max")
# What `absorb` returns when the request's next-token logits are ready for the step's finish.
READY = object()
# The payload that ends a generation stream (after its last token).
END = object()


@dataclass(frozen=True)
class Failure:
    """A request's work failed; the engine turns this into an EngineError for the caller."""

    message: str
    shutdown: bool = False  # the engine is closing, as opposed to a step that went wrong


@dataclass(slots=True)
class Work:
    """One request's share of a step: tokens to feed on one graph."""

    graph: str
    tokens: np.ndarray  # int64 [T]
    targets: np.ndarray | None  # int64 [T], score graph only
    keeps_state: bool  # False: the final state is discarded, so right-padding is allowed


@dataclass(slots=True)
class RowOutput:
    """What one run gave one row for its `n` real tokens (padding cut off)."""

    features: np.ndarray | None  # [n, hidden]; None from an old score graph
    logits: np.ndarray | None  # [n, V], step graph only
    logprobs: np.ndarray | None  # [n], the targets' log-probs, score graph only
    # The run's final states, read-only, one [layers, rows, hidden] array per state tensor,
    # of which this row's are at `row`.
    states: Sequence[np.ndarray]
    row: int

    def state(self) -> State:
        """A read-only copy of the row's state after the run (for a cache: it keeps no more
        than the row alive)."""
        copy = tuple(s[:, self.row, :].copy() for s in self.states)
        for s in copy:
            s.setflags(write=False)
        return copy

    def state_view(self) -> State:
        """The row's state as read-only views of the run's arrays, no copy. They keep the
        whole run's states alive: for a caller that keeps the states of most rows of a few
        runs (a word search's hypotheses, kept by a typing session until its next search)."""
        return tuple([s[:, self.row, :] for s in self.states])  # read-only, as `states` are


class Request:
    """One unit of engine work (see the module docstring).

    `cancelled` may be set from any thread: the request leaves at the next step.
    """

    samples: ClassVar[bool] = False  # READY rows are sampled (else their log-probs answer)
    # Answers (or starts answering) with the next token after its feed: a caller waits on it
    # (see `Pace.lane` in server/scheduler.py).
    answers_next: ClassVar[bool] = True

    def __init__(self, feed: np.ndarray, state: State, deliver: Callable[[object], None]) -> None:
        self.feed = feed  # tokens to feed, starting from `state`
        self.fed = 0
        self.state: State | None = state  # taken over by `Batch.of`
        self.deliver = deliver
        self.cancelled = False
        self.done = False
        self.logits: np.ndarray | None = None  # [V] next-token logits, READY to finish
        self.submitted = time.perf_counter()

    def work(self, chunk: int, split: int | None) -> Work | None:
        """This step's work, at most `chunk` tokens; None when the request needs no run.

        Only the last token's logits are read, so with a prefill graph (`split` not None) the
        chunks before the last go through it, and so do the last chunk's tokens but its last
        when there are at least `split` of them; the last token then runs alone on the step
        graph. Fewer go with it, in one run: a run of its own costs more than the output layer
        saves on a few tokens (see `server/runner.py`, `choose_prefill_split`)."""
        left = len(self.feed) - self.fed
        if split is not None and left > 1:
            before = left - 1
            if before > chunk or before >= split:
                n = min(before, chunk)
                return Work(PREFILL, self.feed[self.fed : self.fed + n], None, True)
        n = min(left, chunk)
        return Work(STEP, self.feed[self.fed : self.fed + n], None, True)

    def absorb(self, out: RowOutput) -> object | None:
        """Take one run's outputs; None, READY or the answer (see the module docstring).

        The base kind wants the next-token logits after its whole feed."""
        n = len(out.features) if out.features is not None else 0
        if out.logits is not None:
            n = len(out.logits)
        self.fed = min(self.fed + n, len(self.feed))
        if self.fed < len(self.feed) or out.logits is None:
            return None
        self.logits = out.logits[-1]
        return READY


class NextRequest(Request):
    """The next-token log-probs after a context. Answers a read-only float32 [V] array."""

    def __init__(
        self,
        context: np.ndarray,
        feed: np.ndarray,
        state: State,
        key: int | None,
        deliver: Callable[[object], None],
    ) -> None:
        super().__init__(feed, state, deliver)
        self.context = context  # the whole context, the state cache's key ...
        self.key = key  # ... and its hash, when the engine looked it up


class Extension(NamedTuple):
    """A context given as the state after its beginning (one a `StateNextRequest` answered)
    and its last tokens (at least one): it is stepped from there, neither looked up nor
    cached."""

    state: State
    tokens: tuple[int, ...]


class StateNextRequest(NextRequest):
    """A `NextRequest` that also keeps the state after its context (`final`), for a caller
    that extends it token by token (the word search's hypotheses, server/word_search.py). With an
    empty `context`, its result is not cached."""

    def __init__(
        self,
        context: np.ndarray,
        feed: np.ndarray,
        state: State,
        key: int | None,
        deliver: Callable[[object], None],
    ) -> None:
        super().__init__(context, feed, state, key, deliver)
        self.final: State | None = None

    def absorb(self, out: RowOutput) -> object | None:
        answer = super().absorb(out)
        if answer is READY:
            # The search keeps most rows of its few runs (server/word_search.py).
            self.final = out.state_view()
        return answer


@dataclass(frozen=True, slots=True)
class Recalled:
    """What a `RecallNextRequest` answers: the mixed next-token log-probs, and for the engine's
    recall cache the model's own, the last `window` + 1 features and the state at the end."""

    mixed: np.ndarray  # float32 [V], read-only
    logprobs: np.ndarray  # float32 [V]
    features: np.ndarray  # float32 [m, hidden]
    state: State


class RecallNextRequest(Request):
    """The next-token log-probs after a context with the continuous cache mixed in. Answers a
    `Recalled`.

    The cache recalls by the features of the context's last `window` positions, so the request
    starts from a state at least that far back, or from one whose features up to there are
    known (`features`: the features after the tokens just before the feed, the root's after
    eos included when the feed starts at the context's start), and keeps them as they come.
    `work` is the base kind's: the final state is kept (for the recall cache), so no chunk is
    padded."""

    def __init__(
        self,
        context: np.ndarray,
        feed: np.ndarray,
        state: State,
        features: np.ndarray | None,
        params: CacheParams,
        deliver: Callable[[object], None],
    ) -> None:
        super().__init__(feed, state, deliver)
        self.context = context
        self.params = params
        self.features = features  # the last `window` + 1 features so far
        self.last_logits: np.ndarray | None = None

    def absorb(self, out: RowOutput) -> object | None:
        assert out.features is not None, "the prefill and step graphs give features"
        kept = (
            out.features if self.features is None else np.concatenate((self.features, out.features))
        )
        self.features = kept[-(self.params.window + 1) :]  # the pairs' keys and the query
        if out.logits is not None:
            self.last_logits = out.logits[-1]
        self.fed += len(out.features)
        if self.fed < len(self.feed):
            return None
        assert self.last_logits is not None
        logprobs = log_softmax(self.last_logits)
        mixed = recall_logprobs(logprobs, self.features, self.context, self.params)
        return Recalled(mixed, logprobs, self.features, out.state())


def recall_logprobs(
    logprobs: np.ndarray, features: np.ndarray, context: np.ndarray, params: CacheParams
) -> np.ndarray:
    """The read-only mixed next-token log-probs after `context`, from the model's `logprobs`
    and the features after its last positions (`features[-1]` after the last token)."""
    keys, query = features[:-1], features[-1]
    values = context[len(context) - len(keys) :]  # the token after each key
    out = next_logprobs(logprobs, query, keys, values, params)
    out.setflags(write=False)
    return out


class GenerateRequest(Request):
    """Token-by-token generation. Answers `GeneratedToken`s, then `END`."""

    samples = True

    def __init__(
        self,
        prompt: np.ndarray,
        feed: np.ndarray,
        state: State,
        head: np.ndarray | None,
        params: SamplingParams,
        max_tokens: int,
        stop_ids: frozenset[int],
        key: int | None,
        deliver: Callable[[object], None],
    ) -> None:
        super().__init__(feed, state, deliver)
        self.prompt = prompt
        self.key = key  # the state cache's key of the prompt, when the engine looked it up
        # Next-token logits already known (from the state cache): sample without a run.
        self.logits = head
        # Its sampling row (parameters, random stream, seen tokens) is built from these when
        # it joins a batch (server/batch.py), or carried over from the batch it started in
        # (`resume`).
        self.params = params
        self.sampling: SamplingRows | None = None
        self.max_tokens = max_tokens  # (these two go into its sampling row)
        self.stop_ids = stop_ids

    def work(self, chunk: int, split: int | None) -> Work | None:
        """The prompt's chunks; None once its next-token logits are known. (Once it decodes
        the step feeds it the batch's last token: `Batch.decoding`, server/step.py.)"""
        if self.logits is not None:
            return None
        return super().work(chunk, split)

    def resume(self, state: State, sampling: SamplingRows) -> None:
        """Take the request out of the batch it started in, to join another: its state and
        its one sampling row (random stream position and seen tokens) go with it."""
        self.state = state
        self.sampling = sampling


class ScoreRequest(Request):
    """Log-probs of a document's tokens. Answers float32 [n] (the preset first entry kept).

    With a continuous cache each log-prob is the mixture's (`server/continuous_cache.py`); the
    cache recalls by the features, so a bundle whose score graph has none runs it on the step
    graph (`graph`)."""

    answers_next = False

    def __init__(
        self,
        feed: np.ndarray,
        targets: np.ndarray,
        state: State,
        out: np.ndarray,
        deliver: Callable[[object], None],
        cache: tuple[ContinuousCache, float] | None = None,
        graph: str = SCORE,
    ) -> None:
        super().__init__(feed, state, deliver)
        self.targets = targets
        self.out = out  # out[0] is set by the engine; out[1 + i] is the log-prob of targets[i]
        self.cache = cache  # the document's cache and its share of the mixture
        self.graph = graph

    def work(self, chunk: int, split: int | None) -> Work | None:
        n = min(len(self.feed) - self.fed, chunk)  # every log-prob is read: no split
        end = self.fed + n
        return Work(
            self.graph,
            self.feed[self.fed : end],
            self.targets[self.fed : end],
            end < len(self.feed),
        )

    def absorb(self, out: RowOutput) -> object | None:
        if out.logprobs is not None:
            logprobs = out.logprobs
        else:  # a cached score, on the step graph
            assert out.logits is not None
            n = len(out.logits)
            chunk_targets = self.targets[self.fed : self.fed + n, None]
            logprobs = np.take_along_axis(log_softmax(out.logits), chunk_targets, axis=1)[:, 0]
        n = len(logprobs)
        if self.cache is not None:
            cache, lam = self.cache
            assert out.features is not None, "the engine runs a cached score with features"
            p_cache, seen = cache.recall(out.features, self.targets[self.fed : self.fed + n])
            logprobs = mix(logprobs, p_cache, seen, lam)
        self.out[1 + self.fed : 1 + self.fed + n] = logprobs
        self.fed += n
        return self.out if self.fed == len(self.feed) else None


class EmbedRequest(Request):
    """A pooled encoding of the last layer's features. Answers float32 [hidden]."""

    answers_next = False

    def __init__(
        self,
        feed: np.ndarray,
        state: State,
        pooling: str,
        hidden: int,
        deliver: Callable[[object], None],
    ) -> None:
        super().__init__(feed, state, deliver)
        self.pooling = pooling
        self.pooled = np.full(hidden, -np.inf if pooling == "max" else 0.0, dtype=np.float64)

    def work(self, chunk: int, split: int | None) -> Work | None:
        n = min(len(self.feed) - self.fed, chunk)  # no logits are read
        end = self.fed + n
        return Work(PREFILL, self.feed[self.fed : end], None, end < len(self.feed))

    def absorb(self, out: RowOutput) -> object | None:
        features = out.features
        assert features is not None, "embeddings run on the prefill graph"
        if self.pooling == "max":
            np.maximum(self.pooled, features.max(axis=0), out=self.pooled)
        elif self.pooling == "mean":
            self.pooled += features.sum(axis=0, dtype=np.float64)
        else:
            self.pooled[:] = features[-1]
        self.fed += len(features)
        if self.fed < len(self.feed):
            return None
        if self.pooling == "mean":
            return (self.pooled / len(self.feed)).astype(np.float32)
        return self.pooled.astype(np.float32)
