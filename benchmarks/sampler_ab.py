"""The engine's samplers side by side: CPU per generated token and tokens/s in-process.

    python -m benchmarks.sampler_ab [--bundle models/shakespeare-word] [--trials 3]
        [--samplers native,graph,numpy]

64 streams of 64-token generations (the load of `benchmarks.engine_inproc`), trials of each
sampler (`EngineConfig.sampler`) alternating so all see like machine conditions. CPU time
is the process's, which a shared machine distorts least; medians are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

from benchmarks.engine_inproc import _load
from server.bundle import Bundle, load_bundle
from server.engine import Engine
from server.engine_config import EngineConfig


async def _trial(bundle: Bundle, sampler: str, streams: int, seconds: float) -> tuple[float, float]:
    """(CPU microseconds per token, tokens per second) of one trial after a 1 s warm-up."""
    engine = Engine(bundle, EngineConfig(sampler=sampler))
    await engine.start()
    try:
        await _load(engine, bundle, streams, 1.0, 64, seed=0)
        cpu, wall = time.process_time(), time.perf_counter()
        tokens = await _load(engine, bundle, streams, seconds, 64, seed=1)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        await engine.close()
    return cpu / tokens * 1e6, tokens / wall


async def _main(args: argparse.Namespace) -> None:
    bundle = load_bundle(args.bundle)
    results: dict[str, list[tuple[float, float]]] = {s: [] for s in args.samplers.split(",")}
    for _ in range(args.trials):
        for sampler, trials in results.items():
            trials.append(await _trial(bundle, sampler, args.streams, args.seconds))
    for sampler, trials in results.items():
        cpu = statistics.median(t[0] for t in trials)
        rate = statistics.median(t[1] for t in trials)
        n = len(trials)
        print(f"{sampler:6} {cpu:7.1f} us CPU a token  {rate:8.0f} tokens/s  ({n} trials)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, default=Path("models/shakespeare-word"))
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--samplers", default="native,graph,numpy", help="comma-separated")
    asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
