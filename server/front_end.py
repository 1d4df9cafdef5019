"""The native gRPC front end (`rnnlm serve --front-end native`): gRPC's C++ API on the port, this
process's handlers behind it.

`NativeFrontEnd` starts `server/front_end.cc`'s binary, which opens the port and relays every
call's messages over a Unix socket (the frame layout is in that file's header). Here each call
becomes a `RelayedCall`, the servicer context its handler gets, and runs the same handlers,
interceptors and serializers that grpc.aio would run: the servicer cannot tell the two apart.
What moves out of this process is gRPC's own work a message (HTTP/2, flow control, the
completion queues), which under grpc.aio holds this process's GIL: 0.25 to 0.30 ms of CPU a
streamed message, against 0.11 to 0.13 in C++ (docs/performance.md).

A unary call costs one frame each way: its request comes with its START, and its reply with
its status. The relay writes the frames of one event-loop turn in one write, so the tokens of a
step leave in one system call; a call's FINISH leaves at once. Backpressure holds both ways:
after its first request, a call reads its client's next ones only as they are taken here (at
most 8 ahead), and a handler's write waits while the socket's buffer is full (a client too slow
for 64 MiB of its replies is cancelled there).

TLS too: the binary's gRPC serves the certificate files that `TlsFiles` checked, from private
copies that a reload rewrites and gRPC reads again within a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import inspect
import logging
import math
import os
import re
import shutil
import struct
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import grpc

from server.security import TlsFiles

log = logging.getLogger(__name__)

# The frame kinds of server/front_end.cc.
START, MESSAGE, HALF, CANCEL, FINISH, SHUTDOWN, READY, ACK = 1, 2, 3, 4, 5, 6, 7, 8
_HEAD = struct.Struct("<IQB")  # size (of what follows the size), call, kind
_U32 = struct.Struct("<I")
_F64 = struct.Struct("<d")
_START_SECONDS = 10.0  # how long the binary may take to open the port

BINARY = Path(__file__).with_name("rnnlm_front_end")
# Each server's private directory (the relay's socket, TLS copies): this, its pid and "-". It
# holds a lock on its `_LOCK` file for as long as it runs (`_remove_stale_dirs`).
_DIR_PREFIX = "rnnlm-front-"
_LOCK = "alive"


def available() -> bool:
    """Whether the binary was built (setup.py builds it where grpc++ is found)."""
    return BINARY.is_file() and os.access(BINARY, os.X_OK)


class HandlerDetails(NamedTuple):
    """What an interceptor and a generic handler see of a call (grpc.HandlerCallDetails)."""

    method: str
    invocation_metadata: tuple[tuple[str, str | bytes], ...]


class Handlers:
    """Collects the handlers the generated `add_*_to_server` functions register: pass it
    where they take a server."""

    def __init__(self) -> None:
        self.generic: list[grpc.GenericRpcHandler] = []

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self.generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        # grpcio's registered-method fast path; the generic handler of the same service, also
        # registered, serves the same methods.
        pass

    def find(self, details: HandlerDetails) -> grpc.RpcMethodHandler | None:
        for handler in self.generic:
            found = handler.service(details)  # type: ignore[arg-type]
            if found is not None:
                return found
        return None


# ---- one call ----------------------------------------------------------------------------------


class RelayedCall:
    """A relayed call's servicer context: grpc.aio's `ServicerContext` as far as the handlers
    use it (write, read, abort, cancelled, time_remaining, metadata, code and details)."""

    def __init__(
        self,
        front: NativeFrontEnd,
        call: int,
        method: str,
        deadline: float | None,
        peer: str,
        metadata: tuple[tuple[str, str | bytes], ...],
    ) -> None:
        self._front, self.id = front, call
        self.method = method
        self._deadline, self._peer, self._metadata = deadline, peer, metadata
        self._requests: deque[bytes] = deque()
        self._half = False
        self._opened = False  # the handler has asked for a request
        self._taken = False  # ... and took one it has not acknowledged
        self._waiter: asyncio.Future[None] | None = None
        self._cancelled = False
        self._done = False
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._trailing: tuple[tuple[str, str | bytes], ...] = ()
        self.task: asyncio.Task[None] | None = None
        # The method's, once known.
        self.serialize: Callable[[Any], bytes] = _same  # none: bytes as they are
        self.deserialize: Callable[[bytes], Any] = _same

    # -- from the client, through the front end ----------------------------------------------

    def received(self, message: bytes) -> None:
        self._requests.append(message)
        self._wake()

    def half_closed(self) -> None:
        self._half = True
        self._wake()

    def cancel(self) -> None:
        """The call is over for the client: its handler is cancelled, as grpc.aio does."""
        if self._done:
            return
        self._cancelled = self._done = True
        if self.task is not None:
            self.task.cancel()
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next_request(self) -> bytes | None:
        """The next request message as received (None: the client sent its last).

        Asking for it acknowledges the one taken before, which lets the front end read on: an
        acknowledgement leaves with the handler's answer to that one, in the same write. A
        front end that holds requests (`NativeFrontEnd.holds_requests`) reads the first one
        only once asked. A unary handler asks once and never acknowledges: nothing more is read.
        """
        if self._taken or (not self._opened and self._front.holds_requests):
            self._front.ack(self)
        self._opened, self._taken = True, False
        while not self._requests:
            if self._half or self._cancelled:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        self._taken = True
        return self._requests.popleft()

    # -- the servicer context ------------------------------------------------------------------

    async def read(self) -> Any:
        """The next request (a streaming-request handler's other way to read), or
        `grpc.aio.EOF` after the client's last."""
        raw = await self.next_request()
        return grpc.aio.EOF if raw is None else self.deserialize(raw)

    async def write(self, message: Any) -> None:
        await self._front.send_message(self, message)

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()
    ) -> None:
        if code == grpc.StatusCode.OK:
            raise ValueError("abort with OK")
        self._code, self._details = code, details
        if trailing_metadata:
            self._trailing = tuple(trailing_metadata)
        raise grpc.aio.AbortError(f"the call was aborted with {code.name}")  # type: ignore[attr-defined]

    def cancelled(self) -> bool:
        return self._cancelled

    def done(self) -> bool:
        return self._done

    def time_remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - asyncio.get_running_loop().time())

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._metadata

    def peer(self) -> str:
        return self._peer

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def set_trailing_metadata(self, metadata: Any) -> None:
        self._trailing = tuple(metadata)

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details

    def end(self) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str | bytes], ...]]:
        """The status the call ends with, as set (OK when nothing was); nothing more is sent."""
        self._done = True
        return self._code or grpc.StatusCode.OK, self._details, self._trailing


