"""How a step samples its generating rows: all of them in one call, on one of two samplers.

Both draw from the same counter-based random streams (`server.sampler.stream_uniforms`: row r's
uniform is a hash of its seed and position), kept per row in the batch's `SamplingRows`, so a
seeded request gets the same tokens whatever shares its batch and whichever sampler runs:

- `GraphRowSampler`: the sampler graph (`server.sampler.BatchSampler`), fed the step's
  `[B, V]` logits; on CUDA the logits need not come back to the host.
- `NativeRowSampler`: every row without a repetition penalty in C (`server.native_sampler`,
  `server/_fastsample.c`), the penalised ones through the graph. The default on the CPU when
  the extension was built: after a 64-row step of the shipped word model it takes 0.5 ms
  against the graph's 1.1 to 1.3 ms for plain rows, and 4.1 against 5.7 ms for top-p.
- `NumpyRowSampler`: the numpy `Sampler` given the same uniforms (`sampler="numpy"`). The
  graph is the default on CUDA (and on the CPU without the native kernel): in-process at 64
  streams of the shipped word model the graph and numpy cost the same CPU per token (90.7 to
  93.4 us against 89.9 to 94.3, three alternating trials), the graph is 3x faster for top-p,
  and the `[B, V]` logits never leave the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeAlias

import numpy as np
import onnxruntime as ort

from server import native_sampler
from server.requests import GenerateRequest
from server.sampler import BatchSampler, SampledRows, SamplingRows, stream_uniforms
from server.sampling import Sampler

# Rows the numpy sampler takes at once: its `[rows, V]` scratch stays this size (2.5 MiB for
# 10,000 tokens), whatever the batch; a 256-row step samples in four blocks.
SCRATCH_ROWS = 64


# `[B, V]` logits on the host, or `[B, 1, V]` left on the device by `Runner.decode`.
Logits: TypeAlias = np.ndarray | ort.OrtValue


def host_logits(logits: Logits) -> np.ndarray:
    """`[B, V]` logits on the host (copied from the device if they are there)."""
    if isinstance(logits, np.ndarray):
        return logits
    values = logits.numpy()
    return values.reshape(values.shape[0], values.shape[-1])


class RowSampler(Protocol):
    """Samples rows of logits; `requests[r]` owns `rows` row r."""

    def sample(
        self, logits: Logits, rows: SamplingRows, requests: Sequence[GenerateRequest]
    ) -> SampledRows: ...


class GraphRowSampler:
    """The sampler graph (see the module docstring)."""

    def __init__(self, providers: Sequence[str], options: ort.SessionOptions) -> None:
        self._sampler = BatchSampler(providers, options)

    def sample(
        self, logits: Logits, rows: SamplingRows, requests: Sequence[GenerateRequest]
    ) -> SampledRows:
        return self._sampler.sample(logits, rows)


class NativeRowSampler:
    """Rows natively, penalised ones through the graph (see the module docstring)."""

    def __init__(self, providers: Sequence[str], options: ort.SessionOptions) -> None:
        self._sampler = native_sampler.NativeSampler(BatchSampler(providers, options))

    def sample(
        self, logits: Logits, rows: SamplingRows, requests: Sequence[GenerateRequest]
    ) -> SampledRows:
        return self._sampler.sample(logits, rows)


class NumpyRowSampler:
    """The numpy sampler, with the rows' counter-based uniforms (see the module docstring)."""

    def __init__(self) -> None:
        self._sampler = Sampler()

    def sample(
        self, logits: Logits, rows: SamplingRows, requests: Sequence[GenerateRequest]
    ) -> SampledRows:
        logits = host_logits(logits)
        history = rows.histories()
        uniforms = stream_uniforms(rows.seed, rows.position)
        params = [r.params for r in requests]
        n = len(rows)
        parts = [  # rows are independent: blocks of rows bound the sampler's scratch memory
            self._sampler.sample(
                np.ascontiguousarray(logits[i : i + SCRATCH_ROWS]),
                params[i : i + SCRATCH_ROWS],
                history[i : i + SCRATCH_ROWS],
                uniforms[i : i + SCRATCH_ROWS],
            )
            for i in range(0, n, SCRATCH_ROWS)
        ]
        return SampledRows.from_samples(parts, rows.top_logprobs)


def choose(setting: str, providers: Sequence[str], options: ort.SessionOptions) -> RowSampler:
    """The sampler for `EngineConfig.sampler` (see `resolve`)."""
    kind = resolve(setting, providers)
    if kind == "numpy":
        return NumpyRowSampler()
    if kind == "native":
        return NativeRowSampler(providers, options)
    return GraphRowSampler(providers, options)


def resolve(setting: str, providers: Sequence[str]) -> str:
    """Which sampler a setting means: "numpy", "native", "graph", or for "auto" native on the
    CPU where it was built, else the graph."""
    if setting == "auto":
        return "native" if native_default(providers) else "graph"
    return setting


def native_default(providers: Sequence[str]) -> bool:
    """Whether "auto" takes the native sampler: built, and the logits are on the host."""
    return native_sampler.available() and list(providers) == ["CPUExecutionProvider"]
