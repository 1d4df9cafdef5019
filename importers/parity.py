"""Prove that an imported bundle's graphs compute what the source model computes.

The source is whatever the model came from, run in its own framework: the PyTorch modules of a
pytorch/examples or flair checkpoint, or the original ONNX graph in onnxruntime, one token per
call. It is wrapped as a `Reference`: tokens `[B, T]` and states in, next-token logits (or
log-probs) `[B, T, V]`, the last layer's outputs `[B, T, H]` and the final states out.

Every graph runs on the cases `rnnlm export` uses (random tokens at batch sizes 1, 3 and 8,
lengths 1, 7 and 64, and consecutive calls with each side carrying its own state) and on real
text from the source's data, carried over several calls, so a tokenizer/model mismatch or a
drift that shows only on real inputs is caught. Every output is compared, states included.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import onnxruntime as ort

from exporter.parity import BATCHES, CARRIED, LENGTHS, ParityReport, compare_outputs

# tokens [B, T] int64, states -> (logits [B, T, V], features [B, T, H], final states)
Reference = Callable[
    [np.ndarray, tuple[np.ndarray, ...]],
    tuple[np.ndarray, np.ndarray, tuple[np.ndarray, ...]],
]
# Real text is fed in these consecutive chunks (batch 1), after the random cases.
REAL_CHUNKS = (1, 7, 64, 5, 128)
SCORE_CHUNK = 256


def check_source_parity(
    reference: Reference,
    blobs: dict[str, bytes],
    *,
    vocab: int,
    state_shapes: Sequence[tuple[int, int]],
    real_ids: Sequence[int],
    rtol: float = 1e-3,
    atol: float = 1e-4,
    seed: int = 0,
) -> ParityReport:
    """Run every case for every graph in `blobs` ({"step"|"prefill"|"score": ONNX bytes})."""
    report = ParityReport(rtol=rtol, atol=atol)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    rng = np.random.default_rng(seed)
    real = np.asarray(real_ids, dtype=np.int64)
    for graph, blob in blobs.items():
        try:
            session = ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises several types for a graph it cannot run
            reason = " ".join(str(e).split())[:200]
            report.failure = (
                report.failure or f"{graph} graph: onnxruntime cannot load it ({reason})"
            )
            continue
        cases: list[tuple[int, tuple[int, ...], np.ndarray | None]]
        cases = [(b, (t,), None) for b in BATCHES for t in LENGTHS]
        cases += [(b, lengths, None) for b, lengths in CARRIED]
        if real.size > 1:
            cases.append((1, _fit(REAL_CHUNKS, real.size - 1), real))
        for batch, lengths, text in cases:
            chunks = _chunks(rng, vocab, batch, lengths, text)
            error, failure = _run_case(reference, session, graph, chunks, state_shapes, rtol, atol)
            report.cases.append(
                {
                    "graph": graph,
                    "batch": batch,
                    "lengths": list(lengths),
                    "input": "random" if text is None else "real text",
                    "max_abs_error": error,
                }
            )
            report.max_abs_error = max(report.max_abs_error, error)
            if failure is not None and report.failure is None:
                kind = "random" if text is None else "real-text"
                report.failure = (
                    f"{graph} graph, {kind} batch {batch}, chunk lengths {list(lengths)}: {failure}"
                )
    return report


def _fit(lengths: Sequence[int], available: int) -> tuple[int, ...]:
    """The chunk lengths that fit in `available` tokens (the last one cut to what is left)."""
    out: list[int] = []
    for length in lengths:
        take = min(length, available - sum(out))
        if take <= 0:
            break
        out.append(take)
    return tuple(out)


def _chunks(
    rng: np.random.Generator,
    vocab: int,
    batch: int,
    lengths: Sequence[int],
    text: np.ndarray | None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(tokens, targets) `[batch, length]` per call: random ids, or real text and its next ids."""
    out = []
    start = 0
    for length in lengths:
        if text is None:
            tokens = rng.integers(0, vocab, size=(batch, length), dtype=np.int64)
            targets = rng.integers(0, vocab, size=(batch, length), dtype=np.int64)
        else:
            tokens = text[None, start : start + length]
            targets = text[None, start + 1 : start + length + 1]
        out.append((tokens, targets))
        start += length
    return out


def _run_case(
    reference: Reference,
    session: ort.InferenceSession,
    graph: str,
    chunks: list[tuple[np.ndarray, np.ndarray]],
    state_shapes: Sequence[tuple[int, int]],
    rtol: float,
    atol: float,
) -> tuple[float, str | None]:
    """Feed the chunks one after another; return the max abs error and the first mismatch."""
    inputs = [arg.name for arg in session.get_inputs()]
    outputs = [arg.name for arg in session.get_outputs()]
    batch = chunks[0][0].shape[0]
    source_state = zero_state(state_shapes, batch)
    onnx_state = source_state
    worst, failure = 0.0, None
    for call, (tokens, targets) in enumerate(chunks):
        logits, features, final = reference(tokens, source_state)
        if graph == "step":
            expected = [logits, features, *final]
        elif graph == "prefill":
            expected = [features, *final]
        else:
            expected = [pick(log_softmax(logits), targets), features, *final]
        data = [tokens, targets] if graph == "score" else [tokens]
        actual = session.run(outputs, dict(zip(inputs, [*data, *onnx_state], strict=True)))
        error, mismatch = compare_outputs(outputs, expected, actual, rtol, atol)
        worst = max(worst, error)
        if failure is None and mismatch is not None:
            failure = f"call {call + 1}, {mismatch}"
        source_state = final
        onnx_state = tuple(actual[-len(state_shapes) :])
    return worst, failure


def zero_state(shapes: Sequence[tuple[int, int]], batch: int) -> tuple[np.ndarray, ...]:
    """The state that starts a stream: float32 zeros `[layers, batch, hidden]` per tensor."""
    return tuple(np.zeros((layers, batch, hidden), np.float32) for layers, hidden in shapes)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float32 log-softmax over the last axis, computed in float64."""
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return (x - np.log(np.exp(x).sum(axis=-1, keepdims=True))).astype(np.float32)


def pick(logprobs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """`[B, T]`: each target's entry of `[B, T, V]`."""
    return np.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]


def stream_perplexity(
    reference: Reference,
    ids: Sequence[int],
    eos: int,
    state_shapes: Sequence[tuple[int, int]],
) -> float:
    """Perplexity of `ids` as one stream from the eos state, as the server's Score scores a
    document: log p(ids[0] | eos), then each id given everything before it."""
    stream = np.asarray([eos, *ids], dtype=np.int64)
    state = zero_state(state_shapes, 1)
    total = 0.0
    for start in range(0, len(ids), SCORE_CHUNK):
        end = min(start + SCORE_CHUNK, len(ids))
        tokens, targets = stream[None, start:end], stream[None, start + 1 : end + 1]
        logits, _, state = reference(tokens, state)
        total += float(pick(log_softmax(logits), targets).astype(np.float64).sum())
    return math.exp(-total / len(ids))
