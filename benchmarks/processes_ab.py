"""`rnnlm serve --processes` A/B on typists: one server and an N-process one, trials interleaved.

Both servers run at once (an idle one costs nothing) and every typist count is tried on each in
turn, round after round, so a change of load on a shared machine falls on both alike. Each
trial is the typing benchmark's crowd (benchmarks/typing.py: typists at 5 keys/s over 16
connections): p50/p99 per keystroke and the server's CPU per event (its worker processes
included). Prints one line per trial and a table of medians.

    python -m benchmarks.processes_ab --bundle models/shakespeare-word \\
        --text ../shared/data/tinyshakespeare/input.txt --typists 100,150,200 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
from pathlib import Path
from typing import Any

from benchmarks import report
from benchmarks.process import ChildServer
from benchmarks.server_load import PORT_RE, READY_SECONDS, serve_args
from benchmarks.typing import HeldOut, TypingPlan, connect, corpus_text, crowd
from server.bundle import load_bundle


async def ab(args: argparse.Namespace, held: HeldOut) -> list[dict[str, Any]]:
    plan = TypingPlan()
    counts = [int(n) for n in args.typists.split(",")]
    servers = {p: (f"--processes={p}",) for p in (1, args.processes)}
    children = {
        p: ChildServer("rnnlm", serve_args(args.bundle.resolve(), True, flags), PORT_RE,
                       start_seconds=READY_SECONDS)
        for p, flags in servers.items()
    }  # fmt: skip
    rows = []
    try:
        async with contextlib.AsyncExitStack() as stack:
            stubs = {p: await connect(stack, child) for p, child in children.items()}
            for r in range(args.rounds):
                order = list(servers) if r % 2 == 0 else list(reversed(servers))
                for n in counts:
                    for p in order:
                        t = await crowd(stubs[p], held, n, plan, children[p].cpu_seconds)
                        row = {"processes": p, "typists": n, "round": r + 1, **t,
                               "load": os.getloadavg()[0]}  # fmt: skip
                        rows.append(row)
                        print(
                            f"round {r + 1} processes {p} typists {n}: p50 {t['p50_ms']:.2f} "
                            f"p99 {t['p99_ms']:.2f} ms, server "
                            f"{t['server_cpu_ms_per_event']:.3f} ms CPU/event, "
                            f"failed {t['failed_typists']}, load {row['load']:.2f}",
                            flush=True,
                        )
    finally:
        for child in children.values():
            child.stop()
    return rows


def medians(rows: list[dict[str, Any]]) -> None:
    print("processes | typists | trials | p50 ms | p99 ms | within 10 ms | server ms CPU/event")
    print("(medians over the trials)")
    for key in sorted({(r["processes"], r["typists"]) for r in rows}):
        got = [r for r in rows if (r["processes"], r["typists"]) == key]
        p50 = statistics.median(r["p50_ms"] for r in got)
        p99 = statistics.median(r["p99_ms"] for r in got)
        cpu = statistics.median(r["server_cpu_ms_per_event"] for r in got)
        within = sum(r["within"] for r in got)
        print(
            f"{key[0]} | {key[1]} | {len(got)} | {p50:.2f} | {p99:.2f} | "
            f"{within}/{len(got)} | {cpu:.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--text", type=Path)
    parser.add_argument("--processes", type=int, default=2, help="B's --processes (A has 1)")
    parser.add_argument("--typists", default="100,150,200")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    bundle = load_bundle(args.bundle)
    content, source = corpus_text(bundle, args.text)
    kind = str(bundle.manifest.get("tokenizer", {}).get("kind"))
    held = HeldOut.of(content, source, kind, TypingPlan().k)
    machine = report.machine()
    print(f"{machine['cpu']}, {machine['usable_cores']} usable cores, load {os.getloadavg()}")
    medians(asyncio.run(ab(args, held)))


if __name__ == "__main__":
    main()