async def run_call(
    call: RelayedCall, handler: grpc.RpcMethodHandler | None, front: NativeFrontEnd
) -> None:
    """Run `handler` for `call` as grpc.aio would, and end the call with its status."""
    try:
        if handler is None:
            call.set_code(grpc.StatusCode.UNIMPLEMENTED)
            call.set_details("Method not found!")
        else:
            await _invoke(call, handler)
    except grpc.aio.AbortError:  # type: ignore[attr-defined]
        pass  # the status is the call's
    except asyncio.CancelledError:
        if not call.cancelled():
            raise  # the server is stopping: the front end ends the call
        return
    except Exception as e:
        log.exception("%s failed unexpectedly", call.method)
        call.set_code(grpc.StatusCode.UNKNOWN)
        call.set_details(f"Unexpected {type(e)}: {e}")
    if not call.cancelled():
        front.finish(call)


async def _invoke(call: RelayedCall, handler: grpc.RpcMethodHandler) -> None:
    call.deserialize = handler.request_deserializer or _same
    if handler.response_serializer is not None:
        call.serialize = handler.response_serializer
    if handler.request_streaming:
        request: Any = _requests(call)
    else:
        raw = await call.next_request()
        if raw is None:
            call.set_code(grpc.StatusCode.INTERNAL)
            call.set_details("the client sent no request")
            return
        try:
            request = call.deserialize(raw)
        except Exception:
            call.set_code(grpc.StatusCode.INTERNAL)
            call.set_details("Failed to deserialize the request")
            return
    behavior = _behavior(handler)
    if handler.response_streaming:
        if inspect.isasyncgenfunction(behavior):
            async for response in behavior(request, call):
                await call.write(response)
        else:
            await behavior(request, call)
        return
    response = behavior(request, call)
    if inspect.isawaitable(response):
        response = await response
    if response is not None and call.code() in (None, grpc.StatusCode.OK):
        await call.write(response)


