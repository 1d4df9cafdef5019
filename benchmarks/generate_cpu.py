"""Server CPU per generated token at 64 streams against bare onnxruntime's at batch 64.

    python -m benchmarks.generate_cpu --trials 3 --duration 2 --config= --config=--stream-tokens=1
    python -m benchmarks.generate_cpu --trials 5 --checkout /tmp/parent --checkout .

The part of `rnnlm bench` that measures issue 14's first target, alone and cheap: it starts
one `rnnlm serve` per `--config` (extra flags, split like a shell command line; empty for the
defaults), or per `--checkout` (the code of that directory, as `benchmarks.predict_ab` runs
it) and, trial after trial, measures bare batch-64 steps (this process's CPU time a
token, the engine's session options) and then each server under `--streams` Generate streams
(the server process's CPU time from /proc over the tokens the client received), so the ratio
of each trial compares figures taken a few seconds apart. It prints every trial's ratio, the
medians and the load average, and per trial how the server's CPU a token splits between its
threads (from /proc/PID/task, over the trial and its warm-up): the event loop (gRPC,
servicer, delivery) and the busiest others, the engine's step thread first.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort

from benchmarks.bare import session, step_trial
from benchmarks.process import ChildServer
from benchmarks.server_load import PORT_RE, READY_SECONDS, generate, serve_args, wait_serving
from benchmarks.timing import BenchError
from benchmarks.workload import Plan, build_workload
from rnnlm.v1 import language_model_pb2_grpc as pb_grpc
from server.bundle import Bundle, BundleError, load_bundle

BARE_BATCH = 64


async def compare(
    bundle_dir: Path,
    configurations: list[list[str]],
    streams: int,
    plan: Plan,
    checkouts: list[Path | None] | None = None,
) -> list[dict[str, float]]:
    """Per trial: bare's CPU us a token, and each configuration's server CPU us a token
    (`checkouts[i]`: the code configuration i runs, None for this one's)."""
    bundle = load_bundle(bundle_dir)
    workload = build_workload(bundle, plan, None)
    bare = session(bundle, "step", plan)
    children: list[ChildServer] = []
    channels: list[grpc.aio.Channel] = []
    trials: list[dict[str, float]] = []
    try:
        for flags, checkout in zip(
            configurations, checkouts or [None] * len(configurations), strict=True
        ):
            args = serve_args(bundle_dir, True, (*plan.server_args, *flags), plan.provider)
            env = None if checkout is None else {"PYTHONPATH": str(checkout), "PYTHONSAFEPATH": "1"}
            children.append(
                ChildServer("rnnlm", args, PORT_RE, start_seconds=READY_SECONDS, env=env)
            )
        for child in children:
            channels.append(grpc.aio.insecure_channel(f"127.0.0.1:{child.port}"))
            await wait_serving(channels[-1], child)
        for t in range(plan.trials):
            figures = {"bare": _bare_us(bare, bundle, workload.ids, plan)}
            order = list(enumerate(children))[:: 1 if t % 2 == 0 else -1]
            splits = []
            for i, child in order:
                stub = pb_grpc.LanguageModelStub(channels[i])
                before = thread_seconds(child.pid)
                g = await generate(stub, child, replace(plan, trials=1), streams)
                us = g.get("server_cpu_us_per_token", float("nan"))
                figures[f"server{i}"] = us
                figures[f"rate{i}"] = g["tokens_per_s"]
                split = _split(before, thread_seconds(child.pid), child.pid, us)
                splits.append(f"    [{i}] us a token by thread: {split}")
            trials.append(figures)
            print(_trial_line(t, figures, len(children)), *sorted(splits), sep="\n", flush=True)
        return trials
    finally:
        for channel in channels:
            await channel.close()
        for child in children:
            child.stop()


def _bare_us(bare: ort.InferenceSession, bundle: Bundle, ids: np.ndarray, plan: Plan) -> float:
    out = step_trial(bare, bundle, ids, BARE_BATCH, plan.large_step_calls, plan.budget_s)
    return float(out["cpu_us_per_token"])


def thread_seconds(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) each live thread of process `pid` has used; empty where
    /proc is not available."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def _split(before: dict[int, float], after: dict[int, float], pid: int, us: float) -> str:
    """`us` (the server's CPU a token) shared out by each thread's part of the CPU used."""
    used = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
    total = sum(used.values())
    if total <= 0:
        return "n/a"
    busiest = sorted(used, key=lambda tid: -used[tid])[:4]
    named = ["event loop" if tid == pid else f"thread {tid}" for tid in busiest]
    return ", ".join(f"{n} {us * used[t] / total:.1f}" for n, t in zip(named, busiest, strict=True))


def _trial_line(t: int, figures: dict[str, float], count: int) -> str:
    parts = [f"trial {t}  bare {figures['bare']:.1f} us"]
    for i in range(count):
        us = figures[f"server{i}"]
        parts.append(
            f"[{i}] {us:.1f} us ({us / figures['bare']:.2f}x, {figures[f'rate{i}']:,.0f} tok/s)"
        )
    return "  ".join(parts) + f"  load {os.getloadavg()[0]:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.generate_cpu",
        description="server CPU per generated token against bare onnxruntime's, trials alternating",
    )
    parser.add_argument(
        "--config",
        action="append",
        default=None,
        metavar="FLAGS",
        help="one server's extra `rnnlm serve` flags (--config= is the defaults); repeatable",
    )
    parser.add_argument(
        "--checkout",
        action="append",
        type=Path,
        default=None,
        metavar="DIR",
        help="one server running the code of DIR, with the default flags; repeatable "
        "(instead of --config)",
    )
    parser.add_argument("--bundle", type=Path, default=Path("models/shakespeare-word"))
    parser.add_argument("--streams", type=int, default=64, help="Generate streams (default 64)")
    parser.add_argument("--trials", type=int, default=3, help="(default 3)")
    parser.add_argument("--duration", type=float, default=2.0, help="s of load a trial")
    args = parser.parse_args(argv)
    if args.streams < 1 or args.trials < 1 or not args.duration > 0:
        parser.error("--streams and --trials must be >= 1 and --duration > 0")
    if args.checkout and args.config:
        parser.error("give --config or --checkout, not both")
    checkouts = [c.resolve() for c in args.checkout] if args.checkout else None
    labels = [str(c) for c in checkouts] if checkouts else args.config or [""]
    configurations = [[] for _ in labels] if checkouts else [shlex.split(c) for c in labels]
    try:
        plan = Plan.make(trials=args.trials, duration=args.duration)
        trials = asyncio.run(
            compare(args.bundle.resolve(), configurations, args.streams, plan, checkouts)
        )
    except (BenchError, BundleError) as e:
        print(f"generate_cpu: {e}", file=sys.stderr)
        return 2
    for i, label in enumerate(labels):
        ratios = [t[f"server{i}"] / t["bare"] for t in trials]
        us = statistics.median(t[f"server{i}"] for t in trials)
        shown = ", ".join(f"{r:.2f}" for r in ratios)
        print(
            f"median [{i}] {label or '(defaults)'}: {us:.1f} us a token, "
            f"{statistics.median(ratios):.2f}x bare (trials {shown})"
        )
    print(f"bare median {statistics.median(t['bare'] for t in trials):.1f} us a token")
    print(f"load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
