"""exporter.rowwise: an int8 bundle's graphs rewritten so that a row's results are the same bits
whatever shares its batch, and close to the graphs they came from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from exporter.rowwise import RowwiseError, rowwise
from server.bundle import load_bundle

ROWS = 8


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # the server's graph optimizations stay on
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("graph", ["step", "prefill", "score"])
@pytest.mark.parametrize("length", [1, 4])
def test_a_row_is_the_same_in_any_batch(int8_bundle: Path, graph: str, length: int) -> None:
    bundle = load_bundle(int8_bundle)
    original = onnx.load(str(bundle.graph_file(graph)))
    rewritten = rowwise(original)
    ops = {n.op_type for n in rewritten.graph.node}
    assert "DynamicQuantizeLSTM" not in ops and "DynamicQuantizeLinear" not in ops
    assert "Scan" in ops
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, bundle.vocab_size, (ROWS, length)).astype(np.int64)
    states = [
        (rng.standard_normal(s.shape) * 0.5).astype(np.float32) for s in bundle.zero_state(ROWS)
    ]
    # Rows whose scales differ: per-tensor quantization would let the big ones set the small
    # ones' grid.
    for s in states:
        s[:, 1:] *= 4.0
    names = [s.input for s in bundle.state]

    def feeds(rows: slice) -> dict[str, np.ndarray]:
        out = {
            "tokens": tokens[rows],
            **{n: s[:, rows] for n, s in zip(names, states, strict=True)},
        }
        if graph == "score":
            out["targets"] = tokens[rows]
        return out

    new, old = _session(rewritten), _session(original)
    alone, among = new.run(None, feeds(slice(0, 1))), new.run(None, feeds(slice(0, ROWS)))
    state_outputs = {s.output for s in bundle.state}  # [layers, rows, hidden]; others rows first
    for output, a, b in zip(new.get_outputs(), alone, among, strict=True):
        row = b[:, :1] if output.name in state_outputs else b[:1]
        assert np.array_equal(a, row), output.name
    # The same model: close to the graph it came from (the rows' own scales, not the run's).
    before = old.run(None, feeds(slice(0, 1)))
    if graph == "step":
        assert np.abs(_log_softmax(alone[0]) - _log_softmax(before[0])).max() < 0.1
    assert np.abs(alone[-1] - before[-1]).mean() < 0.05  # the last cell state, on average


def test_what_it_cannot_rewrite_is_refused_by_name(int8_bundle: Path) -> None:
    model = onnx.load(str(load_bundle(int8_bundle).step_graph))
    lstm = next(n for n in model.graph.node if n.op_type == "DynamicQuantizeLSTM")
    lstm.attribute.append(helper.make_attribute("clip", 3.0))
    with pytest.raises(RowwiseError, match="cannot rewrite clip"):
        rowwise(model)