def _behavior(handler: grpc.RpcMethodHandler) -> Callable[..., Any]:
    if handler.request_streaming:
        return handler.stream_stream if handler.response_streaming else handler.stream_unary
    return handler.unary_stream if handler.response_streaming else handler.unary_unary


async def _requests(call: RelayedCall) -> AsyncIterator[Any]:
    """A streaming handler's requests, as its request iterator."""
    while (raw := await call.next_request()) is not None:
        yield call.deserialize(raw)


def _same(data: bytes) -> bytes:
    return data


# ---- the front end -----------------------------------------------------------------------------


class NativeFrontEnd(asyncio.Protocol):
    """The binary and its socket; `start()` opens the port, `stop(grace)` closes it as
    grpc.aio's `Server.stop` does (GOAWAY now, the calls in flight get `grace`)."""

    def __init__(
        self,
        handlers: Handlers,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        options: Sequence[tuple[str, int]] = (),
        on_lost: Callable[[], None] | None = None,
        hold_requests: bool = False,
        tls: TlsFiles | None = None,
    ) -> None:
        """`hold_requests`: a call's requests are received only once its handler reads them,
        as grpc.aio does (an interceptor that refuses a call before reading, such as the
        bearer-token check, then never receives its request, however large). Without it, a
        call's first request is read at once, which saves a round trip. `tls`: serve TLS with
        these files (their checked copies, which a reload rewrites, in a private directory)."""
        self.holds_requests = hold_requests
        self._tls = tls
        self._handlers = handlers
        # The method's handler through the interceptors, as grpc.aio applies them (built once).
        self._resolve: Callable[[HandlerDetails], Awaitable[grpc.RpcMethodHandler | None]]
        self._resolve = self._find
        for interceptor in reversed(interceptors):
            self._resolve = _through(interceptor, self._resolve)
        self._options = list(options)
        self._on_lost = on_lost
        self._calls: dict[int, RelayedCall] = {}
        self._buffer = bytearray()
        self._out: list[bytes] = []
        self._flushing = False
        self._transport: asyncio.Transport | None = None
        self._writable: asyncio.Future[None] | None = None
        self._ready: asyncio.Future[int] | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._dir: str | None = None
        self._alive: int | None = None  # the lock file's descriptor, held while running
        self._stopping = False
        self._watcher: asyncio.Future[None] | None = None

    async def start(self, address: str) -> int:
        """Start the binary listening on `address` (host:port); return the bound port."""
        if not available():
            raise OSError(
                f"--front-end native: {BINARY} is not built (it needs grpc++ at install: "
                "Debian's libgrpc++-dev and pkg-config, then pip install again)"
            )
        loop = asyncio.get_running_loop()
        _remove_stale_dirs()
        self._dir = tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{os.getpid()}-")
        self._alive = _hold_lock(os.path.join(self._dir, _LOCK))
        path = os.path.join(self._dir, "relay.sock")
        listener = await loop.create_unix_server(lambda: self, path)
        args = ["--listen", address, "--socket", path, "--hold", str(int(self.holds_requests))]
        if self._tls is not None:
            self._tls.install(self._copies())
            args += ["--tls-dir", str(self._copies()), "--tls-mutual", str(int(self._tls.mutual))]
        for name, value in self._options:
            args += ["--arg", f"{name}={int(value)}"]
        self._ready = loop.create_future()
        self._process = await asyncio.create_subprocess_exec(
            str(BINARY), *args, stderr=asyncio.subprocess.PIPE
        )
        try:
            port = await asyncio.wait_for(self._started(), _START_SECONDS)
        except BaseException:
            await self._end_process()
            raise
        finally:
            listener.close()  # one connection, taken
            os.unlink(path)
        if port == 0:
            await self._end_process()
            raise OSError(f"cannot listen on {address}")
        self._watcher = asyncio.ensure_future(self._watch())
        return port

    def _copies(self) -> Path:
        """Where the checked TLS files' copies are kept, in this server's private directory."""
        assert self._dir is not None
        return Path(self._dir) / "tls"

    async def _started(self) -> int:
        """The port the binary says it bound (READY), or why it exited first."""
        assert self._process is not None and self._ready is not None
        exited = asyncio.ensure_future(self._process.wait())
        done, _ = await asyncio.wait({exited, self._ready}, return_when=asyncio.FIRST_COMPLETED)
        if self._ready in done:
            exited.cancel()
            return self._ready.result()
        raise OSError(f"the native front end exited at start: {await self._stderr()}")

    async def _stderr(self) -> str:
        assert self._process is not None and self._process.stderr is not None
        text = (await self._process.stderr.read(4096)).decode(errors="replace").strip()
        return text or f"exit status {self._process.returncode}"

    async def _watch(self) -> None:
        assert self._process is not None
        await self._process.wait()
        if not self._stopping:
            log.error("the native front end exited: %s", await self._stderr())
            self._end_calls()
            if self._on_lost is not None:
                self._on_lost()

    async def stop(self, grace: float | None) -> None:
        """GOAWAY to every connection; the calls in flight get `grace` seconds, then end."""
        if self._stopping:
            return
        self._stopping = True
        if self._transport is not None and self._process is not None:
            self._send(_frame(0, SHUTDOWN, _F64.pack(grace or 0.0)))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._process.wait(), (grace or 0.0) + 5.0)
        await self._end_process()
        self._end_calls()

    async def _end_process(self) -> None:
        self._stopping = True
        if self._process is not None and self._process.returncode is None:
            self._process.kill()
            await self._process.wait()
        if self._transport is not None:
            self._transport.close()
        if self._dir is not None:
            if self._tls is not None:
                self._tls.uninstall(self._copies())
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        if self._alive is not None:
            os.close(self._alive)
            self._alive = None

    def _end_calls(self) -> None:
        for call in list(self._calls.values()):
            call.cancel()
        self._calls.clear()

    # -- the socket (asyncio.Protocol) -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._end_calls()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def pause_writing(self) -> None:
        self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        at, end = 0, len(buffer)
        view = memoryview(buffer)
        try:
            while end - at >= _HEAD.size:
                size, call, kind = _HEAD.unpack_from(buffer, at)
                stop = at + 4 + size
                if stop > end:
                    break
                self._frame(call, kind, bytes(view[at + _HEAD.size : stop]))
                at = stop
        finally:
            view.release()
        del buffer[:at]

    def _frame(self, call_id: int, kind: int, payload: bytes) -> None:
        if kind == MESSAGE:
            call = self._calls.get(call_id)
            if call is not None:
                call.received(payload)
        elif kind == START:
            self._start_call(call_id, payload)
        elif kind == HALF:
            call = self._calls.get(call_id)
            if call is not None:
                call.half_closed()
        elif kind == CANCEL:
            call = self._calls.pop(call_id, None)
            if call is not None:
                call.cancel()
        elif kind == READY and self._ready is not None and not self._ready.done():
            self._ready.set_result(_U32.unpack_from(payload)[0])

    def _start_call(self, call_id: int, payload: bytes) -> None:
        at, method, peer, metadata, first = _parse_start(payload)
        loop = asyncio.get_running_loop()
        deadline = None if math.isinf(at) else loop.time() + (at - time.time())
        call = RelayedCall(self, call_id, method, deadline, peer, metadata)
        if first is not None:
            call.received(first)
        self._calls[call_id] = call
        call.task = loop.create_task(self._serve(call))

    async def _serve(self, call: RelayedCall) -> None:
        try:
            handler = await self._resolve(HandlerDetails(call.method, call.invocation_metadata()))
            await run_call(call, handler, self)
        finally:
            self._calls.pop(call.id, None)

    async def _find(self, details: HandlerDetails) -> grpc.RpcMethodHandler | None:
        return self._handlers.find(details)

    # -- to the front end ------------------------------------------------------------------------

    async def send_message(self, call: RelayedCall, message: Any) -> None:
        if call.done():
            raise asyncio.CancelledError
        self._send(_frame(call.id, MESSAGE, call.serialize(message)))
        if self._writable is not None:
            await self._writable

    def finish(self, call: RelayedCall) -> None:
        code, details, trailing = call.end()
        bad = next((key for key, value in trailing if not _valid_metadatum(key, value)), None)
        if bad is not None:  # gRPC's C++ core would not send it (grpc.aio raises on it too)
            log.error("%s: not valid trailing metadata: %r", call.method, bad[:100])
            code, details, trailing = grpc.StatusCode.INTERNAL, "invalid trailing metadata", ()
        body = [_U32.pack(code.value[0]), _str(details.encode()), _U32.pack(len(trailing))]
        for key, value in trailing:
            body += [
                _str(key.encode()),
                _str(value if isinstance(value, bytes) else value.encode()),
            ]
        self._send(_frame(call.id, FINISH, b"".join(body)))
        self._flush()  # a call's end leaves now, not a turn of the event loop later

    def ack(self, call: RelayedCall) -> None:
        self._send(_frame(call.id, ACK, b""))

    def _send(self, frame: bytes) -> None:
        self._out.append(frame)
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flushing = False
        out, self._out = self._out, []
        if out and self._transport is not None and not self._transport.is_closing():
            self._transport.write(b"".join(out))


