"""The front end of an engine whose core runs in a process of its own (`EngineConfig.process`).

`RemoteEngine` has `Engine`'s API: it checks arguments here, with the same errors, and sends
each call through the channel (server/channel.py) to the core process
(server/core_process.py), which runs an ordinary `Engine`. Replies come back one frame per
step of the core and reach their callers here: one-result calls as futures, generations as
`TokenStream`s. The core's metric events are replayed on this process's `EngineMetrics`, so
/metrics reads the same. Closing the engine (or this process dying) ends the core process.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from server import channel
from server.bundle import Bundle
from server.delivery import TokenStream
from server.engine import Engine
from server.engine_config import EngineConfig
from server.engine_errors import EngineClosed, EngineError, NoContinuousCache, Overloaded
from server.metrics import EngineMetrics
from server.requests import END
from server.sampling import GeneratedToken, SamplingParams

log = logging.getLogger(__name__)

# The errors a reply may name, raised here as themselves; any other is an EngineError.
ERRORS: dict[str, type[Exception]] = {
    cls.__name__: cls
    for cls in (ValueError, EngineError, EngineClosed, Overloaded, NoContinuousCache)
}
# How long a closing core may take to finish before it is killed.
CLOSE_SECONDS = 10.0
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


def remote_error(name: str, message: str) -> Exception:
    return ERRORS.get(name, EngineError)(message)


class _Generation:
    """The front end's handle of a queued generation (what `TokenStream` cancels)."""

    def __init__(self, engine: RemoteEngine, rid: int) -> None:
        self._engine, self._id = engine, rid
        self._cancelled = False

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @cancelled.setter
    def cancelled(self, value: bool) -> None:
        if value and not self._cancelled:
            self._cancelled = True
            self._engine.cancel(self._id)


