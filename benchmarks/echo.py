"""The transport floor: a unary gRPC call to a trivial echo service on loopback, and the CPU a
server-streaming call and each of its messages cost a server that does nothing else.

The echo server is a grpc.aio server in its own process (`python -m benchmarks.echo`), as the
model server is, and is called from the same grpc.aio client code, so the difference between an
echo and a `PredictNext` is what the server does, not how it is reached. Messages are raw bytes
of about the size of a `PredictNext` request and response, so no protobuf code is involved.

`measure_stream` is Generate's floor: `STREAMS` concurrent streams of calls that each ask for a
number of messages about the size of a one-token `GenerateResponse`, first one message a call,
then `LONG_CALL` (alternating, `trials` times each); the echo server's CPU time from /proc over
each load gives its CPU per call and per message (two loads, two unknowns), so a Generate
call's transport cost is `call_us + messages * message_us`.

`measure_session` is TypingSession's floor: bidirectional streams over several connections,
each sending a message (about a typing event's size) at a typist's pace and reading the echo
server's reply (about a three-word `Suggestions`); the echo server's CPU per message is what
gRPC alone costs a keystroke.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from typing import Any

import grpc

from benchmarks.process import ChildServer
from benchmarks.timing import latency, over_trials, time_calls_async

METHOD = "/rnnlm.bench.Echo/Echo"
STREAM_METHOD = "/rnnlm.bench.Echo/Stream"
SESSION_METHOD = "/rnnlm.bench.Echo/Session"
EVENT = bytes(40)  # about a TypingEvent: a letter or a word, its partial word, k
SUGGESTIONS = bytes(90)  # about a Suggestions reply with three words
PAYLOAD = bytes(96)
REPLY = bytes(24)  # about a GenerateResponse with one token, its text and log-prob
STREAMS = 64
LONG_CALL = 64  # messages in a call of the second load
MAX_MESSAGES = 1024
WARMUP_CALLS = 20
# Channel options that give each channel a TCP connection of its own (grpc.aio otherwise
# shares one subchannel between channels to the same address), as many clients would have.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
PORT_RE = r"echo listening on 127\.0\.0\.1:(\d+)"


async def _echo(request: bytes, context: Any) -> bytes:
    return request


async def _stream(request: bytes, context: Any) -> None:
    """`REPLY` as many times as the request's two-byte count says (at most MAX_MESSAGES)."""
    for _ in range(min(int.from_bytes(request[:2], "little"), MAX_MESSAGES)):
        await context.write(REPLY)


async def _session(requests: Any, context: Any) -> None:
    """`SUGGESTIONS` for every message, as a typing session answers each keystroke."""
    async for _ in requests:
        await context.write(SUGGESTIONS)


async def serve() -> None:
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "rnnlm.bench.Echo",
        {
            "Echo": grpc.unary_unary_rpc_method_handler(_echo),
            "Stream": grpc.unary_stream_rpc_method_handler(_stream),
            "Session": grpc.stream_stream_rpc_method_handler(_session),
        },
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"echo listening on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    await server.wait_for_termination()


async def measure(trials: int, calls: int, seconds: float) -> dict[str, Any]:
    """Round-trip latency of echo calls at concurrency 1, over `trials` trials."""
    child = ChildServer("benchmarks.echo", [], PORT_RE)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{child.port}") as channel:
            call = channel.unary_unary(METHOD)
            await channel.channel_ready()

            async def once(_: int) -> None:
                await call(PAYLOAD)

            for i in range(WARMUP_CALLS):
                await once(i)
            results = [latency(await time_calls_async(once, calls, seconds)) for _ in range(trials)]
        summary = over_trials(results)
        summary["payload_bytes"] = len(PAYLOAD)
        return summary
    finally:
        child.stop()