def _through(
    interceptor: grpc.aio.ServerInterceptor,
    continuation: Callable[[HandlerDetails], Awaitable[grpc.RpcMethodHandler | None]],
) -> Callable[[HandlerDetails], Awaitable[grpc.RpcMethodHandler | None]]:
    async def intercepted(details: HandlerDetails) -> grpc.RpcMethodHandler | None:
        return await interceptor.intercept_service(continuation, details)  # type: ignore[arg-type]

    return intercepted


_KEY = re.compile(r"[0-9a-z_.-]+")
_VALUE = re.compile(r"[\x20-\x7e]*")


def _valid_metadatum(key: str, value: str | bytes) -> bool:
    """gRPC's rule for a metadata pair: a lower-case key of [0-9a-z_.-] not starting "grpc-",
    and printable ASCII for a value, unless the key ends "-bin" (then bytes)."""
    if not _KEY.fullmatch(key) or key.startswith("grpc-"):
        return False
    if key.endswith("-bin"):
        return isinstance(value, bytes)
    return isinstance(value, str) and _VALUE.fullmatch(value) is not None


def _hold_lock(path: str) -> int:
    """Create `path` and hold an exclusive lock on it until the descriptor is closed (or the
    process ends, however it ends)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def _remove_stale_dirs() -> None:
    """Remove the private directories of this user's servers that ended without removing
    theirs (killed: a TLS key's copy may be in one). A directory is stale when nobody holds
    its lock, which its server held until it ended: a check that holds across PID namespaces
    sharing the directory, where a PID would not. One without a lock file yet is left alone."""
    for path in Path(tempfile.gettempdir()).glob(f"{_DIR_PREFIX}*-*"):
        with contextlib.suppress(OSError):
            if path.is_symlink() or not path.is_dir() or path.stat().st_uid != os.getuid():
                continue
            fd = os.open(path / _LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises while its server runs
                shutil.rmtree(path, ignore_errors=True)
            finally:
                os.close(fd)


def _frame(call: int, kind: int, payload: bytes) -> bytes:
    return _HEAD.pack(9 + len(payload), call, kind) + payload


def _str(data: bytes) -> bytes:
    return _U32.pack(len(data)) + data


def _parse_start(
    payload: bytes,
) -> tuple[float, str, str, tuple[tuple[str, str | bytes], ...], bytes | None]:
    """A START frame's deadline (Unix time, inf for none), method, peer, metadata and the
    call's first request when it came with it."""
    deadline = _F64.unpack_from(payload)[0]
    method, at = _read_str(payload, 8)
    peer, at = _read_str(payload, at)
    count = _U32.unpack_from(payload, at)[0]
    at += 4
    metadata: list[tuple[str, str | bytes]] = []
    for _ in range(count):
        raw_key, at = _read_str(payload, at)
        value, at = _read_str(payload, at)
        key = raw_key.decode("latin-1")
        metadata.append((key, value if key.endswith("-bin") else value.decode("latin-1")))
    first = _read_str(payload, at + 1)[0] if payload[at] else None
    return deadline, method.decode("latin-1"), peer.decode("latin-1"), tuple(metadata), first


def _read_str(payload: bytes, at: int) -> tuple[bytes, int]:
    """The `str` (u32 length, then the bytes) at `at`, and where what follows it starts."""
    n = _U32.unpack_from(payload, at)[0]
    return payload[at + 4 : at + 4 + n], at + 4 + n
