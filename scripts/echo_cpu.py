"""A gRPC echo server's CPU per call and per streamed message, read from /proc.

This script compares the transport floors of two servers: `python -m benchmarks.echo`
(grpc.aio, as the model server uses) and `benchmarks/echo_cpp/echo.cc` (gRPC's C++ callback
API). Each prints the port it listens on. Alternate the two servers in a few runs:

    python -m benchmarks.echo &            # "echo listening on 127.0.0.1:PORT"
    PYTHONPATH=. python scripts/echo_cpu.py --port PORT --pid $!

It makes unary calls of 96 bytes one at a time for `--seconds`. Then it plays one
bidirectional stream, a 40-byte message and its echo at a time. For each, it prints the
server's CPU (user + system, from /proc/PID/stat) per call or message, and the client's p50
round trip.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from benchmarks.echo import METHOD, PAYLOAD, SESSION_METHOD

EVENT = bytes(40)


def cpu_seconds(pid: int) -> float:
    """The process's user + system CPU time."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def timed(pid: int, seconds: float, once: Callable[[], Awaitable[object]]) -> str:
    """`once` repeated for `seconds`: the server's CPU per repetition and the p50 round trip."""
    for _ in range(50):  # warm-up
        await once()
    samples = []
    before = cpu_seconds(pid)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        await once()
        samples.append(time.perf_counter() - start)
    used = cpu_seconds(pid) - before
    return (
        f"{len(samples)} done, server CPU {1e3 * used / len(samples):.3f} ms each, "
        f"p50 {1e3 * statistics.median(samples):.3f} ms"
    )


async def main(port: int, pid: int, seconds: float) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        unary = channel.unary_unary(METHOD)
        print("unary calls:     ", await timed(pid, seconds, lambda: unary(PAYLOAD)))
        stream = channel.stream_stream(SESSION_METHOD)()

        async def message() -> object:
            await stream.write(EVENT)
            return await stream.read()

        print("stream messages: ", await timed(pid, seconds, message))
        await stream.done_writing()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pid", type=int, required=True, help="the echo server's process id")
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args()
    asyncio.run(main(args.port, args.pid, args.seconds))
