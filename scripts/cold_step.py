"""A bare batch-1 step of a bundle's step graph, back to back and after gaps of other work.

Why a typing server's steps cost more than a loop of steps does: between two keystrokes the
weights leave the cache. One onnxruntime session (one thread), 300 steps per gap, two rounds;
prints the median step time after each kind of gap (docs/performance.md, "The default word
bundle in int8"):

    PYTHONPATH=. python scripts/cold_step.py --bundle models/shakespeare-word

With `--batches`, instead: a back-to-back step's CPU (this thread's) at each batch size, and
a row's share of it: what a word search's rounds of a few rows cost (docs/typing.md):

    PYTHONPATH=. python scripts/cold_step.py --bundle models/shakespeare-char \\
        --batches 1 2 4 6 12 24 48
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from server.bundle import load_bundle

STEPS = 300
_JUNK = np.ones(64 * 2**20 // 8)  # 64 MB to read between steps


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


GAPS: dict[str, Callable[[], object]] = {
    "back to back": lambda: None,
    "after sleeping 1 ms": lambda: time.sleep(0.001),
    "after spinning 1 ms": lambda: _spin(0.001),
    "after reading 16 MB": lambda: _JUNK[: 2 * 2**20].sum(),
    "after reading 64 MB": lambda: _JUNK.sum(),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, default=Path("models/shakespeare-word"))
    parser.add_argument(
        "--batches", type=int, nargs="+", help="time back-to-back steps at these batch sizes"
    )
    args = parser.parse_args()
    bundle = load_bundle(args.bundle)
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = bundle.open_session("step", options, ["CPUExecutionProvider"])
    if args.batches:
        _batches(session, bundle.name, args.batches)
        return
    feed = _feed(session, 1)
    print(f"{bundle.name} version {bundle.version} ({bundle.precision}), ms a step (median):")
    for round_ in (1, 2):
        for name, gap in GAPS.items():
            times = []
            for _ in range(STEPS):
                gap()
                start = time.perf_counter()
                session.run(None, feed)
                times.append(time.perf_counter() - start)
            print(f"  round {round_}  {name:20s} {np.median(times) * 1e3:.3f}")


def _feed(session: ort.InferenceSession, batch: int) -> dict[str, np.ndarray]:
    """Token 1 and zero states for `batch` rows (a dimension not fixed in the graph is the
    batch's)."""
    return {
        i.name: (
            np.ones((batch, 1), dtype=np.int64)
            if "int" in i.type
            else np.zeros([batch if not isinstance(d, int) else d for d in i.shape], np.float32)
        )
        for i in session.get_inputs()
    }


def _batches(session: ort.InferenceSession, name: str, batches: list[int]) -> None:
    print(f"{name}: us of CPU a back-to-back step (median of {STEPS}), and a row's share")
    for round_ in (1, 2):
        for batch in batches:
            feed = _feed(session, batch)
            times = []
            for _ in range(STEPS):
                start = time.thread_time()
                session.run(None, feed)
                times.append(time.thread_time() - start)
            step = float(np.median(times)) * 1e6
            print(f"  round {round_}  batch {batch:4d}  {step:8.0f}  {step / batch:6.1f} a row")


if __name__ == "__main__":
    main()
