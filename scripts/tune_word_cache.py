"""Tune the word cache (--word-cache-weight, --word-cache-decay) on validation text.

The typing benchmark's typist (benchmarks/typing.py), one server per setting, on text that is
not the benchmark's: `--text` cut before its held-out lines (the last 5 %), so that the typist
types the last 5 % of what is left, the word model's validation lines (its 90/5/5 split) and
within the character model's validation characters (nanoGPT's last 10 %). Prints one line of
figures per setting; "off" is the server with --no-word-cache.

    python scripts/tune_word_cache.py --bundle models/shakespeare-word --text input.txt \\
        --lines 200 --weights off,0.05,0.1,0.2 --decays 1,0.99
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
from pathlib import Path
from typing import Any

import grpc

from benchmarks.process import ChildServer
from benchmarks.server_load import PORT_RE, READY_SECONDS, serve_args, wait_serving
from benchmarks.typing import (
    HELD_OUT_FRACTION,
    SELECTIONS,
    HeldOut,
    TypingPlan,
    read_text,
    single,
    summary,
)
from rnnlm.v1 import language_model_pb2 as pb
from rnnlm.v1 import language_model_pb2_grpc as pb_grpc
from server.bundle import load_bundle


def validation_text(text: str) -> str:
    """`text` without its held-out lines (the benchmark's), so that its own last 5 % are not."""
    lines = text.removesuffix("\n").split("\n")
    n = max(1, round(len(lines) * HELD_OUT_FRACTION))
    return "\n".join(lines[:-n]) + "\n"


class _Call:
    """A TypingSession call whose events all ask for the model's continuous cache."""

    def __init__(self, call: Any) -> None:
        self._call = call

    async def write(self, event: pb.TypingEvent) -> None:
        event.continuous_cache = True
        await self._call.write(event)

    async def read(self) -> Any:
        return await self._call.read()

    def cancel(self) -> None:
        self._call.cancel()


class _ContinuousCache:
    """A stub whose typing sessions ask for the continuous cache on every event."""

    def __init__(self, stub: pb_grpc.LanguageModelStub) -> None:
        self._stub = stub

    def TypingSession(self, **kwargs: Any) -> _Call:
        return _Call(self._stub.TypingSession(**kwargs))


async def one(
    bundle: Path, held: HeldOut, plan: TypingPlan, flags: list[str], continuous: bool
) -> dict:
    args = serve_args(bundle, True, tuple(flags))
    child = ChildServer("rnnlm", args, PORT_RE, start_seconds=READY_SECONDS)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{child.port}") as channel:
            await wait_serving(channel, child)
            cpu = child.cpu_seconds()
            stub: Any = pb_grpc.LanguageModelStub(channel)
            out = summary(await single(_ContinuousCache(stub) if continuous else stub, held, plan))
            after = child.cpu_seconds()
            if cpu is not None and after is not None:
                out["server_cpu_s"] = after - cpu
            return out
    finally:
        child.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--text", type=Path, required=True)
    parser.add_argument("--lines", type=int, default=200)
    parser.add_argument("--weights", default="off,0.05,0.1,0.2")
    parser.add_argument("--decays", default="1")
    parser.add_argument("--bigrams", default="0")
    parser.add_argument("--held-out", action="store_true", help="type the held-out lines")
    parser.add_argument(
        "--continuous-cache", action="store_true", help="every event asks for continuous_cache"
    )
    parser.add_argument("--flags", default="", help="more `rnnlm serve` flags")
    parser.add_argument(
        "--selection", choices=tuple(SELECTIONS), default="fewest-keys", help="shown words"
    )
    args = parser.parse_args()
    text = read_text(args.text, "--text")
    if not args.held_out:
        text = validation_text(text)
    kind = load_bundle(args.bundle).tokenizer_kind
    plan = TypingPlan.make(False, 3, args.lines, args.selection)
    held = HeldOut.of(text, str(args.text), kind, plan.k)
    extra = args.flags.split()
    for weight in args.weights.split(","):
        settings = [(d, b) for d in args.decays.split(",") for b in args.bigrams.split(",")]
        for decay, bigram in settings if weight != "off" else [("1", "0")]:
            flags = ["--no-word-cache"] if weight == "off" else ["--word-cache-weight", weight]
            flags += ["--word-cache-decay", decay, "--word-cache-bigram", bigram, *extra]
            t = asyncio.run(one(args.bundle.resolve(), held, plan, flags, args.continuous_cache))
            steps = t["model_steps"] or {}
            figures = {
                "weight": weight,
                "decay": decay,
                "bigram": bigram,
                "continuous_cache": args.continuous_cache,
                "savings": round(t["keystroke_savings"], 4),
                "top1": round(t["next_word_top1"], 3),
                "top3": round(t["next_word_top3"], 3),
                "after1": round(t["completion_after_1"], 3),
                "after2": round(t["completion_after_2"], 3),
                "steps_ext": steps.get("extending", {}).get("per_keystroke"),
                "server_cpu_s": round(t.get("server_cpu_s", 0.0), 1),
                "self_cpu_s": round(resource.getrusage(resource.RUSAGE_SELF).ru_utime, 1),
            }
            print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
