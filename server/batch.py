"""Continuous batching as data: the active requests, their stacked states and one step of work.

A `Batch` owns the recurrent states of its active requests, stacked on the batch axis
(`[layers, N, hidden]` per state tensor), much as TGI's `Batch`: requests join between steps
(`concatenate`) and leave (`filter`, for finished and cancelled ones). Each `step` asks every
request for its pending work - a decode token, a prompt or document chunk - groups the work into
as few onnxruntime runs as the padding rules allow, runs them, scatters the new states back, and
turns outputs into results (sampling every generating row in one vectorised call).

Grouping never changes a result. Work that must carry its final state on (a prompt chunk, a
decode step, a document chunk before the last) runs only with work of exactly its length, so
it is never padded. Work whose final state is thrown away (the last chunk of a document being
scored or embedded) may be right-padded up to a power-of-two length: a recurrent network is
causal, so outputs at the real positions do not see the padding after them.

Which graph serves which work: generation and next-token requests feed their prompts through
the prefill graph (the step graph without its output layer, 40 % of the time per chunk for a
large vocabulary) except the last token, which runs on the step graph for the logits they need,
in the same step, so a step runs the chunks that need no logits first. A short last stretch
(fewer than `prefill_split` tokens before the last) runs whole on the step graph instead: a
second run costs more than the output layer saves on a few tokens. Scoring feeds documents through
the score graph, which returns only the targets' log-probs and the features a continuous cache
recalls by (bundles whose score graph predates the cache score with it on the step graph);
embedding reads the prefill graph's `features`. Bundles exported before the prefill graph run
its work on the step graph and drop the logits.

A step runs every decode token but at most one run's worth of prompt and document chunk
tokens (`run_elements`, rows taking turns), so long documents cannot stall the streams.
Generations past their prompt (the hot path under load) lead the step's one-token run as a
block: their tokens are gathered and their rows sampled in single vectorised calls straight from
the run's output, with no per-request bookkeeping; requests joining or finishing meanwhile
cost only their own rows. Each block of generations is sampled in one call; the sampler treats
rows independently, so how rows are split into blocks never changes a token.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from server.continuous_cache import CacheParams, ContinuousCache, mix, next_logprobs
from server.sampling import GeneratedToken, Sampler, SamplingParams, log_softmax
from server.state_cache import StateCache

State = tuple[np.ndarray, ...]  # one [layers, hidden] float32 array per state tensor

STEP = "step"
SCORE = "score"
PREFILL = "prefill"
# The most float32 values a run may hold per [B, T, V] tensor (16 MiB): bigger groups are
# split. Batching rows of long chunks gains little, and onnxruntime keeps the memory of its
# largest run for good (its arena), so this bounds what scoring adds to the server's memory.
RUN_ELEMENTS = 1 << 22
POOLINGS = ("last", "mean", "max")
# Uniforms a generation draws from its random stream at once.
UNIFORMS_AHEAD = 64


class Runner(Protocol):
    """The onnxruntime sessions, as the batch calls them."""

    def step(
        self, tokens: np.ndarray, states: Sequence[np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """tokens [B, T] -> logits [B, T, V], features [B, T, H], final states."""
        ...

    def score(
        self, tokens: np.ndarray, targets: np.ndarray, states: Sequence[np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray | None, list[np.ndarray]]:
        """tokens, targets [B, T] -> log-prob of each target [B, T], features [B, T, H] (None
        from a score graph exported before the continuous cache), final states."""
        ...

    def prefill(
        self, tokens: np.ndarray, states: Sequence[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """tokens [B, T] -> features [B, T, H], final states (no logits)."""
        ...


@dataclass(frozen=True)
class Failure:
    """A request's work failed; the engine turns this into an EngineError for the caller."""

    message: str
    shutdown: bool = False  # the engine is closing, as opposed to a step that went wrong


# The payload that ends a generation stream (after its last token).
END = object()

Event = tuple["Request", object]


