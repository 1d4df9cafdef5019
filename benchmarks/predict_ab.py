"""PredictNext at concurrency 1 against servers of several checkouts, rounds alternating.

    python -m benchmarks.predict_ab --checkout /tmp/parent --checkout . --rounds 5
    python -m benchmarks.predict_ab --with "" --with "--front-end native" --rounds 5
    python -m benchmarks.predict_ab --tls-ca ca.pem \
        --with "--front-end native --tls-cert s.pem --tls-key s.key" \
        --with "--front-end python --tls-cert s.pem --tls-key s.key"

starts one `rnnlm serve` per `--checkout` (the code of that directory: its PYTHONPATH, with
PYTHONSAFEPATH so that this checkout's directory does not come first), and one per `--with`
(this checkout, with those flags), all on the same bundle. With `--tls-ca`, the client speaks
TLS to the servers, trusting that CA (their certificates must name 127.0.0.1); the floor's
echo stays in plaintext.
Each round measures the floor of `rnnlm bench`'s PredictNext target here (bare batch-1 steps
after a 1 ms idle gap, and the gRPC echo), then each server in turn with the bench's own loop
(`server_load.predict_c1`: sentences grown a token a call), reading the server's CPU time
from /proc over the calls. It prints, per round and as medians over the rounds, each server's
ratio p50 / (idle step p50 + echo p50), its p50 and its CPU per call, with the load average.

What it is for: deciding whether a change to a PredictNext's path moves the target. One bench
run per commit puts minutes between the figures, and on a shared machine that moves them more
than the change does.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import grpc

from benchmarks import bare, echo
from benchmarks.process import ChildServer
from benchmarks.server_load import PORT_RE, READY_SECONDS, predict_c1, serve_args, wait_serving
from benchmarks.timing import BenchError
from benchmarks.workload import Plan, Workload, build_workload
from rnnlm.v1 import language_model_pb2_grpc as pb_grpc
from server.bundle import Bundle, BundleError, load_bundle


@dataclass(frozen=True)
class Round:
    """One server's figures in one round, beside that round's floor."""

    floor_ms: float  # bare batch-1 step after an idle gap, p50, + echo p50
    p50_ms: float
    cpu_ms: float | None  # server CPU per call (None without /proc)

    @property
    def ratio(self) -> float:
        return self.p50_ms / self.floor_ms


@dataclass(frozen=True)
class Server:
    """A server to measure: the checkout whose code it runs, and flags of its own."""

    checkout: Path
    flags: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return " ".join((str(self.checkout), *self.flags))


def _server(server: Server, bundle_dir: Path, plan: Plan) -> ChildServer:
    env = {"PYTHONPATH": str(server.checkout), "PYTHONSAFEPATH": "1"}
    args = serve_args(bundle_dir, True, plan.server_args + server.flags, plan.provider)
    return ChildServer("rnnlm", args, PORT_RE, start_seconds=READY_SECONDS, env=env)


async def _floor(bundle: Bundle, workload: Workload, plan: Plan) -> float:
    step = bare.session(bundle, "step", plan)
    gap = bare.IDLE_GAP_S
    idle = [
        bare.step_trial(step, bundle, workload.ids, 1, plan.step_calls, plan.budget_s, gap)
        for _ in range(plan.trials)
    ]
    echoed = await echo.measure(plan.trials, plan.echo_calls, plan.budget_s)
    return float(bare.over_trials(idle)["p50_ms"]) + float(echoed["p50_ms"])


def _channel(port: int, tls_ca: Path | None) -> grpc.aio.Channel:
    target = f"127.0.0.1:{port}"
    if tls_ca is None:
        return grpc.aio.insecure_channel(target)
    return grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(tls_ca.read_bytes()))


async def compare(
    bundle_dir: Path,
    servers: list[Server],
    rounds: int,
    plan: Plan,
    tls_ca: Path | None = None,
) -> list[list[Round]]:
    """Per server, its figures in each round (every server measured once a round)."""
    bundle = load_bundle(bundle_dir)
    calls = plan.trials * plan.predict_calls * rounds * len(servers)
    workload = build_workload(bundle, replace(plan, predict_calls=calls), None)
    children: list[ChildServer] = []
    channels: list[grpc.aio.Channel] = []
    try:
        for server in servers:
            children.append(_server(server, bundle_dir, plan))
        for child in children:
            channels.append(_channel(child.port, tls_ca))
            await wait_serving(channels[-1], child)
        results: list[list[Round]] = [[] for _ in servers]
        for _ in range(rounds):
            floor = await _floor(bundle, workload, plan)
            for child, channel, done in zip(children, channels, results, strict=True):
                before = child.cpu_seconds()
                figures = await predict_c1(pb_grpc.LanguageModelStub(channel), workload, plan)
                after = child.cpu_seconds()
                n = sum(t["n"] for t in figures["trials"])
                cpu = None if before is None or after is None else 1e3 * (after - before) / n
                done.append(Round(floor, float(figures["p50_ms"]), cpu))
        return results
    finally:
        for channel in channels:
            await channel.close()
        for child in children:
            child.stop()


def _row(label: str, figures: list[Round]) -> str:
    ratios = [r.ratio for r in figures]
    cpus = [r.cpu_ms for r in figures if r.cpu_ms is not None]
    cpu = f"  server CPU {statistics.median(cpus):.3f} ms a call" if cpus else ""
    return (
        f"{label}: ratio median {statistics.median(ratios):.2f} "
        f"(rounds {', '.join(f'{x:.2f}' for x in ratios)}), "
        f"p50 median {statistics.median(r.p50_ms for r in figures):.3f} ms{cpu}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.predict_ab",
        description="PredictNext at concurrency 1 against servers of several checkouts, "
        "rounds alternating, beside the bench's floor",
    )
    parser.add_argument(
        "--checkout",
        action="append",
        type=Path,
        metavar="DIR",
        help="a checkout whose server to measure (repeatable; default: this one)",
    )
    parser.add_argument(
        "--with",
        dest="flags",
        action="append",
        metavar="FLAGS",
        help='a server of this checkout with these `rnnlm serve` flags (repeatable; "" for none)',
    )
    parser.add_argument("--bundle", type=Path, default=Path("models/shakespeare-word"))
    parser.add_argument("--rounds", type=int, default=3, help="(default 3)")
    parser.add_argument("--quick", action="store_true", help="the bench's --quick counts")
    parser.add_argument(
        "--tls-ca", type=Path, metavar="FILE", help="speak TLS to the servers, trusting this CA"
    )
    args = parser.parse_args(argv)
    here = Path(__file__).resolve().parents[1]
    servers = [Server(c.resolve()) for c in args.checkout or []]
    servers += [Server(here, tuple(f.split())) for f in args.flags or []]
    servers = servers or [Server(here)]
    for s in servers:
        if not (s.checkout / "server" / "servicer.py").is_file():
            parser.error(f"--checkout {s.checkout}: not a checkout of this project")
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, not {args.rounds}")
    try:
        plan = Plan.make(quick=args.quick)
        results = asyncio.run(
            compare(args.bundle.resolve(), servers, args.rounds, plan, args.tls_ca)
        )
    except (BenchError, BundleError) as e:
        print(f"predict_ab: {e}", file=sys.stderr)
        return 2
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"PredictNext p50 / (bare step after a 1 ms idle gap + echo); load average {load}")
    for server, figures in zip(servers, results, strict=True):
        print(_row(server.label, figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
