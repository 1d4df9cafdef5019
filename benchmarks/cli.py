"""`rnnlm bench`: the server against bare onnxruntime, the gRPC floor and PyTorch eager.

One run measures, on one bundle and this machine: bare onnxruntime in-process, a gRPC echo,
PyTorch eager (with `--checkpoint`), the server in a child process with batching on and off,
and an int8 bundle (with `--int8-bundle`); then computes the targets of docs/performance.md
and writes results.json, results.md and PNG plots into `--out`. torch is imported only when
`--checkpoint` is given. See docs/performance.md for what each figure means.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import bare, echo, engine_inproc, plots, report, server_load, targets
from benchmarks import typing as typing_bench
from benchmarks.timing import BenchError
from benchmarks.workload import Plan, build_workload
from server.bundle import Bundle, BundleError, load_bundle
from server.engine import CPU, PROVIDERS, EngineError, providers_for

DEFAULT_BUNDLE = Path("models/shakespeare-word")
DEFAULT_OUT = Path("benchmarks/results")
# --quick's figures are rough: by default they go to scratch, never over the committed results.
QUICK_OUT = Path(tempfile.gettempdir()) / "rnnlm-bench-quick"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bundle",
        type=Path,
        default=DEFAULT_BUNDLE,
        help=f"the model bundle to measure (default: {DEFAULT_BUNDLE})",
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="the checkpoint the bundle was exported from: adds PyTorch eager (imports torch)",
    )
    parser.add_argument(
        "--int8-bundle",
        type=Path,
        default=None,
        help="the same model exported with --quantize int8: adds fp32 vs int8",
    )
    parser.add_argument(
        "--corpus",
        type=Path,
        default=None,
        help="text to cut requests from (default: the bundle's training corpus "
        "if readable here, else random vocabulary words)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"directory for results.md, results.json and plots (default: {DEFAULT_OUT}, "
        f"with --quick {QUICK_OUT})",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small counts and short trials (seconds, for smoke tests); the figures are rough",
    )
    parser.add_argument(
        "--trials",
        type=int,
        default=None,
        help="repetitions of every measurement (default: 3, --quick 2)",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=None,
        help="seconds of load per Generate trial (default: 3, --quick 0.5)",
    )
    parser.add_argument(
        "--score-tokens",
        type=int,
        default=None,
        help="length of the scored document in tokens (default: 100000, --quick 2000)",
    )
    parser.add_argument(
        "--provider",
        choices=PROVIDERS,
        default="cpu",
        help="onnxruntime execution provider for bare onnxruntime, the engine and the server "
        "(default: cpu; cuda needs onnxruntime-gpu and a GPU, and leaves out --checkpoint)",
    )
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="an extra `rnnlm serve` flag, e.g. --server-arg=--max-queue-wait-ms=1 "
        "(repeatable; RNNLM_* variables are not passed to the server)",
    )
    _add_typing_arguments(parser)


def _add_typing_arguments(parser: argparse.ArgumentParser) -> None:
    typing = parser.add_argument_group("the typing benchmark (docs/typing.md)")
    typing.add_argument(
        "--typing",
        action="store_true",
        help="run only the typing benchmark (simulated typists on TypingSession); "
        "writes typing.md and typing.json",
    )
    typing.add_argument(
        "--text",
        type=Path,
        default=None,
        help="the corpus whose last 5%% of lines the typists type (default: the bundle's "
        "training corpus, if readable here; without either, the full run skips typing)",
    )
    typing.add_argument(
        "--suggestions",
        type=int,
        default=typing_bench.DEFAULT_K,
        help=f"suggestions shown per keystroke (default: {typing_bench.DEFAULT_K})",
    )
    typing.add_argument(
        "--typing-selection",
        choices=tuple(typing_bench.SELECTIONS),
        default="fewest-keys",
        help="the words the typists are shown (TypingEvent.selection); the single typist's "
        "savings are measured with the other too (default: fewest-keys)",
    )
    typing.add_argument(
        "--typing-lines",
        type=int,
        default=None,
        help="held-out lines the single typist types (default: 120, --quick 8)",
    )


def run(args: argparse.Namespace) -> int:
    if args.out is None:
        args.out = QUICK_OUT if args.quick else DEFAULT_OUT
    out: Path = args.out
    try:
        out.mkdir(parents=True, exist_ok=True)  # before minutes of measuring, not after
    except OSError as e:
        print(f"rnnlm bench: --out {out}: cannot create the directory ({e})", file=sys.stderr)
        return 2
    if args.typing:
        unused = [f"--{o}" for o in ("checkpoint", "int8-bundle", "corpus") if _given(args, o)]
        if unused:
            print(
                f"rnnlm bench: --typing runs only the typing benchmark, which does not use "
                f"{', '.join(unused)}: leave {'them' if len(unused) > 1 else 'it'} out",
                file=sys.stderr,
            )
            return 2
        return run_typing(args, required=True)
    try:
        results, found = measure(args)
    except (BenchError, BundleError) as e:
        print(f"rnnlm bench: {e}", file=sys.stderr)
        return 2
    try:
        report.write_json(results, found, out / "results.json")
        (out / "results.md").write_text(report.markdown(results, found) + "\n", encoding="utf-8")
        written = plots.write(results, out)
    except OSError as e:
        print(f"rnnlm bench: --out {out}: cannot write the results ({e})", file=sys.stderr)
        return 2
    print()
    for t in found:
        value = "—" if t.value is None else f"{t.value:.3g}"
        print(f"{t.status:>4}  {value:>8} {t.op} {t.threshold:<5g} {t.rule}")
    print(
        f"\nwrote {out / 'results.md'}, {out / 'results.json'}" + "".join(f", {p}" for p in written)
    )
    if not written:
        print("(no plots: matplotlib is not installed; pip install matplotlib)")
    return run_typing(args, required=False)


def _given(args: argparse.Namespace, option: str) -> bool:
    return getattr(args, option.replace("-", "_")) is not None


def run_typing(args: argparse.Namespace, required: bool) -> int:
    """The typing benchmark; without text to type, an error if `required`, else skipped."""
    clock = time.perf_counter()

    def say(what: str) -> None:
        print(f"[{time.perf_counter() - clock:6.1f} s] {what}", file=sys.stderr, flush=True)

    try:
        plan = typing_bench.TypingPlan.make(
            args.quick, args.suggestions, args.typing_lines, args.typing_selection
        )
        command = _command(args, typing=True)
        results = typing_bench.run(
            args.bundle, args.text, plan, (args.provider, *args.server_arg), command, say
        )
    except typing_bench.NoText as e:
        if required:
            print(f"rnnlm bench: {e}", file=sys.stderr)
            return 2
        print(f"typing benchmark skipped: {e}")
        return 0
    except BenchError as e:
        print(f"rnnlm bench: {e}", file=sys.stderr)
        return 2
    try:
        written = typing_bench.write(results, args.out)
    except OSError as e:
        print(f"rnnlm bench: --out {args.out}: cannot write the results ({e})", file=sys.stderr)
        return 2
    print()
    for t in results["targets"]:
        value = "—" if t["value"] is None else f"{t['value']:.3g}"
        print(f"{t['status']:>4}  {value:>8} {t['op']} {t['threshold']:<5g} {t['target']}")
    print("\nwrote " + ", ".join(str(p) for p in written))
    return 0


def _open(path: Path, option: str) -> Bundle:
    try:
        return load_bundle(path)
    except BundleError as e:
        raise BenchError(f"{option}: {e}") from e


def measure(args: argparse.Namespace) -> tuple[dict[str, Any], list[targets.Target]]:
    """Run every measurement the options ask for; the results and the targets."""
    plan = Plan.make(
        quick=args.quick,
        trials=args.trials,
        duration=args.duration,
        score_tokens=args.score_tokens,
        server_args=tuple(args.server_arg),
        provider=args.provider,
    )
    try:
        on_gpu = providers_for(plan.provider)[0] != CPU
    except EngineError as e:
        raise BenchError(f"--provider {plan.provider}: {e}") from e
    if args.checkpoint is not None and on_gpu:
        raise BenchError(
            f"--checkpoint measures PyTorch eager on the CPU, which is no comparison for "
            f"--provider {plan.provider}: leave out one of them"
        )
    bundle = _open(args.bundle, "--bundle")
    int8_bundle = _open(args.int8_bundle, "--int8-bundle") if args.int8_bundle else None
    if args.checkpoint is not None and not args.checkpoint.is_dir():
        raise BenchError(f"--checkpoint {args.checkpoint}: not a directory")
    workload = build_workload(bundle, plan, args.corpus)
    a = bundle.manifest.get("architecture", {})
    results: dict[str, Any] = {
        "machine": report.machine(),
        "run": {
            "command": _command(args),
            "quick": bool(args.quick),  # rough figures: the report and the plots say so
            "bundle": {
                "path": str(args.bundle),
                "name": bundle.name,
                "version": bundle.version,
                "summary": f"{bundle.name} v{bundle.version}, {a.get('cell')} "
                f"{a.get('layers')}x{a.get('hidden')}, embedding {a.get('embedding')}, "
                f"vocabulary {bundle.vocab_size}, {bundle.precision}",
            },
            "workload": {"source": workload.source, "stream_tokens": len(workload.ids)},
            "plan": dataclasses.asdict(plan),
        },
    }
    clock = time.perf_counter()

    def say(what: str) -> None:
        print(f"[{time.perf_counter() - clock:6.1f} s] {what}", file=sys.stderr, flush=True)

    say(f"bare onnxruntime on {bundle.name}, trials: {plan.trials}")
    results["bare"] = bare.run(bundle, workload, plan)
    say(f"the engine in-process, Generate at {plan.engine_streams} streams")
    results["engine"] = engine_inproc.run(bundle, workload, plan)
    if args.checkpoint is not None:
        say("PyTorch eager, oneDNN on and off")
        from benchmarks import torch_eager  # imports torch

        results["torch"] = torch_eager.run(args.checkpoint, bundle, workload, plan)
    if int8_bundle is not None:
        say("int8 steps")
        results["int8"] = bare.int8(int8_bundle, bundle, workload, plan)

    async def network() -> None:
        say("gRPC echo")
        results["echo"] = await echo.measure(plan.trials, plan.echo_calls, plan.budget_s)
        say("gRPC streaming echo (Generate's transport)")
        results["echo_stream"] = await echo.measure_stream(plan.trials, plan.echo_stream_s)
        say("the server, batching on then off")
        results["server"] = await server_load.run(args.bundle.resolve(), workload, plan, say)

    asyncio.run(network())
    results["machine"]["load_average_at_end"] = report.load_average()
    say("done")
    results["diagnostics"] = [dataclasses.asdict(d) for d in targets.diagnostics(results)]
    return results, targets.compute(results)


def _command(args: argparse.Namespace, typing: bool = False) -> str:
    """The `rnnlm bench` command line that repeats this run (every option given); with
    `typing`, the one that repeats its typing benchmark alone."""
    words = ["rnnlm", "bench", "--bundle", str(args.bundle)]
    if typing:
        words += ["--typing", "--suggestions", str(args.suggestions)]
        words += ["--typing-selection", args.typing_selection]
        options: tuple[str, ...] = ("text", "typing_lines")
    else:
        options = ("checkpoint", "int8_bundle", "corpus", "trials", "duration", "score_tokens")
    for option in options:
        value = getattr(args, option)
        if value is not None:
            words += ["--" + option.replace("_", "-"), str(value)]
    if args.quick:
        words.append("--quick")
    if args.provider != "cpu":
        words += ["--provider", args.provider]
    words += [f"--server-arg={a}" for a in args.server_arg]
    return shlex.join([*words, "--out", str(args.out)])
