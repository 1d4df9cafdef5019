"""N simulated typists for a fixed time against a fresh server: one JSON line of p50/p99 per
keystroke and the CPU an event cost the server and this process (the load generator).

The typing benchmark searches for the largest N within p99 10 ms; this runs one N, so two
server configurations (or two checkouts: run it from each, the server comes from the
checkout the script is in) can be compared in alternating trials at the N that matters:

    for i in 1 2 3; do for a in "" "--processes=2"; do
      PYTHONPATH=. python scripts/typing_crowd.py --typists 225 --text input.txt --server-arg=$a
    done; done

With `--py-spy FILE`, py-spy samples the server (250 Hz, raw format, per thread) during the
timed trial, its child processes too (py-spy is in the dev install).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc

from benchmarks import typing as bench
from benchmarks.process import ChildServer
from benchmarks.server_load import PORT_RE, READY_SECONDS, serve_args, wait_serving
from rnnlm.v1 import language_model_pb2_grpc as pb_grpc
from server.bundle import load_bundle

WARM_SECONDS = 2.0  # an untimed crowd first: sessions open, caches and code warm


async def run(args: argparse.Namespace) -> dict[str, Any]:
    bundle_dir = Path(args.bundle).resolve()
    bundle = load_bundle(bundle_dir)
    kind = str(bundle.manifest["tokenizer"]["kind"])
    held = bench.HeldOut.of(bench.read_text(Path(args.text), "--text"), args.text, kind, 3)
    extra = tuple(a for a in args.server_arg if a)
    child = ChildServer(
        "rnnlm", serve_args(bundle_dir, True, extra, "cpu"), PORT_RE, start_seconds=READY_SECONDS
    )
    spy: subprocess.Popen[bytes] | None = None
    options = [("grpc.use_local_subchannel_pool", 1)]  # each channel a connection of its own
    try:
        async with contextlib.AsyncExitStack() as stack:
            channels = [
                await stack.enter_async_context(
                    grpc.aio.insecure_channel(f"127.0.0.1:{child.port}", options=options)
                )
                for _ in range(bench.CONNECTIONS)
            ]
            for channel in channels:
                await wait_serving(channel, child)
            stubs = [pb_grpc.LanguageModelStub(channel) for channel in channels]
            warm = bench.TypingPlan(trial_s=WARM_SECONDS, warmup_s=0.5)
            await bench.crowd(stubs, held, args.typists, warm, child.cpu_seconds)
            if args.py_spy:
                spy = _py_spy(args.py_spy, child.pid, args.seconds)
            plan = bench.TypingPlan(trial_s=args.seconds, warmup_s=1.0)
            return await bench.crowd(stubs, held, args.typists, plan, child.cpu_seconds)
    finally:
        if spy is not None:
            spy.wait()
        child.stop()


def _py_spy(out: str, pid: int, seconds: float) -> subprocess.Popen[bytes]:
    command = ["py-spy", "record", "-r", "250", "-f", "raw", "--threads", "--nonblocking"]
    command += ["--subprocesses"]  # the workers of --processes, the core of --engine-process
    command += ["-d", str(int(seconds) + 1), "-o", out, "-p", str(pid)]
    py_spy = Path(sys.executable).parent / "py-spy"
    if py_spy.exists():
        command[0] = str(py_spy)
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", default="models/shakespeare-word")
    parser.add_argument(
        "--text", required=True, help="the corpus whose last 5%% of lines are typed"
    )
    parser.add_argument("--typists", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=8.0, help="the timed trial")
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="an extra `rnnlm serve` flag, e.g. --server-arg=--processes=2 (repeatable)",
    )
    parser.add_argument("--py-spy", metavar="FILE", help="sample the server into FILE")
    args = parser.parse_args()
    if args.typists < 1 or args.seconds <= 0:
        parser.error("--typists must be at least 1 and --seconds above 0")
    result = asyncio.run(run(args))
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
