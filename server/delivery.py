"""Delivery of results to callers, on the event loop: one-result futures and token streams.

The engine's worker threads post each step's replies to a `Mailbox`, which wakes the event
loop once for all the steps posted before it gets round to them; there they reach their
callers (`dispatch`): a future for a one-result request (`settle`), a `TokenStream` for a
generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from server.engine_errors import failure_error
from server.requests import Failure
from server.sampling import GeneratedToken

# Requests in the engine from which a generation's tokens are handed over a few at a time
# (`EngineConfig.stream_tokens` and `stream_ms`, see `TokenStream`).
COALESCE_ACTIVE = 8


class Busy(Protocol):
    """How busy the engine is: requests admitted to a batch or waiting for one."""

    @property
    def active(self) -> int: ...


class Cancellable(Protocol):
    """A queued generation: setting `cancelled` takes it out of the batch at the next step."""

    cancelled: bool


class TokenStream:
    """One generation's tokens as they are made: an async iterator of `GeneratedToken`.

    The request is queued (and Overloaded raised) on the first `__anext__`. `aclose()`, or
    dropping the stream, takes the request out of the batch at the next step. Payloads arrive
    from the batching thread through `dispatch`, on the event loop.

    Under load (at least `COALESCE_ACTIVE` requests in the engine) the consumer is woken
    only when `stream_tokens` tokens are ready, the oldest of them has waited `stream_ms`
    milliseconds, or the generation ended, and takes them together with `take_ready`: each
    message to a client costs the server more CPU than the model's work for a token (about
    60 us of gRPC and servicer work a message against 60 us a token for the step), so with
    many streams the messages, not the model, would set the cost of a token. The first token
    is never held back, and lightly loaded streams get every token as soon as it is made.
    The age is checked as tokens arrive (every step brings one), so no timer runs.
    """

    def __init__(
        self,
        engine: Busy,
        start: Callable[[TokenStream], Cancellable],
        stream_tokens: int,
        stream_ms: float,
    ) -> None:
        self._engine = engine
        self._start: Callable[[TokenStream], Cancellable] | None = start
        self._request: Cancellable | None = None
        self._items: deque[object] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._stream_tokens = stream_tokens
        self._stream_s = stream_ms / 1000
        self._held_since = 0.0  # when the oldest token not yet taken arrived
        self._delivered = 0  # tokens received so far

    def __aiter__(self) -> TokenStream:
        return self

    async def __anext__(self) -> GeneratedToken:
        if self._start is not None:
            start, self._start = self._start, None
            self._request = start(self)
        while not self._ready():
            self._waiter = asyncio.get_running_loop().create_future()
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
            raise failure_error(item)
        if isinstance(item, Exception):  # an error the engine core process sent back
            raise item
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
            or time.monotonic() - self._held_since >= self._stream_s
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
        items = self._items
        if not items:
            self._held_since = time.monotonic()
        items.append(item)
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


def settle(future: asyncio.Future[Any], payload: object) -> None:
    if future.done():
        return
    if isinstance(payload, Failure):
        future.set_exception(failure_error(payload))
    else:
        future.set_result(payload)


class Recipient(Protocol):
    """What a reply is addressed to: a request, or a step's sampled tokens for many
    (server/step.py, `Sampled`)."""

    def deliver(self, payload: object) -> None: ...


def dispatch(replies: Sequence[tuple[Recipient, object]]) -> None:
    """Hand each reply to its request's caller (on the event loop)."""
    for request, payload in replies:
        request.deliver(payload)


class Mailbox:
    """Step replies from worker threads to the event loop, in the order posted.

    Waking the loop (`call_soon_threadsafe`: a write to its self-pipe) cost a worker 50 us of
    CPU a step, a sixth of its Python work at 64 streams; a post that finds a wake-up already
    pending adds its replies to it instead, so a busy loop is woken once for several steps.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._posted: list[Sequence[tuple[Recipient, object]]] = []
        self._pending = False  # a drain is scheduled on the loop and has not taken the posts

    def post(self, replies: Sequence[tuple[Recipient, object]]) -> None:
        """Queue a step's replies for `dispatch` on the loop (any thread)."""
        with self._lock:
            self._posted.append(replies)
            if self._pending:
                return
            self._pending = True
        # A closed event loop raises RuntimeError: then nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            posted, self._posted = self._posted, []
            self._pending = False
        for replies in posted:
            dispatch(replies)
