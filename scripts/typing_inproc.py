"""The typing benchmark's typist, in-process: no gRPC, no time budget, one JSON line out.

Drives `benchmarks.typing.typist` through `server.typing.predict_words` on the real engine of a
character or BPE bundle (`predict_tokens` for a word bundle, asking as many suggestions as the
benchmark does), as a TypingSession would (the session's text and `Memory` kept across
keystrokes), with `--word-search-ms` out of the way, so the savings and the model steps do not
move with the machine's load. Reports them with the process's CPU time per event (user +
system, from `resource`), per kind of keystroke; with `--calls`, the Python calls an event
(cProfile: a figure no other load moves) and a digest of every event's suggestions, to show
that a change kept them. For comparing search settings (docs/typing.md):

    PYTHONPATH=. python scripts/typing_inproc.py --bundle models/shakespeare-char \\
        --text /work/shared/data/tinyshakespeare/input.txt --lines 120 --width 6

A bundle without its lexicon.txt (a copy, with the manifest's `lexicon` section removed)
measures the search without one.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import hashlib
import json
import pstats
import resource
import time
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.typing import OPEN, HeldOut, Key, Tally, TypingPlan, read_text, typist
from server.bundle import load_bundle
from server.engine import Engine, EngineConfig
from server.text import TextCodec
from server.typing import Ask, Memory, Predicted, predict_tokens, predict_words, searched
from server.word_cache import WordCacheSettings
from server.word_search import search_context
from server.words import FOLD_DEFAULT, Filters, Matcher, WordSettings


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run(args: argparse.Namespace) -> dict[str, Any]:
    bundle = load_bundle(args.bundle)
    codec = TextCodec(bundle)
    settings = WordSettings(width=args.width, keep=args.keep, budget_ms=1e9)
    held, tally, keys = held_out_typist(args, codec.kind)
    engine = Engine(bundle, EngineConfig())
    await engine.start()
    runs = _count_runs(engine) if args.runs else None
    steps: dict[str, list[int]] = {}
    cpu: dict[str, float] = {}
    shown: list[list[tuple[str, float]]] = []
    profile = cProfile.Profile() if args.calls else None
    text, memory = "", Memory()
    fewest = args.fewest_keys
    asked = TypingPlan(k=args.k, selection="fewest-keys" if fewest else "likeliest").asked(held)
    try:
        key = next(keys)
        while True:
            text = key.text if key.kind == OPEN else text + key.text
            if profile is not None:
                profile.enable()
            start = _cpu_seconds()
            ask = _ask(codec, text, key.partial, memory, asked, settings, args.word_cache, fewest)
            predicted = await _suggest(engine, text, ask)
            cpu[key.kind] = cpu.get(key.kind, 0.0) + _cpu_seconds() - start
            if profile is not None:
                profile.disable()
            steps.setdefault(key.kind, []).append(predicted.steps)
            shown.append([(s.text, round(s.probability, 9)) for s in predicted.suggestions])
            key = keys.send([s.text for s in predicted.suggestions])
    except StopIteration:
        pass
    finally:
        await engine.close()
    out = _report(tally, steps, cpu)
    if runs is not None:
        events = len(shown)
        out["onnxruntime"] = {
            "runs_per_event": round(runs.runs / events, 2),
            "rows_per_event": round(runs.rows / events, 2),
            "cpu_ms_per_event": round(1000 * runs.cpu_s / events, 3),
            "us_per_row": round(1e6 * runs.cpu_s / max(runs.rows, 1), 1),
        }
    if profile is not None:
        out["python_calls_per_event"] = round(pstats.Stats(profile).total_calls / len(shown))
        out["suggestions_digest"] = hashlib.sha256(json.dumps(shown).encode()).hexdigest()[:16]
    return out


def _ask(
    codec: TextCodec,
    text: str,
    partial: str,
    memory: Memory,
    k: int,
    settings: WordSettings,
    word_cache: bool,
    fewest: bool,
) -> Ask:
    """One event's ask, as the servicer makes it (the word cache kept in `memory`)."""
    mixer = WordCacheSettings().mixer(word_cache, memory.word_cache, text, codec.kind)
    memory.word_cache = mixer.cache if mixer is not None else None
    match = Matcher(partial, FOLD_DEFAULT[codec.kind])
    return Ask(
        codec, k, match, Filters(), settings, memory, mixer=mixer, join=False, fewest_keys=fewest
    )


async def _suggest(engine: Engine, text: str, ask: Ask) -> Predicted:
    """One event's suggestions, as the servicer makes them for the bundle's kind."""
    codec = ask.codec
    if not searched(codec):
        return await predict_tokens(engine, codec.encode(text), ask)
    context, after_space = search_context(codec, text)
    return await predict_words(engine, codec.encode(context), after_space, ask)


@dataclass
class _Runs:
    """The engine's onnxruntime runs: how many, their rows (each row's tokens counted once
    per token: a 1 x 6 feed is 6), and this thread's CPU in them."""

    runs: int = 0
    rows: int = 0
    cpu_s: float = 0.0


def _count_runs(engine: Engine) -> _Runs:
    """Count `engine`'s runs from here on (its runner's graphs, wrapped on the instance)."""
    counts = _Runs()
    runner = engine.runner
    for name in ("step", "prefill", "score"):
        graph = getattr(runner, name)

        def counted(tokens: Any, *rest: Any, _graph: Any = graph) -> Any:
            start = time.thread_time()
            try:
                return _graph(tokens, *rest)
            finally:
                counts.cpu_s += time.thread_time() - start
                counts.runs += 1
                counts.rows += tokens.size

        setattr(runner, name, counted)
    return counts


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


def add_typist_arguments(parser: argparse.ArgumentParser, bundle: str) -> None:
    """The typist's options (`held_out_typist` reads them), `bundle` the default bundle."""
    parser.add_argument("--bundle", default=bundle)
    parser.add_argument(
        "--text", required=True, help="the corpus whose last 5%% of lines are typed"
    )
    parser.add_argument("--lines", type=int, default=120, help="held-out lines typed")
    parser.add_argument("-k", type=int, default=3, help="suggestions shown")


def held_out_typist(
    args: argparse.Namespace, kind: str
) -> tuple[HeldOut, Tally, Generator[Key, list[str], None]]:
    """The held-out text of `args.text`, and the benchmark's typist over its first
    `args.lines` lines with `args.k` suggestions (tallying into the returned `Tally`)."""
    held = HeldOut.of(read_text(Path(args.text), "--text"), args.text, kind, args.k)
    context, passage = held.passage(0, args.lines)
    tally = Tally()
    return held, tally, typist(context, passage, args.k, tally, held.words)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_typist_arguments(parser, "models/shakespeare-char")
    parser.add_argument("--width", type=int, default=WordSettings.width)
    parser.add_argument("--keep", type=int, default=WordSettings.keep)
    parser.add_argument(
        "--word-cache", action="store_true", help="mix in the word cache (the server's default)"
    )
    parser.add_argument(
        "--fewest-keys",
        action="store_true",
        help="suggest the words that save the most keys (Selection FEWEST_KEYS)",
    )
    parser.add_argument(
        "--runs",
        action="store_true",
        help="count the engine's onnxruntime runs and rows an event, and their CPU",
    )
    parser.add_argument(
        "--calls",
        action="store_true",
        help="count the Python calls an event (cProfile) and digest the suggestions",
    )
    print(json.dumps(asyncio.run(run(parser.parse_args()))))


if __name__ == "__main__":
    main()
