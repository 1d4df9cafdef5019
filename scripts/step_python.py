"""The Python cost of one decode step of the engine, warm, at several batch sizes.

    PYTHONPATH=. python scripts/step_python.py [--rows 1 8 64 256] [--vocab 10000]

Runs the scheduler's per-step work for a batch of decoding generations (`Pace.rest`,
`Batch.live`, `Pace.keeps_waiting`, `Pace.lane`, `server.step.step`) in a tight loop, with a
runner that returns fixed arrays and a sampler that returns fixed tokens: no onnxruntime, no
sampling, so what is timed is the step's own Python (grouping, the inputs, the hand-over of
tokens, the batch's bookkeeping). Issue 14 asks for it flat from 1 to 256 rows. Prints the
least and the median over trials of the mean time a step, and the least a row (the least is
the figure to compare: this machine's other tenants only ever add to it).

A warm loop is a lower bound: in the engine, onnxruntime's run touches a few MB between two
steps (the word model's int8 weights and its [64, V] logits) and the step's Python then runs on
evicted caches, 3.5 to 6 times slower (docs/performance.md, "The step's Python in place").
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

import numpy as np

from server.batch import Batch
from server.requests import GenerateRequest
from server.sampler import SampledRows, SamplingRows
from server.sampling import SamplingParams
from server.scheduler import Pace
from server.step import StepConfig, step

HIDDEN = 200
LAYERS = 2


class FixedRunner:
    """A `Runner` whose step graph answers at once with preset arrays."""

    def __init__(self, rows: int, vocab: int) -> None:
        self.logits = np.zeros((rows, 1, vocab), np.float32)
        self.features = np.zeros((rows, 1, HIDDEN), np.float32)
        self.states = [np.zeros((LAYERS, rows, HIDDEN), np.float32) for _ in range(2)]

    def step(
        self, tokens: np.ndarray, states: Sequence[np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        n = len(tokens)
        return self.logits[:n], self.features[:n], [s[:, :n] for s in self.states]


class FixedSampler:
    """A `RowSampler` that picks token 5 for every row."""

    def sample(
        self, logits: object, rows: SamplingRows, requests: Sequence[GenerateRequest]
    ) -> SampledRows:
        n = len(rows)
        zeros = np.zeros(n, np.float32)
        empty_ids, empty_lps = np.zeros((n, 0), np.int64), np.zeros((n, 0), np.float32)
        return SampledRows(
            np.full(n, 5, np.int64), zeros, zeros, empty_ids, empty_lps, rows.top_logprobs
        )


def decoding_batch(rows: int, vocab: int, runner: FixedRunner, config: StepConfig) -> Batch:
    """`rows` generations past their first token (each with its own seed, `<unk>` banned)."""
    state = tuple(np.zeros((LAYERS, HIDDEN), np.float32) for _ in range(2))
    requests = [
        GenerateRequest(
            np.array([3]),
            np.zeros(0, dtype=np.int64),
            state,
            np.zeros(vocab, np.float32),  # the first token's logits: known, no prompt to feed
            SamplingParams(seed=i, banned_ids=frozenset({0})),
            10**9,
            frozenset({1}),
            None,
            lambda payload: None,
        )
        for i in range(rows)
    ]
    batch = step(Batch.of(requests, vocab), runner, config, FixedSampler()).batch
    return batch.live()


def per_step(rows: int, vocab: int, calls: int, trials: int) -> list[float]:
    """Each trial's mean seconds a step of `rows` decoding rows, with the scheduler's
    per-step passes."""
    runner, sampler = FixedRunner(rows, vocab), FixedSampler()
    config = StepConfig(vocab_size=vocab, hidden=HIDDEN)
    pace = Pace(50.0, None, time.thread_time)
    batch = decoding_batch(rows, vocab, runner, config)
    times = []
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(calls):
            batch = pace.rest(batch.live())
            pace.keeps_waiting(batch)
            pace.lane(batch, config.chunk)
            batch = step(batch, runner, config, sampler).batch.live()
        times.append((time.perf_counter() - start) / calls)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--vocab", type=int, default=10_000)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--trials", type=int, default=7)
    args = parser.parse_args()
    for rows in args.rows:
        times = per_step(rows, args.vocab, args.calls, args.trials)
        least, median = min(times), statistics.median(times)
        print(
            f"{rows:4d} rows: {least * 1e6:7.1f} us a step (median {median * 1e6:.1f}), "
            f"{least / rows * 1e6:6.2f} a row"
        )


if __name__ == "__main__":
    main()
