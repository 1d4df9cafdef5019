"""A soak test: every RPC at once for a while, then a check that the server came back to rest.

    python -m benchmarks.soak --bundle models/shakespeare-word --seconds 40

starts `rnnlm serve` on the bundle as `rnnlm bench` does (its own process, free ports) and runs
`--workers` clients, each issuing calls of a kind drawn at random from `--kinds`, back to back:
Generate (some cancelled after a few messages, some with a deadline too short to finish),
PredictNext and Score (half of them with the continuous cache when the model has one), Embed
and TypingSession, on texts of mixed lengths cut from the bundle's corpus. It then reports how
every call ended, as the client saw it and as the server recorded it, and the server's resident
memory before and after. It exits 1 when a call ended with a status its kind should not give,
when the server recorded an INTERNAL or UNKNOWN status (a client may see DEADLINE_EXCEEDED for
a call the server thought had failed), or when the server did not come back to rest (an active
stream or a queued request left). An overloaded server's RESOURCE_EXHAUSTED counts as
unexpected: the soak is meant for a server configured for its load.

What it is for: a leak or a stuck request shows as a gauge that stays up, or as memory that
keeps growing from one run to the next; what memory the server keeps after a mixed load is the
figure docs/performance.md quotes. It times nothing (throughput is `rnnlm bench`'s job).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import re
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from benchmarks.echo import OWN_CONNECTION
from benchmarks.process import ChildServer
from benchmarks.server_load import PORT_RE, READY_SECONDS, serve_args, wait_serving
from benchmarks.timing import BenchError
from benchmarks.workload import Plan, Workload, build_workload
from rnnlm.v1 import language_model_pb2 as pb
from rnnlm.v1 import language_model_pb2_grpc as pb_grpc
from server.bundle import BundleError, load_bundle

KINDS = ("generate", "cancel", "deadline", "predict", "score", "embed", "typing")
# How a call of each kind may end (a short generation can finish before its cancel or its
# deadline); any other status is a failure of the soak.
ALLOWED = {"cancel": {"OK", "CANCELLED"}, "deadline": {"OK", "DEADLINE_EXCEEDED"}}
METRICS_PORT = re.compile(r"metrics on http://\S*:(\d+)/metrics")
AT_REST = re.compile(r"^(rnnlm_(?:active_streams|queue_depth)\{[^}]*\}) (\S+)$", re.M)
SERVER_CODES = re.compile(
    r'^rnnlm_requests_total\{code="(\w+)",method="(\w+)",[^}]*\} (\S+)$', re.M
)
# Statuses the server must never record: each is a failure of its own, whatever the client saw.
SERVER_FAILURES = ("INTERNAL", "UNKNOWN")
CALL_SECONDS = 30.0
SETTLE_SECONDS = 5.0  # how long the server may take to come back to rest after the load
SHORT_DEADLINE_S = 0.005


class Client:
    """One worker's calls: texts cut from the workload, kinds and sizes from its own rng."""

    def __init__(
        self, stub: pb_grpc.LanguageModelStub, workload: Workload, seed: int, cached: bool
    ) -> None:
        self.stub = stub
        self.workload = workload
        self.rng = random.Random(seed)
        self.cached = cached  # the model has a continuous cache

    def text(self, low: int, high: int) -> str:
        """A fresh stretch of the corpus of between `low` and `high` tokens."""
        return self.workload.text(self.workload.fresh(self.rng.randrange(low, high)))

    def cache(self) -> bool:
        return self.cached and self.rng.random() < 0.5

    async def call(self, kind: str) -> str:
        """Make one call of `kind`; the name of the status it ended with."""
        try:
            code = await self._call(kind)
        except grpc.aio.AioRpcError as e:
            code = e.code()
        return str(code.name)

    async def _call(self, kind: str) -> grpc.StatusCode:
        rng, stub = self.rng, self.stub
        if kind in ("generate", "cancel", "deadline"):
            request = pb.GenerateRequest(
                prompt=self.text(1, 60),
                max_tokens=rng.randrange(1, 80),
                seed=rng.randrange(1 << 30),
                temperature=rng.choice((0.7, 1.0)),
            )
            if rng.random() < 0.5:
                request.top_p = 0.9
            deadline = SHORT_DEADLINE_S if kind == "deadline" else CALL_SECONDS
            stream = stub.Generate(request, timeout=deadline)
            stop_after = rng.randrange(1, 5) if kind == "cancel" else -1
            async for _ in stream:
                stop_after -= 1
                if stop_after == 0:
                    stream.cancel()
                    break
            return await stream.code()  # a cancelled stream raises nothing
        elif kind == "predict":
            request_p = pb.PredictNextRequest(
                context=self.text(1, 400), k=5, continuous_cache=self.cache()
            )
            await stub.PredictNext(request_p, timeout=CALL_SECONDS)
        elif kind == "score":
            texts = [self.text(1, 2000) for _ in range(rng.randrange(1, 4))]
            request_s = pb.ScoreRequest(texts=texts, continuous_cache=self.cache())
            await stub.Score(request_s, timeout=CALL_SECONDS)
        elif kind == "embed":
            await stub.Embed(pb.EmbedRequest(texts=[self.text(1, 200)]), timeout=CALL_SECONDS)
        else:
            # As a typing client does: each keystroke waits for its suggestions. (A client that
            # writes on after the server ended the stream gets INTERNAL from grpc.aio instead of
            # the server's status: grpc/grpc#36066.)
            session = stub.TypingSession(timeout=CALL_SECONDS)
            async for event in self.typing():
                await session.write(event)
                if await session.read() is grpc.aio.EOF:  # the server ended the session
                    return await session.code()
            await session.done_writing()
            return await session.code()
        return grpc.StatusCode.OK

    async def typing(self) -> AsyncIterator[pb.TypingEvent]:
        yield pb.TypingEvent(text=self.text(1, 50), k=3)
        for _ in range(self.rng.randrange(1, 8)):
            yield pb.TypingEvent(text=" " + self.text(1, 2), k=3)


