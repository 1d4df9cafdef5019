"""Requests that cannot be decoded are the client's fault: INVALID_ARGUMENT, with one log line.

grpcio answers a request its deserializer cannot parse (bytes that are not protobuf, a string
field that is not UTF-8) with UNKNOWN, a message that names the exception's class and a
traceback in the log per request; in a streaming call the error surfaces inside the handler
instead. `DecodeGuard` is a server interceptor that wraps every method's request deserializer
so that a failure becomes a value, not an exception, and the method's behavior answers that
value with INVALID_ARGUMENT before any of its code runs. Requests to the services anyone may
call (health and reflection, see server.security) are small, and one over
`OPEN_SERVICE_MAX_BYTES` is refused the same way with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from server.limits import RpcError
from server.security import OPEN_SERVICES

log = logging.getLogger(__name__)

Code = grpc.StatusCode
# The largest request a health or reflection call may carry (they need a few hundred bytes).
OPEN_SERVICE_MAX_BYTES = 64 * 1024


@dataclass(frozen=True)
class _Refused:
    """What a guarded deserializer returns instead of a request it cannot accept."""

    code: grpc.StatusCode
    message: str


class DecodeGuard(grpc.aio.ServerInterceptor):
    """Answers undecodable requests with INVALID_ARGUMENT. `on_refused(method, code)` counts
    the unary calls it answers (the servicer counts its streaming calls itself)."""

    def __init__(self, on_refused: Callable[[str, grpc.StatusCode], None]) -> None:
        self._on_refused = on_refused
        # method -> (its handler, the guarded handler): made once per method, not per call.
        self._guarded: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        known = self._guarded.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        guarded = self._guard(handler, method)
        self._guarded[method] = (handler, guarded)
        return guarded

    def _guard(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        limit = OPEN_SERVICE_MAX_BYTES if method.startswith(OPEN_SERVICES) else None
        deserializer = _guarded(handler.request_deserializer, limit)
        if handler.request_streaming:
            return _stream_request_handler(handler, deserializer, method)
        return _unary_request_handler(handler, deserializer, method, self._on_refused)


def _guarded(deserialize: Callable[[bytes], Any], limit: int | None) -> Callable[[bytes], Any]:
    message_type = getattr(deserialize, "__self__", None)
    descriptor = getattr(message_type, "DESCRIPTOR", None)
    name = descriptor.full_name if descriptor is not None else "request"

    def guarded(data: bytes) -> Any:
        if limit is not None and len(data) > limit:
            return _Refused(
                Code.RESOURCE_EXHAUSTED,
                f"the request has {len(data)} bytes; this service takes at most {limit}",
            )
        try:
            return deserialize(data)
        except DecodeError:
            return _Refused(
                Code.INVALID_ARGUMENT,
                f"the request is not a valid {name}: not protobuf, or a string field is not UTF-8",
            )

    return guarded


def _refusal(method: str, refused: _Refused) -> RpcError:
    log.warning("%s: refused a request: %s", method, refused.message)
    return RpcError(refused.code, refused.message)


def _unary_request_handler(
    handler: grpc.RpcMethodHandler,
    deserializer: Callable[[bytes], Any],
    method: str,
    on_refused: Callable[[str, grpc.StatusCode], None],
) -> grpc.RpcMethodHandler:
    streaming = handler.response_streaming
    behavior = handler.unary_stream if streaming else handler.unary_unary

    async def refuse(refused: _Refused, context: grpc.aio.ServicerContext) -> None:
        error = _refusal(method, refused)
        on_refused(method, error.code)
        await context.abort(error.code, error.message)

    if inspect.isasyncgenfunction(behavior):

        async def generate(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if isinstance(request, _Refused):
                await refuse(request, context)
            async for response in behavior(request, context):
                yield response

        guarded: Callable[..., Any] = generate
    elif inspect.iscoroutinefunction(behavior):

        async def answer(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _Refused):
                await refuse(request, context)
            return await behavior(request, context)

        guarded = answer
    else:
        return handler  # a synchronous behavior: left as grpcio runs it
    make = (
        grpc.unary_stream_rpc_method_handler if streaming else grpc.unary_unary_rpc_method_handler
    )
    return make(
        guarded,
        request_deserializer=deserializer,
        response_serializer=handler.response_serializer,
    )


def _stream_request_handler(
    handler: grpc.RpcMethodHandler, deserializer: Callable[[bytes], Any], method: str
) -> grpc.RpcMethodHandler:
    """The requests reach the behavior through an iterator that raises RpcError at a refused
    one: the servicer answers it as any bad field; other behaviors' calls are aborted with it."""
    streaming = handler.response_streaming
    behavior = handler.stream_stream if streaming else handler.stream_unary

    async def checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for request in requests:
            if isinstance(request, _Refused):
                raise _refusal(method, request)
            yield request

    if inspect.isasyncgenfunction(behavior):

        async def generate(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for response in behavior(checked(requests), context):
                    yield response
            except RpcError as e:
                await context.abort(e.code, e.message)

        guarded: Callable[..., Any] = generate
    elif inspect.iscoroutinefunction(behavior):

        async def answer(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await behavior(checked(requests), context)
            except RpcError as e:
                await context.abort(e.code, e.message)

        guarded = answer
    else:
        return handler
    make = (
        grpc.stream_stream_rpc_method_handler if streaming else grpc.stream_unary_rpc_method_handler
    )
    return make(
        guarded,
        request_deserializer=deserializer,
        response_serializer=handler.response_serializer,
    )
