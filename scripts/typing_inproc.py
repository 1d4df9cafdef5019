"""The typing benchmark's typist, in-process: no gRPC, no time budget, one JSON line out.

Drives `benchmarks.typing.typist` through `server.typing.predict_words` on the real engine of a
character or BPE bundle, as a TypingSession would (the session's text and `Memory` kept across
keystrokes), with `--word-search-ms` out of the way, so the savings and the model steps do not
move with the machine's load. Reports them with the process's CPU time per event (user +
system, from `resource`), per kind of keystroke. For comparing search settings (docs/typing.md):

    PYTHONPATH=. python scripts/typing_inproc.py --bundle models/shakespeare-char \\
        --text /work/shared/data/tinyshakespeare/input.txt --lines 120 --width 6

A bundle without its lexicon.txt (a copy, with the manifest's `lexicon` section removed)
measures the search without one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
from pathlib import Path
from typing import Any

from benchmarks.typing import OPEN, HeldOut, Tally, read_text, typist
from server.bundle import load_bundle
from server.engine import Engine, EngineConfig
from server.text import TextCodec
from server.typing import Ask, Memory, predict_words
from server.word_cache import WordCacheSettings
from server.words import Filters, Matcher, WordSettings, search_context


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run(args: argparse.Namespace) -> dict[str, Any]:
    bundle = load_bundle(args.bundle)
    codec = TextCodec(bundle)
    settings = WordSettings(width=args.width, keep=args.keep, budget_ms=1e9)
    held = HeldOut.of(read_text(Path(args.text), "--text"), args.text, codec.kind, args.k)
    context, passage = held.passage(0, args.lines)
    tally = Tally()
    keys = typist(context, passage, args.k, tally, held.words)
    engine = Engine(bundle, EngineConfig())
    await engine.start()
    steps: dict[str, list[int]] = {}
    cpu: dict[str, float] = {}
    text, memory = "", Memory()
    try:
        key = next(keys)
        while True:
            text = key.text if key.kind == OPEN else text + key.text
            start = _cpu_seconds()
            searched, after_space = search_context(codec, text)
            mixer = WordCacheSettings().mixer(args.word_cache, memory.word_cache, text, codec.kind)
            memory.word_cache = mixer.cache if mixer is not None else None
            match = Matcher(key.partial, True)
            ask = Ask(codec, args.k, match, Filters(), settings, memory, mixer=mixer)
            predicted = await predict_words(engine, codec.encode(searched), after_space, ask)
            cpu[key.kind] = cpu.get(key.kind, 0.0) + _cpu_seconds() - start
            steps.setdefault(key.kind, []).append(predicted.steps)
            key = keys.send([s.text for s in predicted.suggestions])
    except StopIteration:
        pass
    finally:
        await engine.close()
    return _report(tally, steps, cpu)


def _report(tally: Tally, steps: dict[str, list[int]], cpu: dict[str, float]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "savings": round(1 - tally.keys / tally.chars, 4),
        "chars": tally.chars,
        "letters": tally.letters,
        "separators": tally.separators,
        "taps": tally.taps,
        "top1": tally.top1,
        "top3": tally.top3,
        "words": tally.words,
    }
    for kind, counts in steps.items():
        out[kind] = {
            "events": len(counts),
            "steps_per_event": round(sum(counts) / len(counts), 2),
            "searched": sum(1 for n in counts if n),
            "cpu_ms_per_event": round(1000 * cpu[kind] / len(counts), 2),
        }
    events = sum(len(c) for c in steps.values())
    out["cpu_ms_per_event"] = round(1000 * sum(cpu.values()) / events, 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", default="models/shakespeare-char")
    parser.add_argument(
        "--text", required=True, help="the corpus whose last 5%% of lines are typed"
    )
    parser.add_argument("--lines", type=int, default=120, help="held-out lines typed")
    parser.add_argument("-k", type=int, default=3, help="suggestions shown")
    parser.add_argument("--width", type=int, default=WordSettings.width)
    parser.add_argument("--keep", type=int, default=WordSettings.keep)
    parser.add_argument(
        "--word-cache", action="store_true", help="mix in the word cache (the server's default)"
    )
    print(json.dumps(asyncio.run(run(parser.parse_args()))))


if __name__ == "__main__":
    main()
