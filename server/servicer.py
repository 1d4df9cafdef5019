"""The rnnlm.v1.LanguageModel servicer: validation, text <-> tokens, request metrics, status codes.

The engine does the numerical work at the token level; everything a client sees is decided
here: which model answers, which inputs are refused and with which code, how generated tokens
become text and when a generation stops (server/stops.py), what a suggestion request's word
lists and reply hold (server/word_requests.py). Every call goes through `_handle`, which records the
request metrics and turns every failure into a status code, so no request can take the server
down: an unexpected exception is logged and answered with INTERNAL. A call holds the model
version it uses until it ends (see `ModelRepository.acquire`), so a hot reload never closes an
engine under a running call.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import grpc
import numpy as np
from grpc._cython import cygrpc

from rnnlm.v1 import language_model_pb2 as pb
from rnnlm.v1 import language_model_pb2_grpc as pb_grpc
from server.engine import (
    Engine,
    EngineClosed,
    EngineError,
    NoContinuousCache,
    Overloaded,
    SamplingParams,
)
from server.limits import (
    Limits,
    RpcError,
    check_name,
    check_partial_word,
    check_stops,
    invalid,
    quote,
)
from server.metrics import Metrics, observe_zeros
from server.model_info import model_info
from server.prefix_encoder import Encoded
from server.repository import LoadedModel, ModelNotFound, ModelRepository, NoDefaultModel
from server.state_token import SessionContext, StateTokenError, StateTokens
from server.stops import StopMatcher, detokenize
from server.typing import Ask, Memory, Predicted, predict_tokens, predict_words, searched
from server.word_cache import WordCacheSettings
from server.word_requests import (
    DEFAULT_TYPING_K,
    asks_fewest_keys,
    blocklists,
    check_k,
    remember,
    request_words,
    suggested,
    unfiltered,
)
from server.word_search import search_context
from server.words import FOLD_DEFAULT, Filters, Matcher, WordSettings, fold

log = logging.getLogger(__name__)

T = TypeVar("T")
A = TypeVar("A")
Code = grpc.StatusCode

DEFAULT_MAX_TOKENS = 64
# Texts longer than this are tokenized off the event loop.
_LONG_TEXT_CHARS = 20_000
# What grpc.aio raises when a handler writes to a call that has already ended at the transport
# (its deadline passed, or the client went away, between two of a stream's writes).
_ENDED_CALL_ERRORS = (cygrpc.ExecuteBatchError,)
DRAINING_MESSAGE = (
    "the server is shutting down: reconnect and resume the session with the state_token of "
    "its last reply (return_state_token), or send its context again"
)
_POOLINGS = {
    pb.POOLING_UNSPECIFIED: "mean",
    pb.POOLING_LAST: "last",
    pb.POOLING_MEAN: "mean",
    pb.POOLING_MAX: "max",
}


@dataclass
class _Call:
    """One RPC being answered: what its request metrics are labelled with."""

    method: str
    start: float
    model: str = ""
    held: list[LoadedModel] = field(default_factory=list)


class LanguageModelServicer(pb_grpc.LanguageModelServicer):
    """Answers rnnlm.v1.LanguageModel; refuses calls with UNAVAILABLE unless `accepting`."""

    def __init__(self, metrics: Metrics, limits: Limits) -> None:
        self._metrics = metrics
        self._limits = limits
        self.repository: ModelRepository | None = None
        # None: state tokens are disabled (no --state-token-key-file).
        self.state_tokens: StateTokens | None = None
        self.words = WordSettings()  # next-word search, blocklist and user words (server.app)
        self.word_cache = WordCacheSettings()  # the word cache's default and settings (server.app)
        self.accepting = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._end_streams = asyncio.Event()
        # Done when the drain starts; made in the event loop at first use.
        self._draining: asyncio.Future[None] | None = None
        # The typing sessions waiting for their next event, which the drain interrupts.
        self._reading: set[asyncio.Task[Any]] = set()
        self._interrupted: set[asyncio.Task[Any]] = set()

    # -- lifecycle (driven by server.app) -------------------------------------------------

    async def drain(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for in-flight calls to finish; True if they all did."""
        if self._idle.is_set():  # wait_for(..., 0) times out even on a set event
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def start_drain(self) -> None:
        """Refuse new calls, and end typing sessions as soon as they wait for the next event."""
        self.accepting = False
        draining = self._drain_started()
        if not draining.done():
            draining.set_result(None)
        for task in self._reading - self._interrupted:
            self._interrupted.add(task)
            task.cancel()

    def _drain_started(self) -> asyncio.Future[None]:
        if self._draining is None:
            self._draining = asyncio.get_running_loop().create_future()
        return self._draining

    def end_streams(self) -> None:
        """Make open Generate calls finish (FINISH_REASON_CANCELLED) and typing sessions end."""
        self._end_streams.set()

    # -- RPCs ------------------------------------------------------------------------------

    async def Generate(self, request: pb.GenerateRequest, context: Any) -> None:
        await self._handle("Generate", context, lambda call: self._generate(request, context, call))

    async def PredictNext(
        self, request: pb.PredictNextRequest, context: Any
    ) -> pb.PredictNextResponse:
        return await self._handle("PredictNext", context, lambda call: self._predict(request, call))

    async def Score(self, request: pb.ScoreRequest, context: Any) -> pb.ScoreResponse:
        return await self._handle("Score", context, lambda call: self._score(request, call))

    async def Embed(self, request: pb.EmbedRequest, context: Any) -> pb.EmbedResponse:
        return await self._handle("Embed", context, lambda call: self._embed(request, call))

    async def TypingSession(
        self, request_iterator: AsyncIterator[pb.TypingEvent], context: Any
    ) -> None:
        await self._handle(
            "TypingSession", context, lambda call: self._typing(request_iterator, context, call)
        )

    async def ListModels(
        self, request: pb.ListModelsRequest, context: Any
    ) -> pb.ListModelsResponse:
        return await self._handle("ListModels", context, lambda call: self._list_models())

    async def GetModel(self, request: pb.GetModelRequest, context: Any) -> pb.ModelInfo:
        return await self._handle("GetModel", context, lambda call: self._get_model(request, call))

    # -- the common frame of every call ----------------------------------------------------

    async def _handle(self, method: str, context: Any, body: Callable[[_Call], Awaitable[T]]) -> T:
        call = _Call(method, time.perf_counter())
        code, message = Code.OK, ""
        self._in_flight += 1
        self._idle.clear()
        try:
            if not self.accepting or self.repository is None:
                raise RpcError(Code.UNAVAILABLE, "the server is not serving (starting or stopping)")
            reply = await body(call)
            if reply is not None:
                self._sendable(reply)
            return reply
        except RpcError as e:
            code, message = e.code, e.message
        except Overloaded as e:
            code, message = Code.RESOURCE_EXHAUSTED, f"model {call.model!r} is overloaded: {e}"
        except EngineClosed as e:
            code, message = Code.UNAVAILABLE, f"model {call.model!r} is not available: {e}"
        except EngineError as e:
            log.error("%s failed in the engine (model %r): %s", method, call.model, e)
            code, message = Code.INTERNAL, f"model {call.model!r} failed: {e}"
        except asyncio.CancelledError:
            code = _ended_code(context)
            raise
        except _ENDED_CALL_ERRORS as e:
            if _deadline_passed(context) or context.cancelled():
                # The call is over: nothing failed and nothing more can be sent (an abort would
                # fail the same way). grpc ends a cancelled handler quietly.
                code = _ended_code(context)
                raise asyncio.CancelledError from e
            log.exception("%s failed unexpectedly (model %r)", method, call.model)
            code, message = Code.INTERNAL, f"{method} failed in the transport: {e}"
        except Exception:
            log.exception("%s failed unexpectedly (model %r)", method, call.model)
            code, message = Code.INTERNAL, f"{method} failed unexpectedly; the server logged why"
        finally:
            self._record(call, code)
            for model in call.held:
                assert self.repository is not None
                self.repository.release(model)
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()
        try:
            return await context.abort(code, message)  # abort raises: the call ends with `code`
        except _ENDED_CALL_ERRORS as e:
            # The call ended at the transport first (its deadline, or the client went away).
            raise asyncio.CancelledError from e

    def _sendable(self, message: Any) -> None:
        """Refuse a reply gRPC would not send (over --max-message-bytes), so that the call
        is recorded with the status the client sees."""
        self._limits.reply(message.ByteSize())

    def _record(self, call: _Call, code: grpc.StatusCode) -> None:
        seconds = time.perf_counter() - call.start
        self._metrics.record_request(call.method, call.model, code.name, seconds)

    def _model(self, name: str, version: str, call: _Call) -> LoadedModel:
        """The model a call names, held by the call until it ends."""
        assert self.repository is not None  # _handle refuses calls before it is set
        check_name(name, "model")
        check_name(version, "model_version")
        try:
            model = self.repository.acquire(name, version)
        except ModelNotFound as e:
            raise RpcError(Code.NOT_FOUND, str(e)) from e
        except NoDefaultModel as e:
            raise invalid(str(e)) from e
        call.held.append(model)
        call.model = model.name
        return model

    async def _encode(self, model: LoadedModel, text: str) -> list[int]:
        return await self._encoded(model, functools.partial(model.codec.encode, text), len(text))

    async def _encoded(self, model: LoadedModel, encode: Callable[[], T], chars: int) -> T:
        """`encode()`, off the event loop when it encodes over `_LONG_TEXT_CHARS` characters; a
        tokenizer's error is the request's."""
        try:
            if chars > _LONG_TEXT_CHARS:
                return await asyncio.to_thread(encode)
            return encode()
        except Exception as e:  # tokenizers raises a bare Exception, e.g. for a word without
            # an id in a vocabulary that has no <unk> (an imported pytorch/examples corpus)
            reason = " ".join(str(e).split())[:200]
            raise invalid(f"the text cannot be encoded by model {model.name!r}: {reason}") from e

    async def _context_ids(self, model: LoadedModel, text: str, field: str) -> list[int]:
        self._limits.text(text, field)
        return self._within_prompt_limit(await self._encode(model, text), field)

    async def _session_context(
        self, model: LoadedModel, known: Encoded | None, text: str
    ) -> Encoded:
        """A typing session's context encoded, from near the end of `known` (its context one
        event ago) when `text` extends it: the session keeps its own encoding."""
        field = "the session's context"
        self._limits.text(text, field)
        encoder = model.codec.encoder
        encode = functools.partial(encoder.extend, known, text)
        encoded = await self._encoded(model, encode, encoder.chars_to_encode(known, text))
        self._within_prompt_limit(encoded.ids, field)
        return encoded

    def _within_prompt_limit(self, ids: list[int], field: str) -> list[int]:
        if len(ids) > self._limits.max_prompt_tokens:
            raise RpcError(
                Code.RESOURCE_EXHAUSTED,
                f"{field} has {len(ids)} tokens; this server's limit (--max-prompt-tokens) is "
                f"{self._limits.max_prompt_tokens}",
            )
        return ids

    # -- Generate --------------------------------------------------------------------------

    async def _generate(self, request: pb.GenerateRequest, context: Any, call: _Call) -> None:
        model = self._model(request.model, request.model_version, call)
        params = self._sampling_params(request, model)
        max_tokens = self._max_tokens(request)
        stops = check_stops(request.stop)
        prompt_ids = await self._prompt_ids(request, model)
        codec = model.codec
        detokenizer = codec.detokenizer(prompt_ids)
        stopper = StopMatcher(stops)
        m = self._metrics
        ttft = m.time_to_first_token.labels(model=model.name)
        itl = m.inter_token_latency.labels(model=model.name)
        generated = m.generated_tokens.labels(model=model.name)
        active = m.active_streams.labels(model=model.name)
        active.inc()
        try:
            count, last = 0, call.start
            finish = pb.FINISH_REASON_LENGTH
            # The engine's TokenStream supports aclose(): closing it takes the request out of
            # the batch at once, whichever way this loop ends.
            stream = model.engine.generate(prompt_ids, max_tokens, params)
            async with contextlib.aclosing(stream):
                async for first in stream:
                    # Under load the engine hands tokens over a few at a time; they go out as
                    # one response, since per-message costs then dominate (TokenStream).
                    tokens = [first, *stream.take_ready()]
                    now = time.perf_counter()
                    (itl if count else ttft).observe(now - last)
                    last = now
                    text, ids, stopped = detokenize(tokens, detokenizer, stopper)
                    kept = tokens[: len(ids)]
                    observe_zeros(itl, len(kept) - 1)
                    count += len(ids)
                    generated.inc(len(ids))
                    response = pb.GenerateResponse(
                        text=text, token_ids=ids, logprobs=[t.logprob for t in kept]
                    )
                    if params.top_logprobs:
                        for token in kept:
                            response.top_logprobs.add().alternatives.extend(
                                pb.TokenLogprob(token_id=i, token=codec.token_texts[i], logprob=lp)
                                for i, lp in token.top
                            )
                    await context.write(response)
                    if stopped:
                        finish = pb.FINISH_REASON_STOP
                        break
                    _check_deadline(context)
                    if self._end_streams.is_set():
                        finish = pb.FINISH_REASON_CANCELLED
                        break
            tail = ""
            if finish == pb.FINISH_REASON_LENGTH:
                tail, stopped = stopper.push(detokenizer.flush())
                if stopped:
                    finish = pb.FINISH_REASON_STOP
                else:
                    tail += stopper.flush()
            await context.write(
                pb.GenerateResponse(
                    text=tail,
                    finish_reason=finish,
                    prompt_tokens=len(prompt_ids),
                    completion_tokens=count,
                )
            )
        finally:
            active.dec()

    def _sampling_params(self, request: pb.GenerateRequest, model: LoadedModel) -> SamplingParams:
        """The request's sampling parameters; `SamplingParams` is the one place that checks them."""
        unk = model.codec.unk_id
        try:
            params = SamplingParams(
                temperature=request.temperature if request.HasField("temperature") else 1.0,
                top_k=request.top_k,
                top_p=request.top_p if request.HasField("top_p") else 1.0,
                min_p=request.min_p,
                repetition_penalty=(
                    request.repetition_penalty if request.HasField("repetition_penalty") else 1.0
                ),
                seed=request.seed if request.HasField("seed") else None,
                top_logprobs=request.top_logprobs,
                banned_ids=frozenset() if unk is None else frozenset({unk}),
            )
            params.check_vocab(model.codec.vocab_size)
        except ValueError as e:
            raise invalid(str(e)) from None
        return params

    def _max_tokens(self, request: pb.GenerateRequest) -> int:
        cap = self._limits.max_tokens
        if not request.HasField("max_tokens"):
            return min(DEFAULT_MAX_TOKENS, cap)
        if request.max_tokens < 1:
            raise invalid(f"max_tokens must be at least 1, not {request.max_tokens}")
        if request.max_tokens > cap:
            raise RpcError(
                Code.RESOURCE_EXHAUSTED,
                f"max_tokens {request.max_tokens} is over this server's limit (--max-tokens) "
                f"of {cap}",
            )
        return request.max_tokens

    async def _prompt_ids(self, request: pb.GenerateRequest, model: LoadedModel) -> list[int]:
        if not request.prompt_token_ids:
            return await self._context_ids(model, request.prompt, "prompt")
        if request.prompt:
            raise invalid("set prompt or prompt_token_ids, not both")
        ids = self._within_prompt_limit(list(request.prompt_token_ids), "prompt_token_ids")
        vocab = model.codec.vocab_size
        for i, token in enumerate(ids):
            if not 0 <= token < vocab:
                raise invalid(
                    f"prompt_token_ids[{i}] is {token}, outside the vocabulary [0, {vocab})"
                )
        return ids

    # -- PredictNext and TypingSession -----------------------------------------------------

    async def _predict(self, request: pb.PredictNextRequest, call: _Call) -> pb.PredictNextResponse:
        if request.return_state_token:
            self._state_tokens("return_state_token")
        self._limits.text(request.context, "context")
        if request.state_token:
            resumed = self._open_state_token(request.state_token)
            model = self._token_model(resumed, request.model, request.model_version, call)
            text = await self._resumed_text(model, resumed) + request.context
        else:
            model = self._model(request.model, request.model_version, call)
            text = request.context
        check_k(request.k, model, "k")
        check_partial_word(request.partial_word)
        if request.continuous_cache:
            _require_cache(model)
        if request.return_state_token:
            self._limits.state_token_reply(text)
        blocked = request_words(request.blocked_words, "blocked_words")
        users = request_words(request.user_words, "user_words")
        ids = await self._context_ids(model, text, "context")
        filters = self._filters(model, {fold(w) for w in blocked}, users)
        cached = request.continuous_cache
        predicted = await self._suggest(model, text, ids, request, filters, cached, Memory())
        response = suggested(pb.PredictNextResponse, predicted, len(ids))
        response.model_version = model.version
        if request.return_state_token:
            response.state_token = self._seal(model, text, ids)
        return response

    async def _typing(
        self, events: AsyncIterator[pb.TypingEvent], context: Any, call: _Call
    ) -> None:
        model: LoadedModel | None = None
        text = ""
        encoded: Encoded | None = None  # `text` and its tokens, kept while events add letters
        memory = Memory()
        try:
            async for event in self._until_drain(events):
                self._limits.text(event.text, "text")
                if event.return_state_token:
                    self._state_tokens("return_state_token")
                if event.state_token:
                    if event.reset:
                        raise invalid("set reset or state_token, not both")
                    resumed = self._open_state_token(event.state_token)
                    if model is None:
                        model = self._token_model(resumed, event.model, event.model_version, call)
                        self._metrics.active_streams.labels(model=model.name).inc()
                    elif (resumed.model, resumed.version) != model.key:
                        raise invalid(
                            f"state_token is for model {quote(resumed.model)} version "
                            f"{quote(resumed.version)}, but this session uses model "
                            f"{model.name!r} version {model.version!r}"
                        )
                    text = await self._resumed_text(model, resumed) + event.text
                else:
                    if model is None:
                        model = self._model(event.model, event.model_version, call)
                        self._metrics.active_streams.labels(model=model.name).inc()
                    text = event.text if event.reset else text + event.text
                k = event.k or DEFAULT_TYPING_K
                check_k(k, model, "k")
                check_partial_word(event.partial_word)
                if event.continuous_cache:
                    _require_cache(model)
                if event.return_state_token:
                    self._limits.state_token_reply(text)
                remember(memory, event)
                if encoded is None or event.text or event.reset or event.state_token:
                    encoded = await self._session_context(model, encoded, text)
                ids = encoded.ids
                filters = self._filters(model, memory.blocked, memory.user_words)
                cached = event.continuous_cache
                predicted = await self._suggest(model, text, ids, event, filters, cached, memory)
                reply = suggested(pb.Suggestions, predicted, len(ids))
                if event.return_state_token:
                    reply.state_token = self._seal(model, text, ids)
                self._sendable(reply)
                await context.write(reply)
                if self._end_streams.is_set():
                    break
        finally:
            if model is not None:
                self._metrics.active_streams.labels(model=model.name).dec()

    def _filters(self, model: LoadedModel, blocked: set[str], users: list[str]) -> Filters:
        """The server's, the bundle's and the caller's blocked words; the caller's user words."""
        base = blocklists(self.words.blocklist, model.bundle.blocklist)
        if not blocked and not users:
            return unfiltered(base)
        return Filters(base | blocked if blocked else base, tuple(users))

    async def _suggest(
        self,
        model: LoadedModel,
        text: str,
        ids: list[int],
        request: pb.PredictNextRequest | pb.TypingEvent,
        filters: Filters,
        cached: bool,
        memory: Memory,
    ) -> Predicted:
        """The suggestions after `text` (encoded as `ids`): tokens or searched words."""
        codec = model.codec
        tokens = not searched(codec) or getattr(request, "next_tokens", False)
        folding = FOLD_DEFAULT[codec.kind] and not tokens
        if request.HasField("fold_case"):
            folding = request.fold_case
        match = Matcher(request.partial_word, folding)
        k = request.k or DEFAULT_TYPING_K
        engine, settings = model.engine, self.words
        mixer = None
        if not getattr(request, "next_tokens", False):
            # Unset: the server's default for typing sessions; a PredictNext keeps the model's
            # own probabilities, as it gave before the field existed (rnnlm.v1 compatibility).
            asked: bool | None = (
                request.word_cache
                if request.HasField("word_cache")
                else (None if isinstance(request, pb.TypingEvent) else False)
            )
            mixer = self.word_cache.mixer(asked, memory.word_cache, text, codec.kind)
            memory.word_cache = mixer.cache if mixer is not None else None
        # A lone call (the only one this server is answering) has no other call's steps to
        # join: it skips the engine run shared per turn of the event loop (`_Joint`).
        joins = self._in_flight > 1
        # Checked either way; no effect on a character or BPE model's next tokens.
        fewest = asks_fewest_keys(request, settings) and not getattr(request, "next_tokens", False)
        ask = Ask(codec, k, match, filters, settings, memory, cached, mixer, joins, fewest)
        if tokens:
            return await predict_tokens(engine, ids, ask)
        context, after_space = search_context(codec, text)
        if context != text:
            context_ids = self._within_prompt_limit(await self._encode(model, context), "context")
        else:
            context_ids = ids
        return await predict_words(engine, context_ids, after_space, ask)

    async def _until_drain(self, events: AsyncIterator[T]) -> AsyncIterator[T]:
        """`events`, until the server starts draining: a session waiting for its next event
        then ends with UNAVAILABLE, telling the client to resume elsewhere. `start_drain`
        interrupts the wait (a race of each wait against the drain cost the event loop three
        times the work per event)."""
        iterator = aiter(events)
        task = asyncio.current_task()
        assert task is not None  # a handler runs in a task
        while not self._drain_started().done():
            self._reading.add(task)
            try:
                event = await anext(iterator)
            except StopAsyncIteration:
                return
            except asyncio.CancelledError:
                if task not in self._interrupted:
                    raise  # the call ended: the client went away or its deadline passed
                task.uncancel()
                break
            finally:
                self._reading.discard(task)
                self._interrupted.discard(task)
            yield event
        raise RpcError(Code.UNAVAILABLE, DRAINING_MESSAGE)

    # -- state tokens ----------------------------------------------------------------------

    def _state_tokens(self, field: str) -> StateTokens:
        tokens = self.state_tokens
        if tokens is None:
            raise RpcError(
                Code.FAILED_PRECONDITION,
                f"{field}: state tokens are disabled on this server (it was started without "
                "--state-token-key-file)",
            )
        return tokens

    def _open_state_token(self, token: bytes) -> SessionContext:
        self._limits.state_token(token)
        try:
            return self._state_tokens("state_token").open(token)
        except StateTokenError as e:
            raise invalid(str(e)) from e

    def _token_model(
        self, resumed: SessionContext, name: str, version: str, call: _Call
    ) -> LoadedModel:
        """The model version a token was made by; the request may name it but no other."""
        if (name and name != resumed.model) or (version and version != resumed.version):
            asked = " ".join(
                f"{what} {quote(value)}"
                for what, value in (("model", name), ("version", version))
                if value
            )
            raise invalid(
                f"state_token is for model {quote(resumed.model)} version "
                f"{quote(resumed.version)}, but the request asks for {asked}"
            )
        try:
            return self._model(resumed.model, resumed.version, call)
        except RpcError as e:
            raise RpcError(e.code, f"state_token cannot be resumed here: {e.message}") from e

    async def _resumed_text(self, model: LoadedModel, resumed: SessionContext) -> str:
        """A token's context, once checked against this model's tokenizer."""
        self._limits.text(resumed.text, "state_token's context")
        count = len(await self._encode(model, resumed.text))
        if count != resumed.num_tokens:
            raise invalid(
                f"state_token records {resumed.num_tokens} context tokens, but its text has "
                f"{count} under model {model.name!r} version {model.version!r}'s tokenizer"
            )
        return resumed.text

    def _seal(self, model: LoadedModel, text: str, ids: list[int]) -> bytes:
        context = SessionContext(model.name, model.version, len(ids), text)
        return self._state_tokens("return_state_token").seal(context)

    # -- Score and Embed -------------------------------------------------------------------

    async def _texts_ids(self, model: LoadedModel, texts: list[str]) -> list[list[int]]:
        if not texts:
            raise invalid("texts is empty; give at least one text")
        self._limits.texts(texts, "texts")
        all_ids = []
        for i, text in enumerate(texts):
            ids = await self._encode(model, text)
            if not ids:
                raise invalid(f"texts[{i}] contains no tokens ({quote(text)})")
            all_ids.append(ids)
        return all_ids

    async def _score(self, request: pb.ScoreRequest, call: _Call) -> pb.ScoreResponse:
        model = self._model(request.model, request.model_version, call)
        cached = request.continuous_cache
        if cached:
            _require_cache(model)
        all_ids = await self._texts_ids(model, list(request.texts))
        texts = model.codec.token_texts
        token_bytes = (
            [len(texts[t].encode()) for ids in all_ids for t in ids]
            if request.return_token_logprobs
            else None
        )
        self._limits.scores_reply(len(all_ids), token_bytes)
        engine = model.engine
        scores = await _each(all_ids, lambda ids: engine.score(ids, cached), _in_flight(engine))
        response = pb.ScoreResponse(model_version=model.version)
        for ids, logprobs in zip(all_ids, scores, strict=True):
            total = float(np.sum(logprobs, dtype=np.float64))
            result = response.results.add(
                log_prob=total, num_tokens=len(ids), perplexity=_perplexity(total, len(ids))
            )
            if request.return_token_logprobs:
                result.token_logprobs.extend(
                    pb.TokenLogprob(token_id=t, token=texts[t], logprob=float(lp))
                    for t, lp in zip(ids, logprobs, strict=True)
                )
        self._metrics.scored_tokens.labels(model=model.name).inc(sum(map(len, all_ids)))
        return response

    async def _embed(self, request: pb.EmbedRequest, call: _Call) -> pb.EmbedResponse:
        model = self._model(request.model, request.model_version, call)
        pooling = _POOLINGS.get(request.pooling)
        if pooling is None:
            raise invalid(
                f"pooling {request.pooling} is not one of "
                + ", ".join(f"{pb.Pooling.Name(v)} ({v})" for v in _POOLINGS)
            )
        self._limits.embeddings_reply(len(request.texts), model.bundle.hidden)
        all_ids = await self._texts_ids(model, list(request.texts))
        engine = model.engine
        vectors = await _each(all_ids, lambda ids: engine.embed(ids, pooling), _in_flight(engine))
        response = pb.EmbedResponse(dimension=model.bundle.hidden, model_version=model.version)
        for ids, vector in zip(all_ids, vectors, strict=True):
            response.embeddings.add(values=vector.tolist(), num_tokens=len(ids))
        return response

    # -- ListModels and GetModel -----------------------------------------------------------

    async def _list_models(self) -> pb.ListModelsResponse:
        assert self.repository is not None
        return pb.ListModelsResponse(models=[self._info(m) for m in self.repository.models])

    async def _get_model(self, request: pb.GetModelRequest, call: _Call) -> pb.ModelInfo:
        check_name(request.name, "name")
        check_name(request.version, "version")
        return self._info(self._model(request.name, request.version, call))

    def _info(self, model: LoadedModel) -> pb.ModelInfo:
        assert self.repository is not None
        newest = self.repository.get(model.name)
        return model_info(model, model.name == self.repository.default_model and newest is model)