@dataclass(slots=True)
class Work:
    """One request's share of a step: tokens to feed on one graph."""

    graph: str
    tokens: np.ndarray  # int64 [T]
    targets: np.ndarray | None  # int64 [T], score graph only
    keeps_state: bool  # False: the final state is discarded, so right-padding is allowed


class Request:
    """One unit of engine work: the tokens it still has to feed and what it makes of outputs.

    `deliver` is called on the event loop with each payload (see the subclasses).
    `cancelled` may be set from any thread: the request leaves at the next step.
    """

    def __init__(self, feed: np.ndarray, state: State, deliver: Callable[[object], None]) -> None:
        self.feed = feed  # tokens to feed, starting from `state`
        self.fed = 0
        self.state: State | None = state  # taken over by Batch.concatenate
        self.deliver = deliver
        self.cancelled = False
        self.done = False
        self.decoding = False  # a generation past its prompt: one sampled token per step
        self.submitted = time.perf_counter()

    def work(self, chunk: int, split: int | None) -> Work | None:
        """This step's work, at most `chunk` tokens; None when the request needs no run.

        Only the last token's logits are read, so with a prefill graph (`split` not None) the
        chunks before the last go through it, and so do the last chunk's tokens but its last
        when there are at least `split` of them; the last token then runs alone on the step
        graph. Fewer go with it, in one run: a run of its own costs more than the output layer
        saves on a few tokens (see `Engine.prefill_split`)."""
        left = len(self.feed) - self.fed
        if split is not None and left > 1:
            before = left - 1
            if before > chunk or before >= split:
                n = min(before, chunk)
                return Work(PREFILL, self.feed[self.fed : self.fed + n], None, True)
        n = min(left, chunk)
        return Work(STEP, self.feed[self.fed : self.fed + n], None, True)

    def advance(self, n: int) -> bool:
        """Count `n` tokens fed (a decode token is not part of `feed`); True when the
        step's last logits are the next-token logits after everything fed so far."""
        self.fed = min(self.fed + n, len(self.feed))
        return self.fed == len(self.feed)


class NextRequest(Request):
    """The next-token log-probs after a context. Delivers a read-only float32 [V] array."""

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


@dataclass(frozen=True, slots=True)
class Recalled:
    """What a `RecallNextRequest` delivers: the mixed next-token log-probs, and for the engine's
    recall cache the model's own, the last `window` + 1 features and the state at the end."""

    mixed: np.ndarray  # float32 [V], read-only
    logprobs: np.ndarray  # float32 [V]
    features: np.ndarray  # float32 [m, hidden]
    state: State


class RecallNextRequest(Request):
    """The next-token log-probs after a context with the continuous cache mixed in. Delivers a
    `Recalled`.

    The cache recalls by the features of the context's last `window` positions, so the request
    starts from a state at least that far back, or from one whose features up to there are
    known (`features`: the features after the tokens just before the feed, the root's after
    eos included when the feed starts at the context's start), and keeps them as they come."""

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

    # `work` is the base class's: the final state is kept (for the recall cache), so no chunk
    # is padded.

    def absorb(self, features: np.ndarray, logits: np.ndarray | None) -> bool:
        """Take one chunk's features [n, hidden] and, from the step graph, its last logits
        [V] (None from the prefill graph); True when done."""
        kept = features if self.features is None else np.concatenate((self.features, features))
        self.features = kept[-(self.params.window + 1) :]  # the pairs' keys and the query
        if logits is not None:
            self.last_logits = logits
        self.fed += len(features)
        return self.fed == len(self.feed)

    def result(self, state: State) -> Recalled:
        assert self.last_logits is not None and self.features is not None
        logprobs = log_softmax(self.last_logits)
        return Recalled(
            recall_logprobs(logprobs, self.features, self.context, self.params),
            logprobs,
            self.features,
            state,
        )


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
    """Token-by-token generation. Delivers `GeneratedToken`s, then `END`."""

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
        self.head = head
        self.params = params
        self.max_tokens = max_tokens
        self.stop_ids = stop_ids
        self.rng = params.rng()
        # The rng's uniforms drawn a few at a time: the same stream as one at a time, cheaper.
        self._uniforms: list[float] = []
        self._drawn = 0
        self.generated = 0
        self.next_token = -1
        self._seen: set[int] | None = None
        self.history: np.ndarray | None = None
        if params.repetition_penalty != 1.0:
            self._seen = set(prompt.tolist())
            self.history = np.fromiter(self._seen, dtype=np.int64, count=len(self._seen))

    def work(self, chunk: int, split: int | None) -> Work | None:
        if self.head is not None:
            return None
        if self.fed < len(self.feed):
            return super().work(chunk, split)
        return Work(STEP, np.array([self.next_token], dtype=np.int64), None, True)

    def uniform(self) -> float:
        """The next uniform of the request's random stream (one per sampled token)."""
        if self._drawn == len(self._uniforms):
            ahead = min(UNIFORMS_AHEAD, max(1, self.max_tokens - self.generated))
            self._uniforms = self.rng.random(ahead).tolist()
            self._drawn = 0
        self._drawn += 1
        return self._uniforms[self._drawn - 1]

    def emitted(self, token: int) -> bool:
        """Record a sampled token; True when it ends the generation."""
        self.generated += 1
        self.next_token = token
        self.decoding = True
        if self._seen is not None and token not in self._seen:
            self._seen.add(token)
            self.history = np.append(self.history, token)  # type: ignore[arg-type]
        return token in self.stop_ids or self.generated >= self.max_tokens


