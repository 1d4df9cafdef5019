"""The inference engine's public async API: one model version's requests, token level.

The service calls the engine with token ids (see `Engine`); the engine checks them, finds where
each request starts (the longest cached prefix, server/state_cache.py), makes the request
(server/requests.py) and hands it to the scheduler (server/scheduler.py), whose workers step
batches (server/batch.py, server/step.py) over the onnxruntime sessions (server/runner.py);
results come back on the event loop (server/delivery.py). A short next-token request arriving
while the engine is idle, or busy with generations that would keep it waiting, runs at once
through the same step on the event loop.

Every text is conditioned on the bundle's eos token: the engine feeds eos to the zero state
once at start (the "root") and every request starts from that state, or from a longer prefix
found in the state cache.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import numpy as np
import onnxruntime as ort

from server import fastsample, row_sampler
from server.bundle import Bundle, BundleError
from server.continuous_cache import CacheParams, ContinuousCache
from server.delivery import COALESCE_ACTIVE, TokenStream, settle
from server.engine_config import PROVIDERS, EngineConfig
from server.engine_errors import EngineClosed, EngineError, NoContinuousCache, Overloaded
from server.metrics import EngineMetrics
from server.requests import (
    POOLINGS,
    SCORE,
    STEP,
    EmbedRequest,
    Extension,
    GenerateRequest,
    NextRequest,
    Recalled,
    RecallNextRequest,
    Request,
    ScoreRequest,
    State,
    StateNextRequest,
    recall_logprobs,
)
from server.runner import (
    CPU,
    CUDA,
    Runner,
    Sessions,
    choose_prefill_split,
    providers_for,
    session_options,
)
from server.sampling import GeneratedToken, SamplingParams, log_softmax
from server.scheduler import Scheduler, StepTotals
from server.state_cache import StateCache
from server.step import StepConfig

__all__ = [
    "COALESCE_ACTIVE",
    "CPU",
    "CUDA",
    "PROVIDERS",
    "Engine",
    "EngineClosed",
    "EngineConfig",
    "EngineError",
    "GeneratedToken",
    "NoContinuousCache",
    "Overloaded",
    "SamplingParams",
    "TokenStream",
    "open_engine",
    "providers_for",
    "session_options",
]

log = logging.getLogger(__name__)

# A next-token request with at most this many new tokens, arriving while the engine has
# nothing else to do, runs on the event loop at once (see `Engine.next_token_logprobs`).
INLINE_TOKENS = 16
# Rows of the step graph warmed up at start.
WARM_ROWS = 64


@dataclass(frozen=True, slots=True)
class _Start:
    """Where a request starts: after `length` tokens of its context, in `state`."""

    length: int
    state: State
    logprobs: np.ndarray  # next-token log-probs at that point
    key: int | None = None  # the state cache's key of the whole context (None: not looked up)
    features: np.ndarray | None = None  # the last layer's output there (kept for the root)


# The context of an `Extension`'s request: none, so that its result is not cached.
_NO_CONTEXT = np.zeros(0, dtype=np.int64)


def _ignore(payload: object) -> None:
    """The delivery of a request the engine runs inline and reads back itself."""


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


def _extension_feed(tokens: tuple[int, ...], vocab: int) -> np.ndarray:
    """An `Extension`'s tokens as the feed of its request, each checked against the
    vocabulary (a few tokens: Python's min and max cost less than array passes)."""
    if not tokens:
        raise ValueError("an extension needs at least one token")
    if min(tokens) < 0 or max(tokens) >= vocab:
        outside = next(t for t in tokens if not 0 <= t < vocab)
        raise ValueError(f"token {outside} is outside the vocabulary ({vocab})")
    return np.array(tokens, dtype=np.int64)


def open_engine(
    bundle: Bundle, config: EngineConfig | None = None, metrics: EngineMetrics | None = None
) -> Engine:
    """The engine `config` asks for: with `config.process`, a front end whose core runs in a
    process of its own (server/remote_engine.py), with the same API and results."""
    if config is not None and config.process:
        from server.remote_engine import RemoteEngine  # it builds on this module

        return RemoteEngine(bundle, config, metrics)
    return Engine(bundle, config, metrics)


class Engine:
    """Runs one model version's requests in continuous batches (see the module docstring).

    Results are read-only numpy arrays (next-token log-probs may be shared with the state
    cache). All methods must be called from the event loop that ran `start`.
    """

    # Whether `next_token_states_many` can be called: its states are in this process.
    holds_states: ClassVar[bool] = True

    def __init__(
        self,
        bundle: Bundle,
        config: EngineConfig | None = None,
        metrics: EngineMetrics | None = None,
    ) -> None:
        self._init_api(bundle, config if config is not None else EngineConfig(), metrics)
        # With a continuous cache, a quarter of the bytes hold the recall cache: prefixes that
        # cached next-token calls saw, with the features the recall needs (up to `window` + 1
        # rows each), so a typing session's next call feeds only its new tokens.
        budget = self.config.state_cache_bytes
        recall_bytes = budget // 4 if bundle.continuous_cache is not None else 0
        self.cache = StateCache(budget - recall_bytes, metrics.state_cache if metrics else None)
        self.recall_cache = StateCache(recall_bytes, metrics.recall_cache if metrics else None)
        self._score_lacks_features = bundle.score_graph is not None and not bundle.score_features
        self._scheduler: Scheduler | None = None
        self._root: _Start | None = None

    def _init_api(
        self, bundle: Bundle, config: EngineConfig, metrics: EngineMetrics | None
    ) -> None:
        """The fields the API's checks and callers read: all a front end (RemoteEngine) keeps."""
        self.bundle = bundle
        self.config = config
        self.metrics = metrics
        self.provider = ""  # the execution provider in use, known after start()
        # Feed the tokens before a request's last on the prefill graph when there are at least
        # this many (None: never; the step graph takes them all in one run). Known after start.
        self.prefill_split: int | None = None
        self._closing = False

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the sessions, feed eos (the root state), warm up and start the workers."""
        if self._scheduler is not None or self._closing:
            raise EngineError("the engine was already started")
        sessions = await self._open_sessions()
        self._root = await asyncio.to_thread(self._warm_up, sessions)
        config, bundle = self.config, self.bundle
        self.prefill_split = await asyncio.to_thread(
            choose_prefill_split, sessions, bundle, config.prefill_chunk, config.prefill_split
        )
        sessions.metrics = self.metrics
        providers, options = self._sampler_providers(), session_options(config)
        sampler = functools.partial(row_sampler.choose, config.sampler, providers, options)
        step_config = StepConfig(
            bundle.vocab_size,
            bundle.hidden,
            chunk=config.prefill_chunk,
            batching=config.batching,
            prefill_split=self.prefill_split,
            caching=self.cache.capacity > 0,
            device_logits=self._device_logits(),
        )
        self._scheduler = Scheduler(
            sessions,
            step_config,
            config,
            self.cache,
            self.metrics,
            len(bundle.state),
            sampler,
            asyncio.get_running_loop(),
            f"{bundle.name}-{bundle.version}",
            cpu_bound=self.provider == CPU and config.intra_op_threads == 1,
        )

    def _sampler_providers(self) -> list[str]:
        """Where the sampler runs: where the step graph does (a CUDA request that fell back to
        the CPU samples on the CPU, natively under "auto"). Known once the sessions are open."""
        return [CPU] if self.provider == CPU else providers_for(self.config.provider)

    def _device_logits(self) -> bool:
        """`EngineConfig.device_logits`, or by default: on CUDA with a sampler that takes them
        there (the graph; "auto" on CUDA is the graph)."""
        config = self.config
        if config.device_logits is not None:
            return config.device_logits
        return self.provider == CUDA and config.sampler != "numpy"

    async def _open_sessions(self) -> Sessions:
        providers = providers_for(self.config.provider)
        options = session_options(self.config)

        async def open_session(graph: str) -> ort.InferenceSession:
            return await asyncio.to_thread(self.bundle.open_session, graph, options, providers)

        try:
            step = await open_session("step")
            score, prefill = [  # graphs a bundle may lack
                None if path is None else await open_session(graph)
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
        sampler = row_sampler.resolve(self.config.sampler, self._sampler_providers())
        which = f"the {sampler} sampler"
        if sampler == "native" and fastsample.kernels is not None:
            which += f" ({fastsample.level_name(fastsample.kernels)} build)"
        log.info(
            "%s version %s runs on %s, sampling with %s",
            self.bundle.name,
            self.bundle.version,
            self.provider,
            which,
        )
        return Sessions(step, score, prefill, self.bundle, None)

    def _warm_up(self, sessions: Sessions) -> _Start:
        """Feed eos to the zero state (the root every request starts from); warm the shapes."""
        eos = np.full((1, 1), self.bundle.eos_id, dtype=np.int64)
        logits, features, state = sessions.step(eos, self.bundle.zero_state(1))
        root = _Start(
            0,
            tuple(_frozen(s[:, 0, :].copy()) for s in state),
            _frozen(log_softmax(logits[0, 0])),
            features=_frozen(features[0].copy()),
        )
        sessions.step(np.zeros((WARM_ROWS, 1), dtype=np.int64), self.bundle.zero_state(WARM_ROWS))
        two = np.zeros((1, 2), dtype=np.int64)
        sessions.score(two, two, self.bundle.zero_state(1))
        sessions.prefill(two, self.bundle.zero_state(1))
        return root

    async def close(self) -> None:
        """Stop the workers; requests still queued or running get EngineError."""
        self._closing = True
        if self._scheduler is not None:
            await self._scheduler.close()

    @property
    def capacity(self) -> int:
        """How many requests one caller keeps in the engine at once (a call of many texts):
        as many as one step advances by the old `max_batch_size`, per worker."""
        return (self.config.max_batch_size or WARM_ROWS) * self.config.batch_threads

    @property
    def active(self) -> int:
        """Requests admitted to a batch or waiting for one."""
        return 0 if self._scheduler is None else self._scheduler.active

    @property
    def runner(self) -> Runner:
        """What every step runs the bundle's graphs through (a started engine's; a
        measurement can wrap its methods, as scripts/typing_inproc.py --runs does)."""
        if self._scheduler is None:
            raise EngineError("the engine has not started")
        return self._scheduler.runner

    def step_totals(self) -> StepTotals:
        """What the batching threads' steps have cost so far (`StepTotals`; zero before
        start)."""
        return StepTotals() if self._scheduler is None else self._scheduler.step_totals()

    # ---- the API ---------------------------------------------------------------------------

    async def next_token_logprobs(
        self, context_ids: Sequence[int] | np.ndarray, continuous_cache: bool = False
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
        make = functools.partial(NextRequest, ids, feed, start.state, start.key)
        if len(feed) <= INLINE_TOKENS and self._inline_now():
            return self._run_inline(make(_ignore))  # type: ignore[return-value]
        return await self._call(make)

    async def next_token_logprobs_many(
        self, contexts: Sequence[Sequence[int] | np.ndarray], continuous_cache: bool = False
    ) -> list[np.ndarray]:
        """`next_token_logprobs` of each context, run together: in one step of the engine's
        batch (on the event loop when `_inline_now`), for a caller that has many contexts
        at once, such as the word search's hypotheses (server/word_search.py)."""
        if continuous_cache:
            return list(
                await asyncio.gather(*(self.next_token_logprobs(c, True) for c in contexts))
            )
        if len(contexts) == 1:  # a typing keystroke's one context: no batch to gather
            return [await self.next_token_logprobs(contexts[0])]
        results: list[np.ndarray | None] = [None] * len(contexts)
        starts: list[tuple[int, np.ndarray, _Start]] = []
        for i, context in enumerate(contexts):
            ids = self._tokens(context, "context_ids")
            start = self._start(ids)
            if start.length == len(ids):
                results[i] = start.logprobs
            else:
                starts.append((i, ids, start))
        requests = [
            NextRequest(ids, ids[s.length :], s.state, s.key, _ignore) for _, ids, s in starts
        ]
        payloads = await self._run_many(requests)
        for (i, _, _), payload in zip(starts, payloads, strict=True):
            results[i] = cast(np.ndarray, payload)
        return cast(list[np.ndarray], results)  # every context's is set above

    async def _run_many(self, requests: Sequence[Request]) -> list[object]:
        """The answers of next-token requests run together: in one step of the engine's batch
        on the event loop when `_inline_now` and every feed is short (as for one context),
        else queued for the workers (their `deliver` set here)."""
        if not requests:
            return []
        if self._inline_now() and all(len(r.feed) <= INLINE_TOKENS for r in requests):
            assert self._scheduler is not None
            return self._scheduler.run_inline_many(requests)
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Any]] = []
        for request in requests:
            futures.append(loop.create_future())
            request.deliver = functools.partial(settle, futures[-1])
        try:
            for request in requests:
                self._submit(request)
            return list(await asyncio.gather(*futures))
        except BaseException:
            for request in requests:
                request.cancelled = True
            raise

    async def next_token_states_many(
        self, items: Sequence[np.ndarray | Extension]
    ) -> list[tuple[np.ndarray, State]]:
        """The next-token log-probs and the state after each item, run together as
        `next_token_logprobs_many` runs its contexts: a context (eos + it; cached prefixes
        reused, the result cached) or an `Extension` (a state this call gave, and tokens
        more: stepped from that state, neither looked up nor cached, so a caller that extends
        its contexts, the word search token by token and a typing session word by word,
        spares their lookup and conversion)."""
        results: list[tuple[np.ndarray, State] | None] = [None] * len(items)
        made: list[tuple[int, StateNextRequest]] = []
        vocab = self.bundle.vocab_size
        for i, item in enumerate(items):
            if isinstance(item, Extension):
                feed = _extension_feed(item.tokens, vocab)
                made.append((i, StateNextRequest(_NO_CONTEXT, feed, item.state, None, _ignore)))
                continue
            ids = self._tokens(item, "context_ids")
            start = self._start(ids)
            if start.length == len(ids):
                results[i] = (start.logprobs, start.state)
            else:
                feed = ids[start.length :]
                made.append((i, StateNextRequest(ids, feed, start.state, start.key, _ignore)))
        payloads = await self._run_many([r for _, r in made])
        for (i, request), payload in zip(made, payloads, strict=True):
            assert request.final is not None  # answered, so its state was kept
            results[i] = (cast(np.ndarray, payload), request.final)
        return cast(list[tuple[np.ndarray, State]], results)  # every item's is set above

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
        if len(ids) - length <= INLINE_TOKENS and self._inline_now():
            recalled = self._run_inline(make(_ignore))  # type: ignore[assignment]
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
        ids, stops = self._check_generation(prompt_ids, max_tokens, params, stop_ids)
        begin = functools.partial(self._begin, ids, max_tokens, params, stops)
        return TokenStream(self, begin, self.config.stream_tokens, self.config.stream_ms)

    def _check_generation(
        self,
        prompt_ids: Sequence[int],
        max_tokens: int,
        params: SamplingParams,
        stop_ids: frozenset[int],
    ) -> tuple[np.ndarray, frozenset[int]]:
        """`generate`'s arguments checked (ValueError naming the problem): (prompt, stops)."""
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
        return ids, stops

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

    def _tokens(self, ids: Sequence[int] | np.ndarray, field: str) -> np.ndarray:
        try:
            arr = np.array(ids, dtype=np.int64)
        except (TypeError, ValueError, OverflowError) as e:
            raise ValueError(f"{field} must be a list of token ids ({e})") from e
        if arr.ndim != 1:
            raise ValueError(f"{field} must be a flat list of token ids, not shape {arr.shape}")
        vocab = self.bundle.vocab_size
        # One pass: a negative id seen as unsigned is above any vocabulary.
        if arr.size and arr.view(np.uint64).max() >= vocab:
            i = int((arr.view(np.uint64) >= vocab).argmax())
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
        """True when the engine has nothing to do (see `Scheduler.idle_now`)."""
        return self._scheduler is not None and self._scheduler.idle_now()

    def _inline_now(self) -> bool:
        """True when a short next-token request runs here at once (see
        `Scheduler.inline_now`): the engine is idle, or busy with generations that would keep
        it waiting for a run of its own."""
        return self._scheduler is not None and self._scheduler.inline_now()

    def _run_inline(self, request: Request) -> object:
        """A short next-token request, run here on the event loop when `_inline_now`: handing
        it to a worker and the result back costs two thread wake-ups, which on a busy machine
        take longer than the step itself, and while generations run it would wait for the
        step under way; nothing could share its run anyway."""
        assert self._scheduler is not None
        return self._scheduler.run_inline(request)

    def _submit(self, request: Request) -> None:
        if self._closing:
            raise EngineClosed("the engine is shutting down")
        if self._scheduler is None:
            raise EngineClosed("the engine is not running: call start() first")
        self._scheduler.submit(request, self.bundle.name)

    async def _call(self, make: Callable[[Callable[[object], None]], Request]) -> Any:
        """Queue a one-result request (`make(deliver)`) and wait for its result.

        Cancelling the wait cancels the request.
        """
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        request = make(functools.partial(settle, future))
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
        return self.submit_generation(ids, max_tokens, params, stops, stream.put)

    def submit_generation(
        self,
        ids: np.ndarray,
        max_tokens: int,
        params: SamplingParams,
        stops: frozenset[int],
        deliver: Callable[[object], None],
    ) -> GenerateRequest:
        """Queue a checked generation (see `generate`) whose payloads go to `deliver`; setting
        the request's `cancelled` takes it out at the next step. Overloaded when refused.

        A short prompt gets its first token here at once, delivered before this returns, when
        `_inline_now` (a new stream beside running ones waits for no step of theirs)."""
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
            deliver,
        )
        if len(request.feed) <= INLINE_TOKENS and self._inline_now():
            assert self._scheduler is not None
            self._scheduler.start_inline(request, self.bundle.name)  # its first token now
        else:
            self._submit(request)
        return request
