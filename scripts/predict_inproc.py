"""PredictNext at concurrency 1 through the servicer in this process, without gRPC: where the
server's time goes on `rnnlm bench`'s PredictNext target, stage by stage.

The bench's pattern (`benchmarks.server_load.predict_c1`: sentences of the corpus grown one
token a call, k = 5, each call one step) sent straight to `LanguageModelServicer.PredictNext`
of a real `RnnlmServer` on the bundle, with a gap before each call: sleeping 1 ms, as the
bench's floor (a bare step after a 1 ms idle gap), or spinning 1 ms, which keeps the core
awake. Prints the median wall time of a call, its mean CPU, and the mean time each stage
took (each stage timed by a wrapper, which adds about a microsecond a stage; stages nest, so
they do not add up):

    PYTHONPATH=. python scripts/predict_inproc.py --bundle models/shakespeare-word --calls 3000
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib
import inspect
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.server_load import PREDICT_K, SENTENCE_TOKENS, _prefixes
from benchmarks.workload import Plan, build_workload
from rnnlm.v1 import language_model_pb2 as pb
from server.app import RnnlmServer
from server.bundle import load_bundle
from server.config import ServerConfig

# (module, attribute path, label): the stages timed, outermost first.
STAGES = [
    ("server.servicer", "LanguageModelServicer.PredictNext", "the call"),
    ("server.servicer", "LanguageModelServicer._context_ids", "encode the context"),
    ("server.servicer", "LanguageModelServicer._suggest", "suggest"),
    ("server.engine", "Engine.next_token_logprobs", "  next-token log-probs"),
    ("server.engine", "Engine._tokens", "    check the ids"),
    ("server.engine", "Engine._start", "    find the cached prefix"),
    ("server.scheduler", "Scheduler.run_inline_many", "    run inline"),
    ("server.scheduler", "step", "      step()"),
    ("server.runner", "Sessions.step", "        onnxruntime's run"),
    ("server.step", "_finish", "        log-softmax, prefixes"),
    ("server.scheduler", "Scheduler._store", "      cache the state"),
    ("server.typing", "vocab_words", "  the model's top words"),
    ("server.typing", "oov_words.after", "  unknown words"),
    ("server.typing", "choose", "  choose"),
    ("server.servicer", "suggested", "the reply"),
]


class CallContext:
    """What the servicer asks of a gRPC context on a call that succeeds (a unary call's; a
    streaming call's adds `write`: scripts/typing_servicer.py)."""

    def cancelled(self) -> bool:
        return False

    def time_remaining(self) -> float | None:
        return None


def _timed(stages: list[tuple[str, str, str]]) -> tuple[dict[str, float], Counter[str]]:
    """Wrap each stage to add its wall time to the first dict and its calls to the counter."""
    seconds: dict[str, float] = defaultdict(float)
    calls: Counter[str] = Counter()
    for module, path, label in stages:
        owner: Any = importlib.import_module(module)
        *parents, name = path.split(".")
        for part in parents:
            owner = getattr(owner, part)
        setattr(owner, name, _wrap(getattr(owner, name), label, seconds, calls))
    return seconds, calls


def _wrap(
    f: Callable[..., Any], label: str, seconds: dict[str, float], calls: Counter[str]
) -> Callable[..., Any]:
    if inspect.iscoroutinefunction(f):

        @functools.wraps(f)
        async def timed_async(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return await f(*args, **kwargs)
            finally:
                seconds[label] += time.perf_counter() - start
                calls[label] += 1

        return timed_async

    @functools.wraps(f)
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return f(*args, **kwargs)
        finally:
            seconds[label] += time.perf_counter() - start
            calls[label] += 1

    return timed


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


async def run(bundle_dir: Path, calls: int, gap: str) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds of each timed call."""
    server = RnnlmServer(ServerConfig(models=bundle_dir, port=0, metrics_port=0))
    await server.start()
    servicer, context = server._servicer, CallContext()
    workload = build_workload(load_bundle(bundle_dir), Plan(), None)
    walls: list[float] = []
    cpus: list[float] = []
    try:
        while len(walls) < calls:
            _, texts = _prefixes(workload, 1, SENTENCE_TOKENS - 1)
            await servicer.PredictNext(
                pb.PredictNextRequest(context=texts[0], k=PREDICT_K), context
            )
            for text in texts[1:]:
                request = pb.PredictNextRequest(context=text, k=PREDICT_K)
                if gap == "sleep":
                    await asyncio.sleep(0.001)
                else:
                    _spin(0.001)
                wall, cpu = time.perf_counter(), time.process_time()
                await servicer.PredictNext(request, context)
                walls.append(time.perf_counter() - wall)
                cpus.append(time.process_time() - cpu)
    finally:
        await server.stop(grace=0)
    return walls, cpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=Path("models/shakespeare-word"))
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--gap", choices=["sleep", "spin"], default="sleep")
    parser.add_argument("--no-stages", action="store_true", help="time the calls only")
    args = parser.parse_args()
    seconds, counts = ({}, Counter()) if args.no_stages else _timed(STAGES)
    walls, cpus = asyncio.run(run(args.bundle, args.calls, args.gap))
    n = len(walls)
    print(
        f"{n} calls after a 1 ms {args.gap}: wall p50 {statistics.median(walls) * 1e6:.0f} us, "
        f"CPU mean {statistics.mean(cpus) * 1e6:.0f} us"
    )
    untimed = counts["the call"] - n  # each sentence's first, untimed call
    for _, _, label in STAGES if seconds else []:
        share = counts[label] / counts["the call"]
        print(f"  {seconds[label] / (n + untimed) * 1e6:7.1f} us  ({share:.2f} a call)  {label}")


if __name__ == "__main__":
    main()