class ScoreRequest(Request):
    """Log-probs of a document's tokens. Delivers float32 [n] (the preset first entry kept).

    With a continuous cache each log-prob is the mixture's (`server/continuous_cache.py`); the
    cache recalls by the features, so a bundle whose score graph has none runs it on the step
    graph (`graph`)."""

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

    def absorb(self, logprobs: np.ndarray, features: np.ndarray | None = None) -> bool:
        """Take one chunk's target log-probs (and, with a cache, its features); True when the
        document is done."""
        n = len(logprobs)
        if self.cache is not None:
            cache, lam = self.cache
            assert features is not None, "the engine runs a cached score on a graph with features"
            p_cache, seen = cache.recall(features, self.targets[self.fed : self.fed + n])
            logprobs = mix(logprobs, p_cache, seen, lam)
        self.out[1 + self.fed : 1 + self.fed + n] = logprobs
        self.fed += n
        return self.fed == len(self.feed)


class EmbedRequest(Request):
    """A pooled encoding of the last layer's features. Delivers float32 [hidden]."""

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

    def absorb(self, features: np.ndarray) -> bool:
        """Take one chunk's features [n, hidden]; True when the text is done."""
        if self.pooling == "max":
            np.maximum(self.pooled, features.max(axis=0), out=self.pooled)
        elif self.pooling == "mean":
            self.pooled += features.sum(axis=0, dtype=np.float64)
        else:
            self.pooled[:] = features[-1]
        self.fed += len(features)
        return self.fed == len(self.feed)

    def result(self) -> np.ndarray:
        if self.pooling == "mean":
            return (self.pooled / len(self.feed)).astype(np.float32)
        return self.pooled.astype(np.float32)


@dataclass(slots=True)
class _Block:
    """Generations whose next-token logits are ready: `logits[j]` `[k, V]` for `requests[j]`,
    which is batch row `rows[j]`. Each block is sampled in one vectorised call."""

    requests: list[GenerateRequest]
    rows: list[int]
    logits: np.ndarray


@dataclass(slots=True)
class _Head:
    """A request whose next-token logits are ready: row `index` of `logits` `[k, V]`."""

    request: Request
    row: int
    logits: np.ndarray
    index: int


