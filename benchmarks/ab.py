"""Generate throughput of two or more `rnnlm serve` configurations, side by side.

    python -m benchmarks.ab --streams 64,256 --config= --config=--batch-threads=2

starts one server per `--config` (that server's extra `rnnlm serve` flags, split like a shell
command line; empty for the defaults), all on the same bundle as `rnnlm bench`
starts them, then measures the aggregate tokens/s of Generate streams against each in turn,
trial after trial, so that a machine whose speed drifts slows every configuration alike. It
prints, per stream count and configuration, the median and every trial, with the server's CPU.

What it is for: deciding a setting (docs/performance.md quotes its figures for
`--batch-threads`). One `rnnlm bench` run per setting would put minutes between the figures
being compared, and on a shared machine that is more than the difference being measured.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import grpc

from benchmarks.process import ChildServer
from benchmarks.server_load import PORT_RE, READY_SECONDS, generate, serve_args, wait_serving
from benchmarks.timing import BenchError
from benchmarks.workload import Plan
from rnnlm.v1 import language_model_pb2_grpc as pb_grpc
from server.bundle import BundleError, load_bundle
from server.engine import PROVIDERS


async def compare(
    bundle_dir: Path,
    configurations: list[list[str]],
    streams: list[int],
    plan: Plan,
) -> dict[int, list[list[dict[str, float]]]]:
    """Per stream count, per configuration, the trials' Generate figures (one trial of each
    configuration in turn, `plan.trials` times)."""
    children: list[ChildServer] = []
    channels: list[grpc.aio.Channel] = []
    try:
        for flags in configurations:
            args = serve_args(bundle_dir, True, (*plan.server_args, *flags), plan.provider)
            children.append(ChildServer("rnnlm", args, PORT_RE, start_seconds=READY_SECONDS))
        for child in children:
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{child.port}")
            channels.append(channel)
            await wait_serving(channel, child)
        results: dict[int, list[list[dict[str, float]]]] = {}
        for count in streams:
            results[count] = [[] for _ in configurations]
            for _ in range(plan.trials):
                for i, (child, channel) in enumerate(zip(children, channels, strict=True)):
                    stub = pb_grpc.LanguageModelStub(channel)
                    figures = await generate(stub, child, replace(plan, trials=1), count)
                    results[count][i].append(figures)
        return results
    finally:
        for channel in channels:
            await channel.close()
        for child in children:
            child.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.ab",
        description="Generate tokens/s of rnnlm serve configurations, trials alternating",
    )
    parser.add_argument(
        "--config",
        action="append",
        required=True,
        metavar="FLAGS",
        help="one server's extra `rnnlm serve` flags, e.g. --config=--batch-threads=2 "
        "(--config= is the defaults); repeat for each server",
    )
    parser.add_argument("--bundle", type=Path, default=Path("models/shakespeare-word"))
    parser.add_argument(
        "--streams", default="64", help="comma-separated stream counts (default 64)"
    )
    parser.add_argument("--trials", type=int, default=3, help="per configuration (default 3)")
    parser.add_argument(
        "--duration", type=float, default=3.0, help="seconds of load per trial (default 3)"
    )
    parser.add_argument(
        "--provider", choices=PROVIDERS, default="cpu", help="every server's --provider"
    )
    args = parser.parse_args(argv)
    try:
        streams = [int(s) for s in args.streams.split(",")]
    except ValueError:
        parser.error(f"--streams: expected comma-separated counts, not {args.streams!r}")
    if min(streams) < 1 or args.trials < 1 or not args.duration > 0:
        parser.error("--streams must be >= 1, --trials >= 1 and --duration > 0")
    configurations = [shlex.split(c) for c in args.config]
    try:
        plan = Plan.make(trials=args.trials, duration=args.duration, provider=args.provider)
        load_bundle(args.bundle)
        results = asyncio.run(compare(args.bundle.resolve(), configurations, streams, plan))
    except (BenchError, BundleError) as e:
        print(f"ab: {e}", file=sys.stderr)
        return 2
    labels = [c or "(defaults)" for c in args.config]
    width = max(len(label) for label in labels)
    for count, per_configuration in results.items():
        for label, trials in zip(labels, per_configuration, strict=True):
            rates = [t["tokens_per_s"] for t in trials]
            cpu = statistics.median(t.get("server_cpu_percent", 0.0) for t in trials)
            print(
                f"{count:>4} streams  {label:<{width}}  "
                f"median {statistics.median(rates):>8,.0f} tokens/s  "
                f"server CPU {cpu:>4.0f} %  trials {', '.join(f'{r:,.0f}' for r in rates)}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
