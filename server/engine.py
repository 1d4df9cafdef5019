"""The inference engine: onnxruntime sessions, continuous batching, sampling, the state cache.

The service calls the engine at the token level (see `Engine`). One engine serves one model
version. Its batching loop runs on a worker thread (or several, `EngineConfig.batch_threads`,
each stepping a batch of its own): onnxruntime's `run` and numpy's array work release the GIL, so
one thread's run overlaps another's sampling, and the asyncio event loop keeps serving while
steps run. Requests cross to the workers through one locked queue, each worker taking its share,
and results come back with one `call_soon_threadsafe` per step. Two exceptions
keep the overheads down where they dominate: a short next-token request arriving while the
engine is idle runs on the event loop at once (two thread wake-ups cost more than its step),
and under load a generation's tokens reach its consumer a few at a time (`TokenStream`), so
the gRPC layer sends fewer, larger messages.

Every text is conditioned on the bundle's eos token: the engine feeds eos to the zero state
once at start (the "root") and every request starts from that state, or from a longer prefix
found in the state cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from server.batch import (
    POOLINGS,
    SCORE,
    STEP,
    Batch,
    EmbedRequest,
    Event,
    Failure,
    GenerateRequest,
    NextRequest,
    Recalled,
    RecallNextRequest,
    Request,
    ScoreRequest,
    State,
    recall_logprobs,
)
from server.bundle import Bundle, BundleError
from server.continuous_cache import CacheParams, ContinuousCache
from server.metrics import EngineMetrics
from server.sampling import GeneratedToken, SamplingParams, log_softmax
from server.state_cache import StateCache

__all__ = [
    "Engine",
    "EngineConfig",
    "EngineError",
    "GeneratedToken",
    "NoContinuousCache",
    "Overloaded",
    "SamplingParams",
    "TokenStream",
    "session_options",
]

log = logging.getLogger(__name__)

PROVIDERS = ("cpu", "cuda", "auto")
# A next-token request with at most this many new tokens, arriving while the engine has
# nothing else to do, runs on the event loop at once (see `Engine.next_token_logprobs`).
INLINE_TOKENS = 16
# Requests in the engine from which a generation's tokens are handed over a few at a time
# (`EngineConfig.stream_tokens`, see `TokenStream`).
COALESCE_ACTIVE = 8
# Runs of each graph timed at start to choose `Engine.prefill_split` (the fastest counts).
SPLIT_TIMINGS = 5
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class EngineError(Exception):
    """The engine cannot load, start or finish a request (the message says why)."""


class Overloaded(EngineError):
    """Admission refused: too many requests are waiting (RESOURCE_EXHAUSTED)."""


class EngineClosed(EngineError):
    """The engine is not running or is shutting down (UNAVAILABLE, unlike a failed step)."""


class NoContinuousCache(ValueError):
    """A call asked for the continuous cache of a model that has none (FAILED_PRECONDITION)."""


def _failure_error(failure: Failure) -> EngineError:
    return (EngineClosed if failure.shutdown else EngineError)(failure.message)


@dataclass(frozen=True)
class EngineConfig:
    provider: str = "cpu"  # "cpu" | "cuda" | "auto"; cuda without a GPU -> EngineError at start
    intra_op_threads: int = 1
    inter_op_threads: int = 1
    allow_spinning: bool = False
    batching: bool = True  # False: one onnxruntime run per request (for comparison)
    max_batch_size: int = 64  # requests gathered into one run
    # Worker threads, each stepping its own batch, the queue's requests shared out between
    # them: while one thread's onnxruntime run computes, another samples. More than one pays
    # on machines with cores to spare under many streams (docs/performance.md).
    batch_threads: int = 1
    max_queue_wait_ms: float = 2.0  # how long a step may wait to fill a batch
    prefill_chunk: int = 128  # tokens of a prompt/document fed per step per request
    max_queued: int = 1024  # pending requests beyond which submit raises Overloaded
    state_cache_bytes: int = 64 * 2**20
    # Under load, a generation's tokens reach its consumer this many at a time (see
    # TokenStream); 1: always one at a time.
    stream_tokens: int = 4
    # Tokens before a request's last from which they are fed on the prefill graph in a run of
    # their own (see Engine.prefill_split); None: measured when the engine starts.
    prefill_split: int | None = None

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"engine {name} must be {rule}, not {getattr(self, name)!r}")

        check(self.provider in PROVIDERS, "provider", f"one of {', '.join(PROVIDERS)}")
        check(self.intra_op_threads >= 0, "intra_op_threads", ">= 0 (0: onnxruntime decides)")
        check(self.inter_op_threads >= 0, "inter_op_threads", ">= 0 (0: onnxruntime decides)")
        for name in (
            "max_batch_size",
            "batch_threads",
            "prefill_chunk",
            "max_queued",
            "stream_tokens",
        ):
            check(getattr(self, name) >= 1, name, ">= 1")
        check(self.max_queue_wait_ms >= 0, "max_queue_wait_ms", ">= 0")
        check(self.state_cache_bytes >= 0, "state_cache_bytes", ">= 0")
        split = self.prefill_split
        check(split is None or split >= 1, "prefill_split", "None (measured) or >= 1")


@dataclass(frozen=True, slots=True)
class _Start:
    """Where a request starts: after `length` tokens of its context, in `state`."""

    length: int
    state: State
    logprobs: np.ndarray  # next-token log-probs at that point
    key: int | None = None  # the state cache's key of the whole context (None: not looked up)
    features: np.ndarray | None = None  # the last layer's output there (kept for the root)


class _Sessions:
    """The step, score and prefill sessions, called with the bundle's input and output names."""

    def __init__(
        self,
        step: ort.InferenceSession,
        score: ort.InferenceSession | None,
        prefill: ort.InferenceSession | None,
        bundle: Bundle,
        metrics: EngineMetrics | None,
    ) -> None:
        self._step = step
        self._score = score
        self._prefill = prefill
        self._state_inputs = [s.input for s in bundle.state]
        self.metrics = metrics

    def step(
        self, tokens: np.ndarray, states: Sequence[np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        feeds = dict(zip(self._state_inputs, states, strict=True))
        feeds["tokens"] = tokens
        logits, features, *new = self._step.run(None, feeds)
        if self.metrics is not None:
            self.metrics.observe_batch(len(tokens))
        return logits, features, new

    def score(
        self, tokens: np.ndarray, targets: np.ndarray, states: Sequence[np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray | None, list[np.ndarray]]:
        if self._score is None:
            # A bundle without a score graph: the step graph's logits, reduced here.
            logits, features, new = self.step(tokens, states)
            picked = np.take_along_axis(log_softmax(logits), targets[..., None], axis=-1)
            return picked[..., 0], features, new
        feeds = dict(zip(self._state_inputs, states, strict=True))
        feeds["tokens"] = tokens
        feeds["targets"] = targets
        logprobs, *rest = self._score.run(None, feeds)
        if self.metrics is not None:
            self.metrics.observe_batch(len(tokens))
        new = rest[-len(self._state_inputs) :]
        return logprobs, rest[0] if len(rest) > len(new) else None, new

    @property
    def has_prefill(self) -> bool:
        return self._prefill is not None

    def prefill(
        self, tokens: np.ndarray, states: Sequence[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        if self._prefill is None:
            # A bundle exported before the prefill graph: the step graph, logits dropped.
            _, features, new = self.step(tokens, states)
            return features, new
        feeds = dict(zip(self._state_inputs, states, strict=True))
        feeds["tokens"] = tokens
        features, *new = self._prefill.run(None, feeds)
        if self.metrics is not None:
            self.metrics.observe_batch(len(tokens))
        return features, new


class TokenStream:
    """One generation's tokens as they are made: an async iterator of `GeneratedToken`.

    The request is queued (and Overloaded raised) on the first `__anext__`. `aclose()`, or
    dropping the stream, takes the request out of the batch at the next step. Payloads arrive
    from the batching thread through `Engine._dispatch`, on the event loop.

    Under load (at least `COALESCE_ACTIVE` requests in the engine) the consumer is woken
    only when `stream_tokens` tokens are ready (or the generation ended), and takes them
    together with `take_ready`: each message to a client, on both ends of the connection,
    costs more than the model's work for a token, and with many streams that cost is what
    limits throughput. The first token is never held back, and lightly loaded streams get
    every token as soon as it is made.
    """

    def __init__(
        self, engine: Engine, start: Callable[[TokenStream], GenerateRequest], stream_tokens: int
    ) -> None:
        self._engine = engine
        self._start: Callable[[TokenStream], GenerateRequest] | None = start
        self._request: GenerateRequest | None = None
        self._items: deque[object] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._stream_tokens = stream_tokens
        self._delivered = 0  # tokens received so far

    def __aiter__(self) -> TokenStream:
        return self

    async def __anext__(self) -> GeneratedToken:
        if self._start is not None:
            start, self._start = self._start, None
            self._request = start(self)
        while not self._ready():
            assert self._engine._loop is not None
            self._waiter = self._engine._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if not self._items:  # closed
            raise StopAsyncIteration
        item = self._items.popleft()
        if isinstance(item, GeneratedToken):
            return item
        self._close()
        if isinstance(item, Failure):
            raise _failure_error(item)
        raise StopAsyncIteration  # END

    def _ready(self) -> bool:
        """Whether the consumer should go on: see the class docstring."""
        items = self._items
        if not items:
            return self._closed
        return (
            len(items) >= self._stream_tokens
            or not isinstance(items[-1], GeneratedToken)  # the end or a failure is here
            or self._delivered <= 1
            or self._engine.active < COALESCE_ACTIVE
        )

    def take_ready(self) -> list[GeneratedToken]:
        """Under load, the tokens already here (after the one `__anext__` returned), without
        waiting; otherwise none, so that a lightly loaded stream goes one token at a time."""
        items = self._items
        ready: list[GeneratedToken] = []
        if self._engine.active < COALESCE_ACTIVE:
            return ready
        while items and isinstance(items[0], GeneratedToken):
            ready.append(items.popleft())  # type: ignore[arg-type]
        return ready

    async def aclose(self) -> None:
        self._start = None
        self._close()

    def put(self, item: object) -> None:
        """Deliver a payload (event loop); wake the consumer when it should go on."""
        self._items.append(item)
        if isinstance(item, GeneratedToken):
            self._delivered += 1
        waiter = self._waiter
        if waiter is not None and not waiter.done() and self._ready():
            waiter.set_result(None)

    def _close(self) -> None:
        self._closed = True
        if self._request is not None:
            self._request.cancelled = True

    def __del__(self) -> None:
        if self._request is not None:
            self._request.cancelled = True


def _settle(future: asyncio.Future[Any], payload: object) -> None:
    if future.done():
        return
    if isinstance(payload, Failure):
        future.set_exception(_failure_error(payload))
    else:
        future.set_result(payload)


def _ignore(payload: object) -> None:
    """The delivery of a request the engine runs inline and reads back itself."""


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


class Engine:
    """Runs one model version's requests in continuous batches (see the module docstring).

    Results are read-only numpy arrays (next-token log-probs may be shared with the state
    cache). All methods must be called from the event loop that ran `start`.
    """

    def __init__(
        self,
        bundle: Bundle,
        config: EngineConfig | None = None,
        metrics: EngineMetrics | None = None,
    ) -> None:
        self.bundle = bundle
        self.config = config if config is not None else EngineConfig()
        self.metrics = metrics
        self.provider = ""  # the execution provider in use, known after start()
        # With a continuous cache, a quarter of the bytes hold the recall cache: prefixes that
        # cached next-token calls saw, with the features the recall needs (up to `window` + 1
        # rows each), so a typing session's next call feeds only its new tokens.
        budget = self.config.state_cache_bytes
        recall_bytes = budget // 4 if bundle.continuous_cache is not None else 0
        self.cache = StateCache(budget - recall_bytes, metrics.state_cache if metrics else None)
        self.recall_cache = StateCache(recall_bytes, metrics.recall_cache if metrics else None)
        self._score_lacks_features = bundle.score_graph is not None and not bundle.score_features
        self._cond = threading.Condition()
        self._queue: deque[Request] = deque()
        self._closing = False
        self._idle_threads = 0  # batching threads waiting with nothing to do (lock held)
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sessions: _Sessions | None = None
        self._root: _Start | None = None
        self._batches: list[Batch] = []  # one per batching thread
        # Feed the tokens before a request's last on the prefill graph when there are at least
        # this many (None: never; the step graph takes them all in one run). Known after start.
        self.prefill_split: int | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the sessions, feed eos (the root state), warm up and start the batching loops."""
        if self._threads or self._closing:
            raise EngineError("the engine was already started")
        providers = providers_for(self.config.provider)
        options = session_options(self.config)
        try:
            step = await self._open_session("step", options, providers)
            score, prefill = [  # graphs a bundle may lack
                None if path is None else await self._open_session(graph, options, providers)
                for graph, path in (
                    ("score", self.bundle.score_graph),
                    ("prefill", self.bundle.prefill_graph),
                )
            ]
        except BundleError as e:
            raise EngineError(str(e)) from e
        self.provider = step.get_providers()[0]
        if self.config.provider == "cuda" and self.provider != CUDA:
            raise EngineError(
                f"provider 'cuda' was asked for but onnxruntime could not start "
                f"{CUDA} for {self.bundle.step_graph} (it fell back to {self.provider}); "
                "check the CUDA and cuDNN libraries"
            )
        log.info("%s version %s runs on %s", self.bundle.name, self.bundle.version, self.provider)
        self._sessions = _Sessions(step, score, prefill, self.bundle, None)
        self._root = await asyncio.to_thread(self._warm_up)
        self.prefill_split = await asyncio.to_thread(self._choose_prefill_split)
        self._sessions.metrics = self.metrics
        self._loop = asyncio.get_running_loop()
        self._batches = [
            Batch(
                len(self.bundle.state),
                self.bundle.vocab_size,
                self.bundle.hidden,
                self.cache,
                prefill_split=self.prefill_split,
            )
            for _ in range(self.config.batch_threads)
        ]
        self._threads = [
            threading.Thread(
                target=self._work,
                args=(batch,),
                name=f"engine-{self.bundle.name}-{self.bundle.version}-{i}",
                daemon=True,
            )
            for i, batch in enumerate(self._batches)
        ]
        for thread in self._threads:
            thread.start()

    async def _open_session(
        self, graph: str, options: ort.SessionOptions, providers: list[str]
    ) -> ort.InferenceSession:
        return await asyncio.to_thread(self.bundle.open_session, graph, options, providers)

    async def close(self) -> None:
        """Stop the batching loop; requests still queued or running get EngineError."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        for thread in self._threads:
            await asyncio.to_thread(thread.join)

    @property
    def capacity(self) -> int:
        """Requests the batches hold at most: beyond that, more wait in the queue."""
        return self.config.max_batch_size * self.config.batch_threads

    @property
    def active(self) -> int:
        """Requests admitted to a batch or waiting for one."""
        return len(self._queue) + sum(len(batch) for batch in self._batches)

    # ---- the API ---------------------------------------------------------------------------

    async def next_token_logprobs(
        self, context_ids: Sequence[int], continuous_cache: bool = False
    ) -> np.ndarray:
        """Log-softmax [V] of the next token after eos + context (cached prefixes reused).

        With `continuous_cache`, mixed with the bundle's continuous cache over the context's
        last `window` tokens (server/continuous_cache.py). That needs the features there, so the
        context is fed from a cached state at least that far back (or the root), which makes
        such a call cost up to `window` tokens of prefill.
        """
        ids = self._tokens(context_ids, "context_ids")
        if continuous_cache:
            return await self._next_with_cache(ids)
        start = self._start(ids)
        if start.length == len(ids):
            return start.logprobs
        feed = ids[start.length :]
        if len(feed) <= INLINE_TOKENS and self._idle_now():
            return self._next_inline(ids, feed, start)
        return await self._call(functools.partial(NextRequest, ids, feed, start.state, start.key))

    async def _next_with_cache(self, ids: np.ndarray) -> np.ndarray:
        params = self.cache_params()
        root = self._root_start()
        if len(ids) == 0:
            return root.logprobs  # no pairs yet: the model's alone
        # The query is the features after the last token and the keys those before each of
        # the last `window` tokens. The recall cache has them for contexts cached calls saw
        # (typing extends the last one); else feed from a prefix of at most len - window - 1.
        hit, key = self.recall_cache.find(ids)
        if hit is not None and hit.length == len(ids):
            assert hit.features is not None
            return recall_logprobs(hit.logprobs, hit.features, ids, params)
        if hit is not None:
            length, state, features = hit.length, hit.state, hit.features
        else:
            start = self._start(ids[: max(0, len(ids) - params.window - 1)])
            length, state = start.length, start.state
            features = root.features if start.length == 0 else None
        make = functools.partial(RecallNextRequest, ids, ids[length:], state, features, params)
        recalled: Recalled
        if len(ids) - length <= INLINE_TOKENS and self._idle_now():
            recalled = self._recall_inline(make(_ignore))
        else:
            recalled = await self._call(make)
        self.recall_cache.insert(ids, recalled.state, recalled.logprobs, key, recalled.features)
        return recalled.mixed

    def cache_params(self) -> CacheParams:
        """The bundle's continuous cache; NoContinuousCache when it has none."""
        params = self.bundle.continuous_cache
        if params is None:
            raise NoContinuousCache(
                f"model {self.bundle.name!r} version {self.bundle.version} has no continuous "
                "cache (its manifest has no continuous_cache block; tune one with "
                "`python -m training.cache CHECKPOINT` and export again)"
            )
        return params

    def generate(
        self,
        prompt_ids: Sequence[int],
        max_tokens: int,
        params: SamplingParams,
        stop_ids: frozenset[int] = frozenset(),
    ) -> TokenStream:
        """Up to `max_tokens` tokens after eos + prompt, each as soon as its step ran.

        Ends after a token in `stop_ids`. Closing the iterator (aclose, or dropping it after a
        break or a cancellation) takes the request out of the batch at the next step.
        Arguments are checked here; the request is queued (and Overloaded raised) on the first
        iteration. Under load, tokens arrive a few at a time: see `TokenStream`.
        """
        ids = self._tokens(prompt_ids, "prompt_ids")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, not {max_tokens}")
        params.check_vocab(self.bundle.vocab_size)
        stops = frozenset(stop_ids)
        outside = sorted(i for i in stops if not 0 <= i < self.bundle.vocab_size)
        if outside:
            raise ValueError(
                f"stop_ids {outside[:5]} are outside the vocabulary (size {self.bundle.vocab_size})"
            )
        begin = functools.partial(self._begin, ids, max_tokens, params, stops)
        return TokenStream(self, begin, self.config.stream_tokens)

    async def score(self, token_ids: Sequence[int], continuous_cache: bool = False) -> np.ndarray:
        """float32 [n]: the log-prob of each token given eos and the tokens before it.

        Fed in chunks with the state carried, so memory does not grow with the text. With
        `continuous_cache`, each is the mixture with the bundle's continuous cache over the
        text's own earlier tokens (server/continuous_cache.py).
        """
        params = self.cache_params() if continuous_cache else None
        ids = self._tokens(token_ids, "token_ids")
        root = self._root_start()
        out = np.empty(len(ids), dtype=np.float32)
        if len(ids) == 0:
            return _frozen(out)
        out[0] = root.logprobs[ids[0]]
        if len(ids) == 1:
            return _frozen(out)
        cache = None
        if continuous_cache:
            assert params is not None and root.features is not None
            recall = ContinuousCache(params.window, params.theta, self.bundle.hidden)
            recall.recall(root.features, ids[:1])  # remember that ids[0] followed eos
            cache = (recall, params.lam)
        # The cache needs features: a score graph exported before it has none, so such a
        # bundle's cached scores run on the step graph.
        graph = STEP if cache is not None and self._score_lacks_features else SCORE
        result = await self._call(
            functools.partial(
                ScoreRequest, ids[:-1], ids[1:], root.state, out, cache=cache, graph=graph
            )
        )
        return _frozen(result)

    async def embed(self, token_ids: Sequence[int], pooling: str) -> np.ndarray:
        """float32 [hidden]: the last layer's features after each token, pooled last/mean/max."""
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")
        ids = self._tokens(token_ids, "token_ids")
        if len(ids) == 0:
            raise ValueError("token_ids must not be empty: there is nothing to pool")
        root = self._root_start()
        make = functools.partial(EmbedRequest, ids, root.state, pooling, self.bundle.hidden)
        return _frozen(await self._call(make))

    # ---- submission (event loop side) ------------------------------------------------------

    def _tokens(self, ids: Sequence[int], field: str) -> np.ndarray:
        try:
            arr = np.array(ids, dtype=np.int64)
        except (TypeError, ValueError, OverflowError) as e:
            raise ValueError(f"{field} must be a list of token ids ({e})") from e
        if arr.ndim != 1:
            raise ValueError(f"{field} must be a flat list of token ids, not shape {arr.shape}")
        vocab = self.bundle.vocab_size
        if arr.size and (arr.min() < 0 or arr.max() >= vocab):
            bad = (arr < 0) | (arr >= vocab)
            if bad.any():
                i = int(bad.argmax())
                raise ValueError(
                    f"{field}[{i}] = {arr[i]} is not a token id of {self.bundle.name} "
                    f"(vocabulary size {vocab})"
                )
        return _frozen(arr)

    def _root_start(self) -> _Start:
        if self._closing:
            raise EngineClosed("the engine is shutting down")
        if self._root is None:
            raise EngineClosed("the engine is not running: call start() first")
        return self._root

    def _start(self, ids: np.ndarray) -> _Start:
        """The longest known prefix of eos + `ids`: a cached one, or the root."""
        root = self._root_start()
        if len(ids) == 0:
            return root
        hit, key = self.cache.find(ids)
        if hit is None:
            return _Start(0, root.state, root.logprobs, key)
        return _Start(hit.length, hit.state, hit.logprobs, key)

    def _idle_now(self) -> bool:
        """True when every batching thread is waiting with an empty batch, and the queue is empty.

        Only the event loop submits work, so the engine stays idle until this caller returns.
        """
        with self._cond:
            idle = self._idle_threads == len(self._threads)
            return idle and not self._queue and not self._closing

    def _next_inline(self, ids: np.ndarray, feed: np.ndarray, start: _Start) -> np.ndarray:
        """A lone next-token request, run here on the event loop while the engine is idle.

        Handing it to the batching thread and the result back costs two thread wake-ups,
        which on a busy machine take longer than the step itself; nothing could share its
        run anyway. The result is the one the batch would give (a one-row, unpadded run).
        """
        logits, _, state = self._feed_inline(feed, start.state)
        logprobs = _frozen(log_softmax(logits))
        self.cache.insert(ids, state, logprobs, start.key)
        return logprobs

    def _recall_inline(self, request: RecallNextRequest) -> Recalled:
        """A lone cached next-token request run here while the engine is idle, as
        `_next_inline` does for a plain one."""
        assert request.state is not None
        logits, features, state = self._feed_inline(request.feed, request.state)
        request.absorb(features, logits)
        return request.result(state)

    def _feed_inline(self, feed: np.ndarray, state: State) -> tuple[np.ndarray, np.ndarray, State]:
        """A one-row feed run on the event loop as the batch runs it (all but the last token
        on the prefill graph, the last on the step graph): the last logits [V], the features
        [T, H] and the final state."""
        sessions = self._sessions
        assert sessions is not None
        if self.metrics is not None:
            self.metrics.observe_queue_wait(0.0)
        states = [s[:, None, :] for s in state]
        split = self.prefill_split is not None and len(feed) - 1 >= self.prefill_split
        try:
            if split:
                before, states = sessions.prefill(feed[None, :-1], states)
                logits, features, new = sessions.step(feed[None, -1:], states)
                features = np.concatenate((before, features), axis=1)
            else:
                logits, features, new = sessions.step(feed[None, :], states)
        except Exception as e:  # onnxruntime raises several types
            raise EngineError(f"onnxruntime run failed: {e}") from e
        return logits[0, -1], features[0], tuple(s[:, 0, :] for s in new)

    def _submit(self, request: Request) -> None:
        with self._cond:
            if self._closing:
                raise EngineClosed("the engine is shutting down")
            if not self._threads:
                raise EngineClosed("the engine is not running: call start() first")
            waiting = len(self._queue)
            if waiting >= self.config.max_queued:
                raise Overloaded(
                    f"{waiting} requests are already waiting for {self.bundle.name} "
                    f"(max_queued {self.config.max_queued}); try again later"
                )
            self._queue.append(request)
            self._cond.notify()

    async def _call(self, make: Callable[[Callable[[object], None]], Request]) -> Any:
        """Queue a one-result request (`make(deliver)`) and wait for its result.

        Cancelling the wait cancels the request.
        """
        assert self._loop is not None
        future: asyncio.Future[Any] = self._loop.create_future()
        request = make(functools.partial(_settle, future))
        self._submit(request)
        try:
            return await future
        except BaseException:  # cancelled (the future with it) or failed: drop the request
            request.cancelled = True
            raise

    def _begin(
        self,
        ids: np.ndarray,
        max_tokens: int,
        params: SamplingParams,
        stops: frozenset[int],
        stream: TokenStream,
    ) -> GenerateRequest:
        """Queue a generation whose payloads go to `stream` (its first iteration)."""
        start = self._start(ids)
        exact = start.length == len(ids)
        request = GenerateRequest(
            ids,
            ids[start.length :],
            start.state,
            start.logprobs if exact else None,
            params,
            max_tokens,
            stops,
            start.key,
            stream.put,
        )
        self._submit(request)
        return request

    def _dispatch(self, events: list[Event]) -> None:
        for request, payload in events:
            request.deliver(payload)

    # ---- the batching loop (worker thread) -------------------------------------------------

    def _warm_up(self) -> _Start:
        """Feed eos to the zero state (the root every request starts from); warm the shapes."""
        sessions = self._sessions
        assert sessions is not None
        eos = np.full((1, 1), self.bundle.eos_id, dtype=np.int64)
        logits, features, state = sessions.step(eos, self.bundle.zero_state(1))
        root = _Start(
            0,
            tuple(_frozen(s[:, 0, :].copy()) for s in state),
            _frozen(log_softmax(logits[0, 0])),
            features=_frozen(features[0].copy()),
        )
        rows = min(self.config.max_batch_size, 64)
        sessions.step(np.zeros((rows, 1), dtype=np.int64), self.bundle.zero_state(rows))
        two = np.zeros((1, 2), dtype=np.int64)
        sessions.score(two, two, self.bundle.zero_state(1))
        sessions.prefill(two, self.bundle.zero_state(1))
        return root

    def _choose_prefill_split(self) -> int | None:
        """`EngineConfig.prefill_split`, else measured: how many tokens before a request's
        last one make a prefill run of their own pay.

        Feeding n tokens as a prefill run of n - 1 and a one-token step saves the output
        layer's work on n - 1 tokens and costs a second run. Timed here on the engine's own
        sessions, a full chunk on the step graph, on the prefill graph, and split so, give both:
        the output layer's time per token, and what the second run adds. None (never) for a
        bundle without a prefill graph, or when the output layer is within the timing's noise
        or cannot pay for the run within a chunk (a character-level model's output layer is a
        rounding error).
        """
        if self.config.prefill_split is not None:
            return self.config.prefill_split
        sessions = self._sessions
        assert sessions is not None
        if not sessions.has_prefill:
            return None
        chunk = max(2, self.config.prefill_chunk)  # the split run needs a token to prefill
        tokens = np.full((1, chunk), self.bundle.eos_id, dtype=np.int64)
        zero = self.bundle.zero_state(1)

        def split_run() -> None:
            _, states = sessions.prefill(tokens[:, 1:], zero)
            sessions.step(tokens[:, :1], states)

        runs: dict[str, Callable[[], object]] = {
            "step": lambda: sessions.step(tokens, zero),
            "prefill": lambda: sessions.prefill(tokens, zero),
            "split": split_run,
        }
        fastest = dict.fromkeys(runs, float("inf"))
        for _ in range(SPLIT_TIMINGS):  # in turns, so a slow moment hits all three alike
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                fastest[name] = min(fastest[name], time.perf_counter() - start)
        # The output layer's cost a token; timing noise can make it come out below zero.
        per_token = max(0.0, fastest["step"] - fastest["prefill"]) / chunk
        second_run = max(0.0, fastest["split"] - fastest["step"] + (chunk - 1) * per_token)
        # An output layer under a tenth of a chunk's time is within the timing's noise.
        meaningful = per_token * chunk > fastest["step"] / 10
        split = math.floor(second_run / per_token) + 1 if meaningful else chunk + 1
        log.info(
            "%s version %s: the output layer takes %.1f us a token, a second run %.0f us: %s",
            self.bundle.name,
            self.bundle.version,
            per_token * 1e6,
            second_run * 1e6,
            f"a feed with {split} or more tokens before its last runs those on the prefill graph"
            if split <= chunk
            else "only whole chunks before a feed's last chunk run on the prefill graph",
        )
        return split if split <= chunk else None

    def _work(self, batch: Batch) -> None:
        """One batching thread's loop: admit its share of the queue into `batch`, step it."""
        sessions = self._sessions
        assert sessions is not None
        config = self.config
        wait = config.max_queue_wait_ms / 1000 if config.batching else 0.0
        last_size, last_end, last_depth = 0, 0.0, 0
        while True:
            with self._cond:
                while not self._closing and not self._queue and not batch.requests:
                    self._idle_threads += 1
                    self._cond.wait()
                    self._idle_threads -= 1
                if not self._closing and not batch.requests and wait > 0:
                    self._wait_for_company(min(config.max_batch_size, last_size), last_end, wait)
                if self._closing:
                    break
                admitted: list[Request] = []
                share = self._share()
                while self._queue and len(batch) + len(admitted) < share:
                    request = self._queue.popleft()
                    if not request.cancelled:
                        admitted.append(request)
                depth = len(self._queue)
            now = time.perf_counter()
            if self.metrics is not None:
                if depth != last_depth:
                    self.metrics.set_queue_depth(depth)
                    last_depth = depth
                for request in admitted:
                    self.metrics.observe_queue_wait(now - request.submitted)
            batch.concatenate(admitted)
            batch.filter()
            events: list[Event] = []
            if batch.requests:
                last_size = len(batch)
                try:
                    events = batch.step(sessions, config.prefill_chunk, config.batching)
                except Exception as e:  # a bug must not take the engine down with it
                    log.exception("engine step failed")
                    events = batch.fail(f"internal engine error: {e}")
            # Cached before the results go out, so a caller's next request can hit them.
            batch.store_prefixes()
            last_end = time.perf_counter()
            if events:
                self._post(events)
            batch.filter()
        self._shut_down(batch)

    def _share(self) -> int:
        """How many requests one batch may hold now (lock held): an even share of everything
        admitted or waiting, so the threads' runs are alike and overlap, up to a full batch."""
        total = len(self._queue) + sum(len(batch) for batch in self._batches)
        return min(self.config.max_batch_size, -(-total // len(self._batches)))

    def _wait_for_company(self, target: int, last_end: float, wait: float) -> None:
        """Hold a step (lock held) while closed-loop callers of the last one come back.

        When the last step served `target` requests and ended just before the first waiting
        one arrived, up to `wait` seconds are spent letting the others rejoin, so they share
        one run instead of trickling through one at a time. A lone caller never waits.
        """
        if not self._queue or len(self._queue) >= target:
            return
        first = self._queue[0].submitted
        if first - last_end > wait:
            return
        deadline = first + wait
        while not self._closing and len(self._queue) < target:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._cond.wait(remaining)

    def _shut_down(self, batch: Batch) -> None:
        with self._cond:
            waiting = list(self._queue)
            self._queue.clear()
        events: list[Event] = batch.fail("the engine is shutting down", shutdown=True)
        closing = Failure("the engine is shutting down", shutdown=True)
        events += [(r, closing) for r in waiting if not r.cancelled]
        batch.filter()
        if events:
            self._post(events)
        if self.metrics is not None:
            self.metrics.set_queue_depth(0)

    def _post(self, events: list[Event]) -> None:
        assert self._loop is not None
        # A closed event loop raises RuntimeError: then nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._dispatch, events)


def providers_for(choice: str) -> list[str]:
    """The onnxruntime providers for a `provider` setting; EngineError if CUDA is missing."""
    available = ort.get_available_providers()
    if choice == "cuda":
        if CUDA not in available:
            raise EngineError(
                f"provider 'cuda' was asked for but this onnxruntime has no {CUDA} "
                f"(available: {', '.join(available)}); install onnxruntime-gpu on a machine "
                "with a GPU, or use --provider cpu or auto"
            )
        return [CUDA, CPU]
    if choice == "auto" and CUDA in available:
        return [CUDA, CPU]
    return [CPU]


def session_options(config: EngineConfig) -> ort.SessionOptions:
    """Options for a small shared CPU: few threads, no spinning (see FIELD-NOTES.md)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = config.intra_op_threads
    options.inter_op_num_threads = config.inter_op_threads
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    spin = "1" if config.allow_spinning else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spin)
    options.add_session_config_entry("session.inter_op.allow_spinning", spin)
    return options