class Batch:
    """The active requests and their stacked states; see the module docstring."""

    def __init__(
        self,
        num_states: int,
        vocab_size: int,
        hidden: int,
        cache: StateCache | None,
        sampler: Sampler | None = None,
        run_elements: int = RUN_ELEMENTS,
        prefill_split: int | None = None,
    ) -> None:
        self.requests: list[Request] = []
        self.states: list[np.ndarray] = []  # [layers, N, hidden] each
        self.num_states = num_states
        self.vocab_size = vocab_size
        self.hidden = hidden
        self.cache = cache
        self.sampler = sampler if sampler is not None else Sampler()
        self.run_elements = run_elements
        # Tokens before a request's last from which they run on the prefill graph (Request.work).
        self.prefill_split = prefill_split
        self._turn = 0  # the row whose chunk goes first in the next step
        # Prefix states the step reached, for the state cache (see `store_prefixes`).
        self._prefixes: list[tuple[np.ndarray, State, np.ndarray, int | None]] = []

    def __len__(self) -> int:
        return len(self.requests)

    def concatenate(self, requests: Sequence[Request]) -> None:
        """Add requests as new rows, starting from each one's `state`."""
        if not requests:
            return
        new = []
        for j in range(self.num_states):
            new.append(np.stack([r.state[j] for r in requests], axis=1))  # type: ignore[index]
        for r in requests:
            r.state = None
        if self.requests:
            self.states = [
                np.concatenate((s, n), axis=1) for s, n in zip(self.states, new, strict=True)
            ]
        else:
            self.states = new
        self.requests.extend(requests)

    def filter(self) -> list[Request]:
        """Drop finished and cancelled requests; return those dropped."""
        keep = [i for i, r in enumerate(self.requests) if not (r.done or r.cancelled)]
        if len(keep) == len(self.requests):
            return []
        dropped = [r for r in self.requests if r.done or r.cancelled]
        idx = np.array(keep, dtype=np.intp)
        self.states = [s[:, idx, :] for s in self.states]
        self.requests = [self.requests[i] for i in keep]
        return dropped

    def row_state(self, row: int) -> State:
        """A read-only copy of one row's state."""
        state = tuple(s[:, row, :].copy() for s in self.states)
        for s in state:
            s.setflags(write=False)
        return state

    def store_prefixes(self) -> None:
        """Put the prefix states the last step reached into the state cache."""
        if self.cache is not None:
            for tokens, state, logprobs, key in self._prefixes:
                self.cache.insert(tokens, state, logprobs, key)
        self._prefixes.clear()

    def step(self, runner: Runner, chunk: int, batching: bool) -> list[Event]:
        """Run one step of every request's pending work; return the payloads to deliver."""
        requests = self.requests
        # With batching, generations past their prompt (one sampled token each) join the
        # step's one-token group as a block: no per-row bookkeeping, sampled straight from
        # the run's output. Under load that is nearly every row of every step.
        decoders: list[int] = []
        works: list[Work | None] = []
        for row, r in enumerate(requests):
            if batching and r.decoding:
                decoders.append(row)
                works.append(None)
            else:
                works.append(r.work(chunk, self.prefill_split))
        if len(decoders) < len(requests):
            self._take_turns(works)
        events: list[Event] = []
        heads: list[_Head] = []
        blocks: list[_Block] = []
        # Work that needs no logits runs first; a request whose prefill left only its last
        # few tokens feeds them on the step graph in this step, beside the decoding rows.
        early = [w if w is not None and w.graph != STEP else None for w in works]
        if any(w is not None for w in early):
            self._run_groups(runner, chunk, batching, early, [], heads, blocks, events)
            for row, w in enumerate(early):
                if w is None:
                    continue
                r = requests[row]
                after = None if w.graph != PREFILL or r.done else r.work(chunk, self.prefill_split)
                works[row] = after if after is not None and after.graph == STEP else None
        self._run_groups(runner, chunk, batching, works, decoders, heads, blocks, events)
        for row, r in enumerate(requests):
            if isinstance(r, GenerateRequest) and r.head is not None:
                heads.append(_Head(r, row, r.head[None, :], 0))
                r.head = None
        if heads:
            self._finish_heads(heads, blocks, events)
        for block in blocks:
            self._sample(block, events)
        return events

    def _run_groups(
        self,
        runner: Runner,
        chunk: int,
        batching: bool,
        works: list[Work | None],
        decoders: list[int],
        heads: list[_Head],
        blocks: list[_Block],
        events: list[Event],
    ) -> None:
        """Run `works` and the `decoders` rows in as few runs as the padding rules allow."""
        # (graph, run length, the row when each request runs alone else -1) -> rows
        groups: dict[tuple[str, int, int], list[int]] = {}
        if decoders:
            groups[(STEP, 1, -1)] = list(decoders)
        for row, w in enumerate(works):
            if w is None:
                continue
            n = len(w.tokens)
            if not batching:
                key = (w.graph, n, row)
            elif w.keeps_state:
                key = (w.graph, n, -1)
            else:
                key = (w.graph, _padded(n, chunk), -1)
            groups.setdefault(key, []).append(row)
        widths = {STEP: self.vocab_size + self.hidden, SCORE: self.vocab_size, PREFILL: self.hidden}
        for key, rows in groups.items():
            graph, length, _ = key
            per_run = max(1, self.run_elements // (length * widths[graph]))
            # The decoders lead the rows of their group.
            leading = len(decoders) if key == (STEP, 1, -1) else 0
            for start in range(0, len(rows), per_run):
                part = rows[start : start + per_run]
                lead = max(0, min(len(part), leading - start))
                self._run(runner, graph, length, part, lead, works, heads, blocks, events)

    def _take_turns(self, works: list[Work | None]) -> None:
        """Hold back chunks beyond one full run of tokens this step, in turns.

        Decode steps always run; prompt and document chunks share a budget of one run's
        worth of tokens per step, so a flood of long documents cannot stall every stream's
        next token for many runs (nor grow memory), and each request gets its turn first.
        """
        budget = self.run_elements // (self.vocab_size + self.hidden)
        count = len(works)
        used = 0
        for k in range(count):
            row = (self._turn + k) % count
            w = works[row]
            if w is None or len(w.tokens) == 1:
                continue
            if used and used + len(w.tokens) > budget:
                works[row] = None
            else:
                used += len(w.tokens)
        self._turn += 1

    def fail(self, message: str, shutdown: bool = False) -> list[Event]:
        """End every request with a failure (an unexpected error in a step, or shutdown)."""
        events: list[Event] = []
        for r in self.requests:
            if not (r.done or r.cancelled):
                r.done = True
                events.append((r, Failure(message, shutdown)))
        return events

    def _run(
        self,
        runner: Runner,
        graph: str,
        length: int,
        rows: list[int],
        lead: int,
        works: list[Work | None],
        heads: list[_Head],
        blocks: list[_Block],
        events: list[Event],
    ) -> None:
        """One onnxruntime run of `rows`; the first `lead` of them are decoding generations."""
        k = len(rows)
        requests = self.requests
        tokens = np.zeros((k, length), dtype=np.int64)
        targets = np.zeros((k, length), dtype=np.int64) if graph == SCORE else None
        if lead:
            tokens[:lead, 0] = np.fromiter(
                (requests[row].next_token for row in rows[:lead]),  # type: ignore[attr-defined]
                dtype=np.int64,
                count=lead,
            )
        for i in range(lead, k):
            w = works[rows[i]]
            assert w is not None
            tokens[i, : len(w.tokens)] = w.tokens
            if targets is not None:
                assert w.targets is not None
                targets[i, : len(w.targets)] = w.targets
        # Every row, in batch order: the run takes and returns the batch's own state arrays.
        full = k == len(requests) and all(a < b for a, b in itertools.pairwise(rows))
        idx = np.array(rows, dtype=np.intp)
        states = self.states if full else [s[:, idx, :] for s in self.states]
        logits: np.ndarray | None = None
        try:
            if targets is not None:
                logprobs, features, new = runner.score(tokens, targets, states)
            elif graph == PREFILL:
                features, new = runner.prefill(tokens, states)
            else:
                logits, features, new = runner.step(tokens, states)
        except Exception as e:  # onnxruntime raises several types; the requests must end
            for row in rows:
                r = requests[row]
                r.done = True
                events.append((r, Failure(f"onnxruntime run failed: {e}")))
            return
        if full:
            self.states = list(new)
        else:
            for old, fresh in zip(self.states, new, strict=True):
                old[:, idx, :] = fresh
        # Rows that need next-token logits ran unpadded, so their last position is `length - 1`.
        last = logits[:, length - 1, :] if logits is not None else None
        if lead:
            decoding = [requests[row] for row in rows[:lead]]
            blocks.append(_Block(decoding, rows[:lead], last[:lead]))  # type: ignore[arg-type, index]
        for i in range(lead, k):
            row = rows[i]
            r = requests[row]
            n = len(works[row].tokens)  # type: ignore[union-attr]
            row_features = None if features is None else features[i, :n]
            if isinstance(r, ScoreRequest):
                if targets is None:  # a cached score, on the step graph
                    assert logits is not None
                    chunk_targets = r.targets[r.fed : r.fed + n, None]
                    picked = np.take_along_axis(log_softmax(logits[i, :n]), chunk_targets, axis=1)
                    done = r.absorb(picked[:, 0], row_features)
                else:
                    done = r.absorb(logprobs[i, :n], row_features)
                if done:
                    r.done = True
                    events.append((r, r.out))
            elif isinstance(r, EmbedRequest):
                assert row_features is not None, "embeddings run on the prefill graph"
                if r.absorb(row_features):
                    r.done = True
                    events.append((r, r.result()))
            elif isinstance(r, RecallNextRequest):
                assert row_features is not None, "the prefill and step graphs give features"
                if r.absorb(row_features, None if logits is None else logits[i, n - 1]):
                    r.done = True
                    events.append((r, r.result(self.row_state(row))))
            elif r.advance(n):
                heads.append(_Head(r, row, last, i))  # type: ignore[arg-type]

    def _finish_heads(self, heads: list[_Head], blocks: list[_Block], events: list[Event]) -> None:
        """Turn ready next-token logits into results: log-probs, or blocks to sample."""
        nexts = [h for h in heads if isinstance(h.request, NextRequest)]
        gens = [h for h in heads if isinstance(h.request, GenerateRequest)]
        if nexts:
            logprobs = log_softmax(_stack(nexts))
            for j, h in enumerate(nexts):
                r = h.request
                assert isinstance(r, NextRequest)
                lp = logprobs[j].copy()
                lp.setflags(write=False)
                if self.cache is not None:
                    self._prefixes.append((r.context, self.row_state(h.row), lp, r.key))
                r.done = True
                events.append((r, lp))
        if gens:
            requests: list[GenerateRequest] = [h.request for h in gens]  # type: ignore[misc]
            blocks.append(_Block(requests, [h.row for h in gens], _stack(gens)))

    def _sample(self, block: _Block, events: list[Event]) -> None:
        """Sample each request's next token from its row of the block's logits."""
        requests, rows, logits = block.requests, block.rows, block.logits
        uniforms = np.array([r.uniform() for r in requests])
        samples = self.sampler.sample(
            logits, [r.params for r in requests], [r.history for r in requests], uniforms
        )
        tokens = samples.tokens.tolist()
        logprobs = samples.logprobs.tolist()
        for j, r in enumerate(requests):
            if r.generated == 0 and len(r.feed) and self.cache is not None:
                # The prompt's state, for a later request on the same prompt.
                prompt_lp = logits[j] - samples.lse[j]
                prompt_lp.setflags(write=False)
                self._prefixes.append((r.prompt, self.row_state(rows[j]), prompt_lp, r.key))
            token = tokens[j]
            events.append((r, GeneratedToken(token, logprobs[j], samples.top[j])))
            if r.emitted(token):
                r.done = True
                events.append((r, END))


def _padded(n: int, chunk: int) -> int:
    """The run length a discard-state chunk of `n` tokens is padded to."""
    return min(1 << (n - 1).bit_length(), max(chunk, n))


def _stack(heads: list[_Head]) -> np.ndarray:
    """The heads' logits as one [k, V] array, without a copy when they are one run's rows."""
    first = heads[0].logits
    if len(heads) == first.shape[0] and all(
        h.logits is first and h.index == i for i, h in enumerate(heads)
    ):
        return np.ascontiguousarray(first)
    return np.stack([h.logits[h.index] for h in heads])