class RemoteEngine(Engine):
    """`Engine`'s API over a core process (see the module docstring)."""

    holds_states = False  # the states are the core process's (the word search sends contexts)

    def __init__(
        self,
        bundle: Bundle,
        config: EngineConfig | None = None,
        metrics: EngineMetrics | None = None,
    ) -> None:
        self._init_api(
            bundle, config if config is not None else EngineConfig(process=True), metrics
        )
        self._process: subprocess.Popen[bytes] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._outbox: channel.Outbox | None = None
        self._reading: asyncio.Task[None] | None = None
        self._ids = itertools.count()
        self._futures: dict[int, asyncio.Future[Any]] = {}
        self._streams: dict[int, TokenStream] = {}
        self._active = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the core process and wait until its engine is warm."""
        if self._process is not None or self._closing:
            raise EngineError("the engine was already started")
        self._loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_ROOT, env.get("PYTHONPATH")]))
        with theirs:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "server.core_process", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                env=env,
            )
        reader, self._writer = await asyncio.open_unix_connection(sock=ours)
        self._writer.write(
            channel.encode(
                (
                    str(self.bundle.path),
                    self.bundle.name,
                    self.bundle.version,
                    self.config,
                    self.metrics is not None,
                )
            )
        )
        try:
            reply = await channel.read_frame(reader)
        except channel.ChannelClosed as e:
            await self._reap()
            raise EngineError("the engine core process ended while starting") from e
        if reply[0] != "ready":
            await self._reap()
            raise remote_error(reply[1], reply[2])
        _, self.provider, self.prefill_split = reply
        self._outbox = channel.Outbox(self._writer, lambda items: items)
        self._reading = asyncio.create_task(self._read(reader))

    async def close(self) -> None:
        """End the core process; requests still queued or running get EngineError."""
        self._closing = True
        if self._writer is not None and not self._writer.is_closing():
            self._writer.close()
        if self._reading is not None:
            await asyncio.gather(self._reading, return_exceptions=True)
        await self._reap()

    async def _reap(self) -> None:
        process = self._process
        if process is None:
            return
        if self._writer is not None and not self._writer.is_closing():
            self._writer.close()
        try:
            await asyncio.to_thread(process.wait, CLOSE_SECONDS)
        except subprocess.TimeoutExpired:
            log.warning("the engine core process %d did not end; killing it", process.pid)
            process.kill()
            await asyncio.to_thread(process.wait)

    @property
    def active(self) -> int:
        """Requests in the core's engine, as its last frame said."""
        return self._active

    # ---- the API ---------------------------------------------------------------------------

    async def next_token_logprobs(
        self, context_ids: Sequence[int] | np.ndarray, continuous_cache: bool = False
    ) -> np.ndarray:
        ids = self._tokens(context_ids, "context_ids")
        if continuous_cache:
            self.cache_params()
        result: np.ndarray = await self._remote("next_token_logprobs", ids, continuous_cache)
        return result

    async def next_token_logprobs_many(
        self, contexts: Sequence[Sequence[int] | np.ndarray], continuous_cache: bool = False
    ) -> list[np.ndarray]:
        all_ids = [self._tokens(c, "context_ids") for c in contexts]
        if continuous_cache:
            self.cache_params()
        result: list[np.ndarray] = await self._remote(
            "next_token_logprobs_many", all_ids, continuous_cache
        )
        return result

    async def score(self, token_ids: Sequence[int], continuous_cache: bool = False) -> np.ndarray:
        if continuous_cache:
            self.cache_params()
        ids = self._tokens(token_ids, "token_ids")
        result: np.ndarray = await self._remote("score", ids, continuous_cache)
        return result

    async def embed(self, token_ids: Sequence[int], pooling: str) -> np.ndarray:
        ids = self._tokens(token_ids, "token_ids")
        result: np.ndarray = await self._remote("embed", ids, pooling)
        return result

    def generate(
        self,
        prompt_ids: Sequence[int],
        max_tokens: int,
        params: SamplingParams,
        stop_ids: frozenset[int] = frozenset(),
    ) -> TokenStream:
        ids, stops = self._check_generation(prompt_ids, max_tokens, params, stop_ids)

        def begin(stream: TokenStream) -> _Generation:
            rid = self._send("generate", ids, max_tokens, params, stops)
            self._streams[rid] = stream
            return _Generation(self, rid)

        return TokenStream(self, begin, self.config.stream_tokens, self.config.stream_ms)

    # ---- the channel -----------------------------------------------------------------------

    def _send(self, kind: str, *args: Any) -> int:
        if self._closing:
            raise EngineClosed("the engine is shutting down")
        if self._outbox is None:
            raise EngineClosed("the engine is not running: call start() first")
        rid = next(self._ids)
        self._outbox.add((kind, rid, *args))
        return rid

    async def _remote(self, method: str, *args: Any) -> Any:
        rid = self._send("call", method, args)
        assert self._loop is not None
        future: asyncio.Future[Any] = self._loop.create_future()
        self._futures[rid] = future
        try:
            return await future
        except asyncio.CancelledError:
            if self._futures.pop(rid, None) is not None:
                self.cancel(rid)
            raise

    def cancel(self, rid: int) -> None:
        """Tell the core to drop request `rid` (safe from any thread, and from `__del__`)."""
        self._streams.pop(rid, None)
        loop, outbox = self._loop, self._outbox
        if loop is None or outbox is None or loop.is_closed() or self._closing:
            return
        loop.call_soon_threadsafe(outbox.add, ("cancel", rid))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                self._active, replies, events = await channel.read_frame(reader)
                for rid, kind, payload in replies:
                    self._reply(rid, kind, payload)
                if events:
                    self._record(events)
        except channel.ChannelClosed:
            pass
        finally:
            self._fail_all()

    def _reply(self, rid: int, kind: int, payload: Any) -> None:
        if kind == channel.TOKEN:
            stream = self._streams.get(rid)
            if stream is not None:
                stream.put(GeneratedToken(*payload))
            return
        stream = self._streams.pop(rid, None)
        if stream is not None:
            stream.put(END if kind == channel.END else remote_error(*payload))
            return
        future = self._futures.pop(rid, None)
        if future is None or future.done():
            return
        if kind == channel.OK:
            future.set_result(payload)
        else:
            future.set_exception(remote_error(*payload))

    def _record(self, events: list[tuple[str, str, tuple[Any, ...]]]) -> None:
        metrics = self.metrics
        if metrics is None:
            return
        for path, method, args in events:
            target = getattr(metrics, path) if path else metrics
            getattr(target, method)(*args)

    def _fail_all(self) -> None:
        """The channel closed: every caller still waiting gets EngineClosed."""
        self._closing = True
        message = "the engine is shutting down"
        futures, self._futures = self._futures, {}
        for future in futures.values():
            if not future.done():
                future.set_exception(EngineClosed(message))
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.put(EngineClosed(message))
