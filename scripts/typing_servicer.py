"""The typing benchmark's typist through the real servicer's TypingSession, in-process: no gRPC.

Where `scripts/typing_inproc.py` calls the suggestion functions the servicer calls, this drives
`LanguageModelServicer.TypingSession` of a real `RnnlmServer` (the server's defaults: the
word cache, the state cache, the joint engine runs) with one session's events, a turn of the
event loop between them, and times the servicer's CPU from each event handed over to its reply
written. Against a server's CPU an event under typists (`rnnlm bench --typing`), the
difference is gRPC and the event loop's other sessions; against `typing_inproc.py`, the
servicer's own checks, encoding and reply. With `--profile N`, cProfile's N costliest
functions by their own time, and the Python calls an event (figures the machine's other load
does not move):

    PYTHONPATH=. python scripts/typing_servicer.py --bundle models/shakespeare-word \\
        --text /work/shared/data/tinyshakespeare/input.txt --lines 300 --profile 30
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from benchmarks.typing import OPEN
from rnnlm.v1 import language_model_pb2 as pb
from scripts.predict_inproc import CallContext
from scripts.typing_inproc import add_typist_arguments, held_out_typist
from server.app import RnnlmServer
from server.bundle import load_bundle
from server.config import ServerConfig


class _Context(CallContext):
    """A streaming call's context: the last reply the servicer wrote is kept."""

    def __init__(self) -> None:
        self.reply: pb.Suggestions | None = None

    async def write(self, reply: pb.Suggestions) -> None:
        self.reply = reply


async def run(args: argparse.Namespace) -> None:
    bundle = load_bundle(args.bundle)
    server = RnnlmServer(ServerConfig(models=Path(args.bundle), port=0, metrics_port=0))
    await server.start()
    held, tally, keys = held_out_typist(args, str(bundle.manifest["tokenizer"]["kind"]))
    call = _Context()
    # As the benchmark's typists ask: the fewest keys are words only, so k of them.
    selection = pb.SELECTION_FEWEST_KEYS if args.fewest_keys else pb.SELECTION_LIKELIEST
    ask = args.k if args.fewest_keys else held.ask
    profile = cProfile.Profile() if args.profile else None
    cpu = [0.0, 0]  # seconds, events (the opening event left out)

    async def events() -> AsyncIterator[pb.TypingEvent]:
        key = next(keys)
        try:
            while True:
                event = pb.TypingEvent(
                    text=key.text, partial_word=key.partial, k=ask, selection=selection
                )
                event.reset = key.kind == OPEN
                await asyncio.sleep(0)  # a turn of the event loop between keystrokes
                timed = key.kind != OPEN
                if profile is not None and timed:
                    profile.enable()
                start = time.process_time()
                yield event  # the servicer answers it before asking for the next
                if timed:
                    cpu[0] += time.process_time() - start
                    cpu[1] += 1
                if profile is not None:
                    profile.disable()
                assert call.reply is not None
                key = keys.send([p.token for p in call.reply.predictions])
        except StopIteration:
            return

    servicer: Any = server._servicer  # the servicer the server's gRPC calls
    try:
        await servicer.TypingSession(events(), call)
    finally:
        await server.stop(grace=0)
    events_timed = max(1, int(cpu[1]))
    print(
        f"{events_timed} events: the servicer's CPU {cpu[0] / events_timed * 1e3:.3f} ms an "
        f"event; savings {1 - tally.keys / max(1, tally.chars):.4f}"
    )
    if profile is not None:
        stats = pstats.Stats(profile)
        print(f"{stats.total_calls / events_timed:.0f} Python calls an event")  # type: ignore[attr-defined]
        stats.sort_stats("tottime").print_stats(args.profile)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_typist_arguments(parser, "models/shakespeare-word")
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N", help="print cProfile's N costliest"
    )
    parser.add_argument(
        "--fewest-keys",
        action="store_true",
        help="ask for the words that save the most keys, as `rnnlm bench --typing` does",
    )
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
