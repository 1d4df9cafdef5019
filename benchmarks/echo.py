"""The transport floor: a unary gRPC call to a trivial echo service on loopback.

The echo server is a grpc.aio server in its own process (`python -m benchmarks.echo`), as the
model server is, and is called from the same grpc.aio client code, so the difference between an
echo and a `PredictNext` is what the server does, not how it is reached. Messages are raw bytes
of about the size of a `PredictNext` request and response, so no protobuf code is involved.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import grpc

from benchmarks.process import ChildServer
from benchmarks.timing import latency, over_trials, time_calls_async

METHOD = "/rnnlm.bench.Echo/Echo"
PAYLOAD = bytes(96)
WARMUP_CALLS = 20
PORT_RE = r"echo listening on 127\.0\.0\.1:(\d+)"


async def _echo(request: bytes, context: Any) -> bytes:
    return request


async def serve() -> None:
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "rnnlm.bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(_echo)}
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


if __name__ == "__main__":
    asyncio.run(serve())