async def measure_stream(trials: int, seconds: float) -> dict[str, Any]:
    """The echo server's CPU per streaming call and per message under STREAMS streams."""
    child = ChildServer("benchmarks.echo", [], PORT_RE)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{child.port}") as channel:
            call = channel.unary_stream(STREAM_METHOD)
            await channel.channel_ready()
            await _stream_load(call, 1, min(seconds, 1.0))  # warm-up
            loads: dict[int, list[tuple[float, int]]] = {1: [], LONG_CALL: []}
            for _ in range(trials):
                for size, got in loads.items():
                    before = child.cpu_seconds()
                    calls = await _stream_load(call, size, seconds)
                    after = child.cpu_seconds()
                    if before is None or after is None:
                        return {}
                    got.append((after - before, calls))
        return _per_call_and_message(loads)
    finally:
        child.stop()


async def _stream_load(call: Any, size: int, seconds: float) -> int:
    """Calls of `size` messages each, STREAMS at a time, back to back for `seconds`."""
    deadline = time.perf_counter() + seconds
    request = size.to_bytes(2, "little")
    counts = [0] * STREAMS

    async def stream(i: int) -> None:
        while time.perf_counter() < deadline:
            async for _ in call(request):
                pass
            counts[i] += 1

    await asyncio.gather(*(stream(i) for i in range(STREAMS)))
    return sum(counts)


async def measure_session(
    sessions: int, connections: int, per_second: float, seconds: float
) -> dict[str, Any]:
    """The echo server's CPU per message (and this process's, the load generator's) under
    `sessions` bidirectional streams over `connections` connections, each sending a message
    every 1 / `per_second` s and reading the reply before the next, for `seconds`."""
    child = ChildServer("benchmarks.echo", [], PORT_RE)
    channels = [
        grpc.aio.insecure_channel(f"127.0.0.1:{child.port}", options=OWN_CONNECTION)
        for _ in range(connections)
    ]
    try:
        for channel in channels:
            await channel.channel_ready()
        await _session_load(channels, sessions, per_second, min(seconds, 1.0))  # warm-up
        before, own = child.cpu_seconds(), time.process_time()
        messages = await _session_load(channels, sessions, per_second, seconds)
        after, own = child.cpu_seconds(), time.process_time() - own
        if before is None or after is None or not messages:
            return {}
        return {
            "sessions": sessions,
            "connections": connections,
            "messages": messages,
            "server_cpu_ms_per_message": (after - before) * 1e3 / messages,
            "client_cpu_ms_per_message": own * 1e3 / messages,
            "event_bytes": len(EVENT),
            "reply_bytes": len(SUGGESTIONS),
        }
    finally:
        for channel in channels:
            await channel.close()
        child.stop()


async def _session_load(
    channels: list[Any], sessions: int, per_second: float, seconds: float
) -> int:
    """Messages answered on `sessions` paced streams (spread over one period) in `seconds`."""
    deadline = time.perf_counter() + seconds
    period = 1.0 / per_second
    counts = [0] * sessions

    async def session(i: int) -> None:
        call = channels[i % len(channels)].stream_stream(SESSION_METHOD)()
        due = time.perf_counter() + period * i / sessions
        try:
            while due < deadline:
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                await call.write(EVENT)
                await call.read()
                counts[i] += 1
                due += period
        finally:
            call.cancel()

    await asyncio.gather(*(session(i) for i in range(sessions)))
    return sum(counts)


def _per_call_and_message(loads: dict[int, list[tuple[float, int]]]) -> dict[str, Any]:
    """Solve cpu = calls * (call + size * message) from the two loads' medians per call."""
    per_call = {
        size: statistics.median(cpu / max(calls, 1) for cpu, calls in trials)
        for size, trials in loads.items()
    }
    message = (per_call[LONG_CALL] - per_call[1]) / (LONG_CALL - 1)
    return {
        "streams": STREAMS,
        "call_us": (per_call[1] - message) * 1e6,
        "message_us": message * 1e6,
        "cpu_us_per_call": {str(size): cpu * 1e6 for size, cpu in per_call.items()},
        "reply_bytes": len(REPLY),
    }


if __name__ == "__main__":
    asyncio.run(serve())
