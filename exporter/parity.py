"""Prove that the exported graphs compute what the PyTorch model computes.

Every graph runs in onnxruntime and in PyTorch on the same random tokens, at batch sizes 1, 3
and 8 and lengths 1, 7 and 64, and over several consecutive calls in which each side feeds its
own final states back in (how the server scores long documents and extends contexts), so a
drift that only shows after carried state is caught. Every output is compared, states included.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from training.model import RNNLM

BATCHES = (1, 3, 8)
LENGTHS = (1, 7, 64)
# Consecutive calls with the state carried over: (batch, chunk lengths).
CARRIED = ((1, (5, 1, 64, 7)), (3, (7, 1, 64, 5)))


@dataclass
class ParityReport:
    """The tolerance, the measured error and each case; `failure` says what failed, if any."""

    rtol: float
    atol: float
    max_abs_error: float = 0.0
    cases: list[dict[str, Any]] = field(default_factory=list)
    failure: str | None = None

    @property
    def passed(self) -> bool:
        return self.failure is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "rtol": self.rtol,
            "atol": self.atol,
            "max_abs_error": self.max_abs_error,
            "cases": self.cases,
        }


def check_parity(
    model: RNNLM, blobs: dict[str, bytes], *, rtol: float = 1e-3, atol: float = 1e-4, seed: int = 0
) -> ParityReport:
    """Run every case for every graph in `blobs` ({"step"|"prefill"|"score": ONNX bytes})."""
    report = ParityReport(rtol=rtol, atol=atol)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    rng = np.random.default_rng(seed)
    model.eval()
    for graph, blob in blobs.items():
        session = ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
        runs = [(b, (t,)) for b in BATCHES for t in LENGTHS] + list(CARRIED)
        for batch, lengths in runs:
            error, failure = _run_case(model, session, graph, batch, lengths, rng, rtol, atol)
            report.cases.append(
                {"graph": graph, "batch": batch, "lengths": list(lengths), "max_abs_error": error}
            )
            report.max_abs_error = max(report.max_abs_error, error)
            if failure is not None and report.failure is None:
                report.failure = (
                    f"{graph} graph, batch {batch}, chunk lengths {list(lengths)}: " + (failure)
                )
    return report


def _run_case(
    model: RNNLM,
    session: ort.InferenceSession,
    graph: str,
    batch: int,
    lengths: tuple[int, ...],
    rng: np.random.Generator,
    rtol: float,
    atol: float,
) -> tuple[float, str | None]:
    """Feed the chunks one after another; return the max abs error and the first mismatch."""
    inputs = [arg.name for arg in session.get_inputs()]
    outputs = [arg.name for arg in session.get_outputs()]
    n_states = len(model.config.state_names)
    vocab = model.config.vocab_size
    torch_state = tuple(s.numpy() for s in model.initial_state(batch))
    onnx_state = torch_state
    worst = 0.0
    failure = None
    for call, length in enumerate(lengths):
        data = [rng.integers(0, vocab, size=(batch, length), dtype=np.int64)]
        if graph == "score":
            data.append(rng.integers(0, vocab, size=(batch, length), dtype=np.int64))
        expected = _torch_run(model, graph, data, torch_state)
        actual = session.run(outputs, dict(zip(inputs, [*data, *onnx_state], strict=True)))
        error, mismatch = compare_outputs(outputs, expected, actual, rtol, atol)
        worst = max(worst, error)
        if failure is None and mismatch is not None:
            failure = f"call {call + 1}, {mismatch}"
        torch_state = tuple(expected[-n_states:])
        onnx_state = tuple(actual[-n_states:])
    return worst, failure


def compare_outputs(
    names: list[str],
    expected: list[np.ndarray],
    actual: list[np.ndarray],
    rtol: float,
    atol: float,
) -> tuple[float, str | None]:
    """The max abs error over all outputs and the first output outside `atol + rtol * |want|`
    (or of another shape), named."""
    worst = 0.0
    failure = None
    for name, want, got in zip(names, expected, actual, strict=True):
        if got.shape != want.shape:
            failure = failure or f"output {name!r}: shape {got.shape}, expected {want.shape}"
            continue
        diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
        worst = max(worst, float(diff.max()) if diff.size else 0.0)
        if failure is None and not (diff <= atol + rtol * np.abs(want)).all():  # NaN fails
            failure = f"output {name!r}: max abs error {float(diff.max()):.3g}"
    return worst, failure


def _torch_run(
    model: RNNLM, graph: str, data: list[np.ndarray], state: tuple[np.ndarray, ...]
) -> list[np.ndarray]:
    """The PyTorch model's outputs, in the graph's output order."""
    tokens = torch.from_numpy(data[0])
    torch_state = tuple(torch.from_numpy(s) for s in state)
    with torch.no_grad():
        features, final = model.features(tokens, torch_state)
        if graph == "prefill":
            first = [features]
        elif graph == "step":
            first = [model.logits(features), features]
        else:
            targets = torch.from_numpy(data[1]).unsqueeze(-1)
            logprobs = torch.log_softmax(model.logits(features), dim=-1)
            first = [logprobs.gather(-1, targets).squeeze(-1), features]
    return [t.numpy() for t in (*first, *final)]
