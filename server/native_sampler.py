"""The native sampler: `NativeSampler.sample(logits, rows)`.

`server/_fastsample.c` samples every row without a repetition penalty natively, with the GIL
released: a temperature (0: greedy), bans, top-k, top-p and min-p, with the numpy `Sampler`'s
semantics and draw and the same counter-based uniforms. Plain rows (a temperature and bans:
what Generate streams ask for by default, the hot path under load) take two passes over their
logits; filtered ones a selection of their largest logits besides. Rows with a repetition
penalty, and plain rows whose allowed weights underflow, go to the sampler graph. Which
sampler takes a row depends on its own parameters only, so a seeded row draws the same tokens
whatever shares its batch.

The extension is built at install (setup.py) where a C compiler is found, once per x86-64 level
(`server.fastsample` loads the build this CPU runs fastest); `available()` says whether it was,
and without it the engine samples every row with the graph.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np
import onnxruntime as ort

from server import sampling
from server.engine_errors import EngineError
from server.fastsample import BUILDS
from server.fastsample import kernels as _fastsample
from server.sampler import (
    HASH_MIX,
    HASH_SHIFTS,
    HASH_START,
    BatchSampler,
    SampledRows,
    SamplingRows,
)

for _build in BUILDS:  # each build draws from the same stream; None built: see available()
    _build.set_stream_hash(HASH_START, *HASH_MIX, *HASH_SHIFTS)
    if _build.BLOCK != sampling.BLOCK:  # the draw's blocks are the reference's
        raise ImportError(f"server/_fastsample.c's BLOCK {_build.BLOCK} is not {sampling.BLOCK}")


def available() -> bool:
    """Whether the native kernel was built (setup.py) and loads."""
    return _fastsample is not None


def native_rows(rows: SamplingRows) -> np.ndarray:
    """[B] bool: the rows the native kernel samples (see the module docstring)."""
    return rows.repetition_penalty == 1.0


class NativeSampler:
    """Rows natively, those with a penalty through `graph` (a `BatchSampler`); one thread at a
    time."""

    def __init__(self, graph: BatchSampler, kernels: ModuleType | None = None) -> None:
        """`kernels`: the build of server/_fastsample.c to use (default: the fastest this CPU
        runs, `server.fastsample.kernels`)."""
        kernels = kernels or _fastsample
        if kernels is None:
            raise EngineError(
                "the native sampler was not built (setup.py compiles server/_fastsample.c at "
                "install, where a C compiler is found): use sampler auto or graph"
            )
        self._graph = graph
        self._kernels = kernels

    def sample(self, logits: np.ndarray | ort.OrtValue, rows: SamplingRows) -> SampledRows:
        """Sample float32 `logits` `[B, V]` (or `[B, 1, V]`; an `OrtValue` is copied to the
        host)."""
        logits = _rows_of(logits.numpy() if isinstance(logits, ort.OrtValue) else logits, rows)
        ours = native_rows(rows)
        if ours.all():
            drawn, lost = self._native(logits, rows)
            if not lost.any():
                return drawn
            native = np.arange(len(rows))
        elif ours.any():
            native = np.flatnonzero(ours)
            drawn, lost = self._native(np.ascontiguousarray(logits[native]), rows.filter(native))
        else:
            return self._graph.sample(logits, rows)
        done = native[~lost]
        rest = np.setdiff1d(np.arange(len(rows)), done, assume_unique=True)
        graph = self._graph.sample(np.ascontiguousarray(logits[rest]), rows.filter(rest))
        parts = [(done, _take(drawn, ~lost)), (rest, graph)]
        return _scatter(len(rows), parts, rows.top_logprobs)

    def _native(self, logits: np.ndarray, rows: SamplingRows) -> tuple[SampledRows, np.ndarray]:
        """Every row of `rows` sampled natively, and [B] bool: the rows it could not draw."""
        n = len(rows)
        k = int(rows.top_logprobs.max(initial=0))
        tokens = np.empty(n, dtype=np.int64)
        logprobs, lse = np.empty(n, dtype=np.float32), np.empty(n, dtype=np.float32)
        top_ids, top_lps = np.zeros((n, k), dtype=np.int64), np.zeros((n, k), dtype=np.float32)
        lost = np.empty(n, dtype=np.bool_)
        self._kernels.sample(
            logits,
            np.ascontiguousarray(rows.temperature, dtype=np.float32),
            np.ascontiguousarray(rows.top_k, dtype=np.int64),
            np.ascontiguousarray(rows.top_p, dtype=np.float32),
            np.ascontiguousarray(rows.min_p, dtype=np.float32),
            np.ascontiguousarray(rows.seed, dtype=np.int64),
            np.ascontiguousarray(rows.position, dtype=np.int64),
            np.ascontiguousarray(rows.banned_ids, dtype=np.int64),
            np.ascontiguousarray(rows.top_logprobs, dtype=np.int64),
            tokens,
            logprobs,
            lse,
            top_ids,
            top_lps,
            lost,
        )
        return SampledRows(tokens, logprobs, lse, top_ids, top_lps, rows.top_logprobs), lost


def _rows_of(logits: np.ndarray, rows: SamplingRows) -> np.ndarray:
    """`logits` as C-contiguous float32 `[B, V]`, checked against `rows`."""
    want = (len(rows), rows.vocab_size)
    if logits.shape not in (want, (want[0], 1, want[1])):
        raise ValueError(
            f"logits of shape {logits.shape} do not match {len(rows)} rows of a vocabulary "
            f"of {want[1]}"
        )
    if rows.banned_ids.size and int(rows.banned_ids.max()) >= want[1]:
        raise ValueError(f"banned_ids reach past the vocabulary of {want[1]}")
    return np.ascontiguousarray(logits.reshape(want), dtype=np.float32)


def _take(s: SampledRows, idx: np.ndarray) -> SampledRows:
    """The rows `idx` (indices or a mask) of `s`."""
    fields = (s.tokens, s.logprobs, s.lse, s.top_ids, s.top_logprobs, s.top_counts)
    return SampledRows(*(f[idx] for f in fields))


def _scatter(
    n: int, parts: list[tuple[np.ndarray, SampledRows]], top_counts: np.ndarray
) -> SampledRows:
    """One `SampledRows` of `n` rows from parts whose rows are at the given indices."""
    k = int(top_counts.max(initial=0))
    tokens = np.empty(n, dtype=np.int64)
    logprobs, lse = np.empty(n, dtype=np.float32), np.empty(n, dtype=np.float32)
    top_ids, top_lps = np.zeros((n, k), dtype=np.int64), np.zeros((n, k), dtype=np.float32)
    for idx, s in parts:
        tokens[idx], logprobs[idx], lse[idx] = s.tokens, s.logprobs, s.lse
        w = min(k, s.top_ids.shape[1])
        top_ids[idx, :w], top_lps[idx, :w] = s.top_ids[:, :w], s.top_logprobs[:, :w]
    return SampledRows(tokens, logprobs, lse, top_ids, top_lps, top_counts)
