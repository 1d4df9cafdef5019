"""Time the batch sampler graph, the native sampler and the numpy `Sampler`, in process.

    PYTHONPATH=$PWD python scripts/bench_sampler.py [--model models/shakespeare-word]

The native sampler is timed on every build of its kernels this CPU runs (setup.py builds one
per x86-64 level; the first column is the one the server loads, `server.fastsample`).

Logits are the model's own next-token logits after an 8-token random prompt, so top-p sees a
real distribution (short; medians). Trials of the samplers alternate; each figure is the median over
trials of the mean time per call. "python" is the graph sampler's own time with
`session.run` answered at once (feeding, shape check, result): it must not grow with B.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import onnxruntime as ort

from server import fastsample
from server.native_sampler import NativeSampler
from server.sampler import BatchSampler, SamplingRows
from server.sampling import Sampler, SamplingParams

CASES = {
    "plain": SamplingParams(banned_ids=frozenset({0})),
    "greedy": SamplingParams(temperature=0, banned_ids=frozenset({0})),
    "top-p": SamplingParams(top_p=0.9, banned_ids=frozenset({0})),
}


def model_logits(model: Path, rows: int) -> np.ndarray:
    """`[rows, V]` float32 next-token logits of the bundle's step graph."""
    session = ort.InferenceSession(str(model / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds: dict[str, np.ndarray] = {}
    for i in session.get_inputs():
        if i.name == "tokens":
            continue
        shape = [rows if d == "batch" else d for d in i.shape]
        feeds[i.name] = np.zeros(shape, dtype=np.float32)
    vocab = session.get_outputs()[0].shape[-1]
    feeds["tokens"] = np.random.default_rng(0).integers(0, vocab, (rows, 8))
    return np.ascontiguousarray(session.run(["logits"], feeds)[0][:, -1])


def per_call(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def case(model: Path, params: SamplingParams, b: int, trials: int) -> dict[str, float]:
    """Median seconds per call: numpy, graph, native, and the graph sampler's Python share."""
    logits = model_logits(model, b)
    rows = SamplingRows.from_params([params] * b, [None] * b, logits.shape[1])
    graph, numpy_sampler = BatchSampler(), Sampler()
    natives = {_column(build): NativeSampler(graph, build) for build in fastsample.BUILDS}
    plist, history = [params] * b, [None] * b
    uniforms = np.random.default_rng(1).random(b)
    graph.sample(logits, rows)
    # The same sampler with the session answered at once: what is left is Python. One real
    # call through the sampler itself records the answer (the feeds are the sampler's own).
    python_only = BatchSampler()
    real, recorded = python_only._session, []
    python_only._session = SimpleNamespace(  # type: ignore[assignment]
        run=lambda *a: recorded.append(real.run(*a)) or recorded[-1]
    )
    python_only.sample(logits, rows)
    answer = recorded[0]
    python_only._session = SimpleNamespace(run=lambda *_: answer)  # type: ignore[assignment]
    calls = max(3, 256 // b)
    runs = {
        "numpy": lambda: numpy_sampler.sample(logits, plist, history, uniforms),
        "graph": lambda: graph.sample(logits, rows),
        **{
            name: functools.partial(native.sample, logits, rows) for name, native in natives.items()
        },
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    times["python"] = []
    for _ in range(trials):
        for name, fn in runs.items():
            times[name].append(per_call(fn, calls))
        # 200 calls in a row: the Python work itself, not the cache misses the others cause.
        times["python"].append(per_call(lambda: python_only.sample(logits, rows), 200))
    return {k: statistics.median(v) for k, v in times.items()}


def _column(build: ModuleType) -> str:
    """A build's column: "native" for the one the server loads, else its module's suffix."""
    short = build.__name__.removeprefix("server._fastsample").lstrip("_") or "baseline"
    return "native" if build is fastsample.kernels else f"native {short}"


def bench(model: Path, sizes: list[int], trials: int) -> None:
    natives = [_column(build) for build in fastsample.BUILDS]
    print(f"{'case':7} {'B':>4} {'numpy ms':>9} {'graph ms':>9}", end="")
    print("".join(f" {n + ' ms':>16}" for n in natives), f"{'python us':>10}")
    for name, params in CASES.items():
        for b in sizes:
            med = case(model, params, b, trials)
            print(f"{name:7} {b:>4} {med['numpy'] * 1e3:9.3f} {med['graph'] * 1e3:9.3f}", end="")
            print("".join(f" {med[n] * 1e3:16.3f}" for n in natives), end="")
            print(f" {med['python'] * 1e6:10.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/shakespeare-word"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--trials", type=int, default=7)
    args = parser.parse_args()
    bench(args.model, args.sizes, args.trials)


if __name__ == "__main__":
    main()
