"""The runner: the step, score and prefill onnxruntime sessions, called with the bundle's names.

`Runner` is what a step calls (server/step.py); `Sessions` is it over onnxruntime. Also here:
how sessions are made (`providers_for`, `session_options`) and the measurement that sets the
prefill split (`choose_prefill_split`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import onnxruntime as ort

from server.bundle import Bundle
from server.engine_config import EngineConfig
from server.engine_errors import EngineError
from server.metrics import EngineMetrics
from server.sampling import log_softmax

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
# Runs of each graph timed at start to choose the prefill split (the fastest counts).
SPLIT_TIMINGS = 5


class DeviceStates:
    """A batch's recurrent states where the step session computes them (onnxruntime values:
    on the GPU under CUDA), as a decode run left them. The next decode run takes them there,
    so a batch whose rows stay the same moves no state between host and device from step to
    step; `host()` copies them to the host, once, when the rows change (`Batch.filter`,
    `Batch.concatenate`) or a run needs them there."""

    __slots__ = ("_host", "values")

    def __init__(self, values: list[ort.OrtValue]) -> None:
        self.values = values  # [layers, N, hidden] each, in the bundle's state order
        self._host: tuple[np.ndarray, ...] | None = None

    def host(self) -> tuple[np.ndarray, ...]:
        """The states as read-only host arrays (copied on the first call)."""
        if self._host is None:
            arrays = tuple(value.numpy() for value in self.values)
            for array in arrays:
                array.setflags(write=False)
            self._host = arrays
        return self._host


class Runner(Protocol):
    """The model's graphs, as a step calls them."""

    def step(
        self, tokens: np.ndarray, states: Sequence[np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """tokens [B, T] -> logits [B, T, V], features [B, T, H], final states."""
        ...

    def score(
        self, tokens: np.ndarray, targets: np.ndarray, states: Sequence[np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray | None, list[np.ndarray]]:
        """tokens, targets [B, T] -> log-prob of each target [B, T], features [B, T, H] (None
        from a score graph exported before the continuous cache), final states."""
        ...

    def prefill(
        self, tokens: np.ndarray, states: Sequence[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """tokens [B, T] -> features [B, T, H], final states (no logits)."""
        ...

    def decode(
        self, tokens: np.ndarray, states: Sequence[np.ndarray] | DeviceStates
    ) -> tuple[ort.OrtValue, DeviceStates]:
        """tokens [B, 1] -> logits [B, 1, V] and the final states, both left on the device
        (used only with `StepConfig.device_logits`)."""
        ...


class Sessions:
    """`Runner` over onnxruntime sessions; a bundle's missing graphs run on the step graph."""

    def __init__(
        self,
        step: ort.InferenceSession,
        score: ort.InferenceSession | None,
        prefill: ort.InferenceSession | None,
        bundle: Bundle,
        metrics: EngineMetrics | None,
    ) -> None:
        self._step = step
        self._score = score
        self._prefill = prefill
        self._state_inputs = [s.input for s in bundle.state]
        self._state_outputs = [s.output for s in bundle.state]
        # Where `decode` leaves the logits: the device the step session computes on.
        self._device = "cuda" if step.get_providers()[0] == CUDA else "cpu"
        self.metrics = metrics

    def _feeds(self, tokens: np.ndarray, states: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        feeds = dict(zip(self._state_inputs, states, strict=True))
        feeds["tokens"] = tokens
        return feeds

    def _observe(self, rows: int) -> None:
        if self.metrics is not None:
            self.metrics.observe_batch(rows)

    def step(
        self, tokens: np.ndarray, states: Sequence[np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        logits, features, *new = self._step.run(None, self._feeds(tokens, states))
        self._observe(len(tokens))
        return logits, features, new

    def decode(
        self, tokens: np.ndarray, states: Sequence[np.ndarray] | DeviceStates
    ) -> tuple[ort.OrtValue, DeviceStates]:
        """A one-token step whose logits `[B, 1, V]` and new states stay on the session's
        device (I/O binding: on CUDA only the tokens go up, the sampler graph takes the
        logits where they are, and the next decode run the states); states from an earlier
        decode run are taken where they are, host arrays copied up. The features are not
        fetched."""
        binding = self._step.io_binding()
        binding.bind_cpu_input("tokens", tokens)
        if isinstance(states, DeviceStates):
            for name, value in zip(self._state_inputs, states.values, strict=True):
                binding.bind_ortvalue_input(name, value)
        else:
            for name, state in zip(self._state_inputs, states, strict=True):
                binding.bind_cpu_input(name, np.ascontiguousarray(state))
        for name in ("logits", "features", *self._state_outputs):
            binding.bind_output(name, self._device)
        self._step.run_with_iobinding(binding)
        logits, _, *new = binding.get_outputs()
        self._observe(len(tokens))
        return logits, DeviceStates(new)

    def score(
        self, tokens: np.ndarray, targets: np.ndarray, states: Sequence[np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray | None, list[np.ndarray]]:
        if self._score is None:
            # A bundle without a score graph: the step graph's logits, reduced here.
            logits, features, new = self.step(tokens, states)
            picked = np.take_along_axis(log_softmax(logits), targets[..., None], axis=-1)
            return picked[..., 0], features, new
        feeds = self._feeds(tokens, states)
        feeds["targets"] = targets
        logprobs, *rest = self._score.run(None, feeds)
        self._observe(len(tokens))
        new = rest[-len(self._state_inputs) :]
        return logprobs, rest[0] if len(rest) > len(new) else None, new

    @property
    def has_prefill(self) -> bool:
        return self._prefill is not None

    def prefill(
        self, tokens: np.ndarray, states: Sequence[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        if self._prefill is None:
            # A bundle exported before the prefill graph: the step graph, logits dropped.
            _, features, new = self.step(tokens, states)
            return features, new
        features, *new = self._prefill.run(None, self._feeds(tokens, states))
        self._observe(len(tokens))
        return features, new


def choose_prefill_split(
    sessions: Sessions, bundle: Bundle, chunk: int, configured: int | None
) -> int | None:
    """`configured`, else measured: how many tokens before a request's last one make a
    prefill run of their own pay.

    Feeding n tokens as a prefill run of n - 1 and a one-token step saves the output layer's
    work on n - 1 tokens and costs a second run. Timed here on the engine's own sessions, a
    full chunk on the step graph, on the prefill graph, and split so, give both: the output
    layer's time per token, and what the second run adds. None (never) for a bundle without a
    prefill graph, or when the output layer is within the timing's noise or cannot pay for the
    run within a chunk (a character-level model's output layer is a rounding error).
    """
    if configured is not None:
        return configured
    if not sessions.has_prefill:
        return None
    chunk = max(2, chunk)  # the split run needs a token to prefill
    tokens = np.full((1, chunk), bundle.eos_id, dtype=np.int64)
    zero = bundle.zero_state(1)

    def split_run() -> None:
        _, states = sessions.prefill(tokens[:, 1:], zero)
        sessions.step(tokens[:, :1], states)

    runs: dict[str, Callable[[], object]] = {
        "step": lambda: sessions.step(tokens, zero),
        "prefill": lambda: sessions.prefill(tokens, zero),
        "split": split_run,
    }
    fastest = dict.fromkeys(runs, float("inf"))
    for _ in range(SPLIT_TIMINGS):  # in turns, so a slow moment hits all three alike
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            fastest[name] = min(fastest[name], time.perf_counter() - start)
    # The output layer's cost a token; timing noise can make it come out below zero.
    per_token = max(0.0, fastest["step"] - fastest["prefill"]) / chunk
    second_run = max(0.0, fastest["split"] - fastest["step"] + (chunk - 1) * per_token)
    # An output layer under a tenth of a chunk's time is within the timing's noise.
    meaningful = per_token * chunk > fastest["step"] / 10
    split = math.floor(second_run / per_token) + 1 if meaningful else chunk + 1
    log.info(
        "%s version %s: the output layer takes %.1f us a token, a second run %.0f us: %s",
        bundle.name,
        bundle.version,
        per_token * 1e6,
        second_run * 1e6,
        f"a feed with {split} or more tokens before its last runs those on the prefill graph"
        if split <= chunk
        else "only whole chunks before a feed's last chunk run on the prefill graph",
    )
    return split if split <= chunk else None


def providers_for(choice: str) -> list[str]:
    """The onnxruntime providers for a `provider` setting; EngineError if CUDA is missing."""
    available = ort.get_available_providers()
    if choice == "cuda":
        if CUDA not in available:
            raise EngineError(
                f"provider 'cuda' was asked for but this onnxruntime has no {CUDA} "
                f"(available: {', '.join(available)}); install onnxruntime-gpu on a machine "
                "with a GPU, or use --provider cpu or auto"
            )
        return [CUDA, CPU]
    if choice == "auto" and CUDA in available:
        return [CUDA, CPU]
    return [CPU]


def session_options(config: EngineConfig) -> ort.SessionOptions:
    """Options for a small shared CPU: few threads, no spinning (docs/performance.md)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = config.intra_op_threads
    options.inter_op_num_threads = config.inter_op_threads
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    spin = "1" if config.allow_spinning else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spin)
    options.add_session_config_entry("session.inter_op.allow_spinning", spin)
    return options