async def soak(
    bundle_dir: Path, kinds: list[str], workers: int, seconds: float, server_args: list[str]
) -> int:
    bundle = load_bundle(bundle_dir)
    plan = Plan(trials=1, score_tokens=100_000)  # a stream long enough to cut fresh texts from
    workload = build_workload(bundle, plan, None)
    args = serve_args(bundle_dir, True, tuple(server_args))
    child = ChildServer("rnnlm", args, PORT_RE, start_seconds=READY_SECONDS)
    outcomes: collections.Counter[tuple[str, str]] = collections.Counter()
    try:
        # A connection of the channel's own, closed before the server stops (see server_load).
        options = OWN_CONNECTION
        async with grpc.aio.insecure_channel(f"127.0.0.1:{child.port}", options=options) as channel:
            stub = pb_grpc.LanguageModelStub(channel)
            await wait_serving(channel, child)
            metrics_url = _metrics_url(child)
            before = child.rss_mb()
            cached = bundle.continuous_cache is not None
            end = time.perf_counter() + seconds

            async def worker(seed: int) -> None:
                client = Client(stub, workload, seed, cached)
                while time.perf_counter() < end:
                    kind = client.rng.choice(kinds)
                    outcomes[kind, await client.call(kind)] += 1

            await asyncio.gather(*(worker(seed) for seed in range(workers)))
            gauges, server_codes = await _settled(metrics_url)
            child.check_alive()
            after = child.rss_mb()
    finally:
        child.stop()
    failures = 0
    print(f"{workers} clients for {seconds:g} s on {bundle.name} v{bundle.version}")
    for (kind, status), count in sorted(outcomes.items()):
        ok = status in ALLOWED.get(kind, {"OK"})
        failures += 0 if ok else count
        print(f"  {kind:9} {status:18} {count:6}{'' if ok else '  <- unexpected'}")
    print("as the server recorded them (rnnlm_requests_total):")
    for (method, status), recorded in sorted(server_codes.items()):
        bad = status in SERVER_FAILURES
        failures += int(recorded) if bad else 0
        print(f"  {method:13} {status:18} {recorded:6.0f}{'  <- a failure' if bad else ''}")
    print(f"resident memory: {_mib(before)} after start, {_mib(after)} after the load")
    busy = {name: value for name, value in gauges.items() if float(value) != 0}
    print("at rest" if not busy else f"NOT at rest: {busy}")
    return 1 if failures or busy else 0


def _mib(rss: float | None) -> str:
    return "n/a" if rss is None else f"{rss:.0f} MiB"


def _metrics_url(child: ChildServer) -> str:
    """Where the server serves /metrics, from the line it logs at start."""
    found = METRICS_PORT.search(child.log_tail())
    if found is None:
        raise BenchError(f"the server did not log its metrics port; its log:\n{child.log_tail()}")
    return f"http://127.0.0.1:{found.group(1)}/metrics"


async def _settled(url: str) -> tuple[dict[str, str], dict[tuple[str, str], float]]:
    """The server's metrics once its load gauges read zero, or as they are after
    `SETTLE_SECONDS`: cancellations reach the engine at its next step, and on a busy machine
    the last calls' ends take a moment to be recorded, but a leaked stream never ends."""
    deadline = time.perf_counter() + SETTLE_SECONDS
    while True:
        await asyncio.sleep(0.25)
        gauges, codes = _read_metrics(url)
        if time.perf_counter() >= deadline or all(float(v) == 0 for v in gauges.values()):
            return gauges, codes


def _read_metrics(url: str) -> tuple[dict[str, str], dict[tuple[str, str], float]]:
    """Every active-stream and queue-depth series, and the server's count of calls by
    (method, status)."""
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    gauges = dict(AT_REST.findall(text))
    for gauge in ("rnnlm_active_streams", "rnnlm_queue_depth"):
        if not any(name.startswith(gauge + "{") for name in gauges):
            raise BenchError(f"the server's /metrics has no {gauge} series to check rest by")
    codes: dict[tuple[str, str], float] = {}
    for status, method, value in SERVER_CODES.findall(text):
        codes[method, status] = codes.get((method, status), 0.0) + float(value)
    return gauges, codes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.soak", description="every RPC at once, then a check for rest"
    )
    parser.add_argument("--bundle", type=Path, default=Path("models/shakespeare-word"))
    parser.add_argument("--seconds", type=float, default=40.0, help="of load (default 40)")
    parser.add_argument("--workers", type=int, default=40, help="concurrent clients (default 40)")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated: {KINDS}")
    parser.add_argument(
        "--server-arg", action="append", default=[], help="an extra `rnnlm serve` flag"
    )
    args = parser.parse_args(argv)
    kinds = args.kinds.split(",")
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        parser.error(f"--kinds: unknown {unknown}; known: {', '.join(KINDS)}")
    if not args.seconds > 0 or args.workers < 1:
        parser.error("--seconds must be > 0 and --workers >= 1")
    try:
        return asyncio.run(soak(args.bundle, kinds, args.workers, args.seconds, args.server_arg))
    except (BenchError, BundleError) as e:
        print(f"soak: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
