"""One `rnnlm serve` process against the engine core in its own (`--engine-process`).

    python -m benchmarks.engine_process --trials 4 --duration 2

starts both servers on the same bundle and, trial by trial in alternating order, measures on
each: Generate at 64 streams (tokens/s, and the server's CPU seconds per token, the core
process's included: `ChildServer.cpu_seconds` counts a server's child processes), PredictNext
at concurrency 1 (p50), and a PredictNext while 64 long Generates run (p50, p99). It prints
every trial, the medians and the load average (docs/performance.md quotes its figures).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import grpc

from benchmarks.process import ChildServer
from benchmarks.server_load import (
    PORT_RE,
    READY_SECONDS,
    generate,
    predict_c1,
    serve_args,
    under_load,
    wait_serving,
)
from benchmarks.timing import BenchError
from benchmarks.workload import Plan, Workload, build_workload
from rnnlm.v1 import language_model_pb2_grpc as pb_grpc
from server.bundle import BundleError, load_bundle

CONFIGS = {"one process": (), "--engine-process": ("--engine-process",)}
STREAMS = 64
FIGURES = ("tokens_per_s", "cpu_us_per_token", "predict_p50_ms", "busy_p50_ms", "busy_p99_ms")


async def _trial(
    stub: pb_grpc.LanguageModelStub, child: ChildServer, plan: Plan, workload: Workload
) -> dict[str, float]:
    g = await generate(stub, child, plan, STREAMS)
    p = await predict_c1(stub, workload, plan)
    u = await under_load(stub, workload, plan, STREAMS)
    return dict(
        zip(
            FIGURES,
            (
                g["tokens_per_s"],
                g.get("server_cpu_us_per_token", float("nan")),
                p["p50_ms"],
                u["predict"]["p50_ms"],
                u["predict"]["p99_ms"],
            ),
            strict=True,
        )
    )


async def compare(
    bundle_dir: Path, trials: int, duration: float
) -> dict[str, list[dict[str, float]]]:
    plan = replace(
        Plan.make(trials=1, duration=duration), predict_calls=100, budget_s=4.0, under_load_calls=10
    )
    workload = build_workload(load_bundle(bundle_dir), replace(plan, trials=2 * trials + 2), None)
    children: dict[str, ChildServer] = {}
    channels: dict[str, grpc.aio.Channel] = {}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in CONFIGS}
    try:
        for name, flags in CONFIGS.items():
            args = serve_args(bundle_dir, True, flags, "cpu")
            children[name] = ChildServer("rnnlm", args, PORT_RE, start_seconds=READY_SECONDS)
            channels[name] = grpc.aio.insecure_channel(f"127.0.0.1:{children[name].port}")
            await wait_serving(channels[name], children[name])
        for t in range(trials):
            for name in list(CONFIGS)[:: 1 if t % 2 == 0 else -1]:
                stub = pb_grpc.LanguageModelStub(channels[name])
                figures = await _trial(stub, children[name], plan, workload)
                results[name].append(figures)
                shown = "  ".join(f"{k} {v:,.2f}" for k, v in figures.items())
                print(f"trial {t} {name:<17} {shown}  load {os.getloadavg()[0]:.2f}", flush=True)
    finally:
        for channel in channels.values():
            await channel.close()
        for child in children.values():
            child.stop()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.engine_process")
    parser.add_argument("--bundle", type=Path, default=Path("models/shakespeare-word"))
    parser.add_argument("--trials", type=int, default=4, help="per configuration (default 4)")
    parser.add_argument("--duration", type=float, default=2.0, help="s of Generate per trial")
    args = parser.parse_args(argv)
    if args.trials < 1 or not args.duration > 0:
        parser.error("--trials must be >= 1 and --duration > 0")
    try:
        results = asyncio.run(compare(args.bundle.resolve(), args.trials, args.duration))
    except (BenchError, BundleError) as e:
        print(f"engine_process: {e}", file=sys.stderr)
        return 2
    for name, trials in results.items():
        medians = "  ".join(f"{k} {statistics.median(t[k] for t in trials):,.2f}" for k in FIGURES)
        print(f"median {name:<17} {medians}")
    print(f"load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
