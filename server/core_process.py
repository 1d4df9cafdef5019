"""The engine core in its own process: `python -m server.core_process FD`.

The gRPC front end (server/remote_engine.py) starts this process with one end of a socket pair
as file descriptor FD, sends the bundle's directory and the `EngineConfig`, and then calls
the engine through the channel (server/channel.py). Here an ordinary `Engine` runs the
requests on this process's own event loop and worker threads, so the front end's gRPC writes
(which hold its GIL) never compete with the steps. Every reply of a step goes back in one
frame. The process ends when the channel closes (the front end closed the engine or died),
and with the parent process (PR_SET_PDEATHSIG), so no core outlives its server.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import os
import signal
import socket
import sys
from collections import deque
from collections.abc import Callable
from typing import Any, cast

from server import channel, heap
from server.blas import limit_blas_threads
from server.bundle import load_bundle
from server.engine import Engine
from server.engine_errors import EngineError
from server.metrics import EngineMetrics
from server.requests import END, Failure, GenerateRequest
from server.sampling import GeneratedToken

_PR_SET_PDEATHSIG = 1
# How often the core checks for a change of its request count that no reply carried.
WATCH_SECONDS = 0.005


class _Recorder:
    """Stands in for an `EngineMetrics` (or one of its cache recorders): each call becomes an
    event that the next frame carries to the front end's real one."""

    def __init__(self, events: deque[tuple[str, str, tuple[Any, ...]]], path: str) -> None:
        self._events, self._path = events, path

    def __getattr__(self, method: str) -> Callable[..., None]:
        if method.startswith("_"):
            raise AttributeError(method)

        def record(*args: Any) -> None:
            self._events.append((self._path, method, args))  # sent with the next frame

        return record


class _Generation:
    """Where one generation's payloads go: the outbox, under the generation's id."""

    def __init__(self, core: Core, rid: int) -> None:
        self._core, self._id = core, rid

    def put(self, item: object) -> None:
        core = self._core
        if isinstance(item, GeneratedToken):
            core.outbox.add((self._id, channel.TOKEN, tuple(item)))
            return
        core.generations.pop(self._id, None)
        if item is END:
            core.outbox.add((self._id, channel.END, None))
        else:
            message = item.message if isinstance(item, Failure) else str(item)
            shutdown = isinstance(item, Failure) and item.shutdown
            name = "EngineClosed" if shutdown else "EngineError"
            core.outbox.add((self._id, channel.ERROR, (name, message)))


class Core:
    """Runs the front end's messages on `engine`; replies go out through `outbox`."""

    def __init__(
        self,
        engine: Engine,
        outbox: channel.Outbox,
        events: deque[tuple[str, str, tuple[Any, ...]]],
    ) -> None:
        self.engine, self.outbox, self.events = engine, outbox, events
        self.calls: dict[int, asyncio.Task[Any]] = {}
        self.generations: dict[int, GenerateRequest] = {}
        self.reported = 0  # the engine's active count the last frame carried

    def handle(self, message: tuple[Any, ...]) -> None:
        kind, rid = message[0], message[1]
        if kind == "call":
            self._call(rid, message[2], message[3])
        elif kind == "generate":
            self._generate(rid, *message[2:])
        elif kind == "cancel":
            task = self.calls.pop(rid, None)
            if task is not None:
                task.cancel()
            request = self.generations.pop(rid, None)
            if request is not None:
                request.cancelled = True

    def _call(self, rid: int, method: str, args: tuple[Any, ...]) -> None:
        if method not in channel.CALLS:
            self._error(rid, ValueError(f"the engine core has no call {method[:40]!r}"))
            return
        task = asyncio.ensure_future(getattr(self.engine, method)(*args))
        self.calls[rid] = task
        task.add_done_callback(lambda t: self._answer(rid, t))

    def _answer(self, rid: int, task: asyncio.Task[Any]) -> None:
        if self.calls.pop(rid, None) is None or task.cancelled():
            return  # cancelled by the front end, which no longer waits
        error = task.exception()
        if error is not None:
            self._error(rid, error)
        else:
            self.outbox.add((rid, channel.OK, task.result()))

    def _generate(self, rid: int, ids: Any, max_tokens: int, params: Any, stops: Any) -> None:
        try:
            request = self.engine.submit_generation(
                ids, max_tokens, params, stops, _Generation(self, rid).put
            )
        except Exception as e:
            self._error(rid, e)
            return
        if not request.done:  # it may have ended at once, with its first token
            self.generations[rid] = request

    def _error(self, rid: int, error: BaseException) -> None:
        self.outbox.add((rid, channel.ERROR, (type(error).__name__, str(error))))

    async def watch(self) -> None:
        """Send a frame when no reply carried a change of the engine's count of requests (a
        cancelled request leaving: the front end's `active`) or the workers' metric events
        (which do not wake the event loop each: that cost a quarter of the core's samples)."""
        while True:
            busy = self.engine.active or self.reported
            await asyncio.sleep(WATCH_SECONDS if busy else 20 * WATCH_SECONDS)
            if self.engine.active != self.reported or self.events:
                self.outbox.touch()

    def close(self) -> None:
        for task in self.calls.values():
            task.cancel()


async def serve(sock: socket.socket) -> None:
    """Load the engine the first frame names, then run the front end's frames until EOF."""
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    path, name, version, config, with_metrics = await channel.read_frame(reader)
    events: deque[tuple[str, str, tuple[Any, ...]]] = deque()
    try:
        bundle = load_bundle(path)
        if (bundle.name, bundle.version) != (name, version):  # changed on disk since
            raise EngineError(
                f"the bundle at {str(path)[:200]} is now {bundle.name[:80]!r} version "
                f"{bundle.version[:40]}, not the {name[:80]!r} version {version[:40]} it was"
            )
        engine = Engine(
            bundle,
            dataclasses.replace(config, process=False),
            _metrics(events) if with_metrics else None,
        )
        await engine.start()
    except Exception as e:
        writer.write(channel.encode(("failed", type(e).__name__, str(e))))
        await writer.drain()
        writer.close()
        return
    heap.settle()  # the engine's long-lived objects out of collections (server/heap.py)
    writer.write(channel.encode(("ready", engine.provider, engine.prefill_split)))

    def frame(items: list[Any]) -> Any:
        sent = [events.popleft() for _ in range(len(events))]  # workers may append meanwhile
        core.reported = engine.active
        return (core.reported, items, sent)

    core = Core(engine, channel.Outbox(writer, frame), events)
    core.outbox.touch()  # the metric events of the start
    watch = asyncio.create_task(core.watch())
    try:
        while True:
            for message in await channel.read_frame(reader):
                core.handle(message)
    except channel.ChannelClosed:
        pass
    finally:
        watch.cancel()
        core.close()
        await engine.close()
        writer.close()


def _metrics(events: deque[tuple[str, str, tuple[Any, ...]]]) -> EngineMetrics:
    """A stand-in for the front end's `EngineMetrics` whose calls become `events`."""
    recorder = _Recorder(events, "")
    recorder.state_cache = _Recorder(events, "state_cache")  # type: ignore[attr-defined]
    recorder.recall_cache = _Recorder(events, "recall_cache")  # type: ignore[attr-defined]
    return cast(EngineMetrics, recorder)


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: the channel's EOF still ends the process


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0].isdigit():
        print("usage: python -m server.core_process FD", file=sys.stderr)
        return 2
    _die_with_parent()
    limit_blas_threads(os.environ)  # as the server process does (server/blas.py)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the front end decides when to stop
    sock = socket.socket(fileno=int(argv[0]))
    asyncio.run(serve(sock))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