def _require_cache(model: LoadedModel) -> None:
    """Refuse a call that asks for a continuous cache the model lacks, before any work."""
    try:
        model.engine.cache_params()
    except NoContinuousCache as e:
        raise RpcError(Code.FAILED_PRECONDITION, f"continuous_cache: {e}") from e


def _in_flight(engine: Engine) -> int:
    """How many of one call's texts to keep in the engine: as many as its batches hold, and
    never more than its queue takes."""
    return min(engine.capacity, engine.config.max_queued)


async def _each(items: Sequence[A], run: Callable[[A], Awaitable[T]], limit: int) -> list[T]:
    """`run` on every item, up to `limit` at once: concurrently, so the engine batches them,
    but bounded, so that one call of many texts cannot fill the engine's queue by itself (it
    would be refused as overloaded) nor crowd out other calls. The first failure cancels the
    rest."""
    results: list[T | None] = [None] * len(items)
    pending = iter(enumerate(items))

    async def worker() -> None:
        for i, item in pending:  # one iterator shared by the workers
            results[i] = await run(item)

    workers = [asyncio.ensure_future(worker()) for _ in range(min(limit, len(items)))]
    try:
        await asyncio.gather(*workers)
    finally:
        for task in workers:
            task.cancel()
    return cast(list[T], results)


def _ended_code(context: Any) -> grpc.StatusCode:
    """How a call that ended before its handler finished is recorded: its deadline passed, or
    the client cancelled it. A client ends a call at its deadline by its own clock, which
    started a trip before the server's, so its cancel can arrive just before the deadline
    here: one within `_CLIENT_LEAD_S` of it is the deadline's."""
    remaining = context.time_remaining()
    expired = remaining is not None and remaining <= _CLIENT_LEAD_S
    return Code.DEADLINE_EXCEEDED if expired else Code.CANCELLED


# How far ahead of the server's deadline a client's own can end a call (`_ended_code`): the
# request's trip from the client, milliseconds on a loaded machine.
_CLIENT_LEAD_S = 0.05


def _deadline_passed(context: Any) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0


def _check_deadline(context: Any) -> None:
    if _deadline_passed(context):
        raise RpcError(Code.DEADLINE_EXCEEDED, "the call's deadline passed during generation")


def _perplexity(log_prob: float, num_tokens: int) -> float:
    try:
        return math.exp(-log_prob / num_tokens)
    except OverflowError:
        return math.inf
