"""exporter.rowwise: int8 graphs rewritten so that a row's results are the same bits whatever
shares its batch and however its context was cut into runs, and close to onnxruntime's own
quantized graphs they came from."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from exporter.quantize import quantize_graph
from exporter.rowwise import RowwiseError, rowwise
from server.bundle import Bundle, load_bundle

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


def _per_tensor(bundle: Bundle, graph: str) -> onnx.ModelProto:
    """onnxruntime's own int8 form of an fp32 bundle's graph (activations per tensor)."""
    blob = onnx.load(str(bundle.graph_file(graph))).SerializeToString()
    int8, _ = quantize_graph(blob, bundle.cell, per_channel=False, per_tensor_activations=True)
    return onnx.load_from_string(int8)


def row_states(bundle: Bundle, rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    """States like a model's own, some rows' hidden states near +-1 and others near 0, so that
    one scale for the batch would set the small rows' grid from the big ones."""
    rng = np.random.default_rng(seed)
    out = {}
    for spec, zero in zip(bundle.state, bundle.zero_state(rows), strict=True):
        value = rng.standard_normal(zero.shape).astype(np.float32)
        value[:, 0] *= 0.1
        out[spec.input] = np.tanh(value) if spec.name == "h" else value
    return out


def _feeds(bundle: Bundle, graph: str, tokens: np.ndarray, states: dict, rows: slice) -> dict:
    out = {"tokens": tokens[rows], **{name: s[:, rows] for name, s in states.items()}}
    if graph == "score":
        out["targets"] = tokens[rows]
    return out


def _same_alone_and_among(
    bundle: Bundle,
    session: ort.InferenceSession,
    graph: str,
    tokens: np.ndarray,
    states: dict[str, np.ndarray],
) -> list[np.ndarray]:
    """Assert the first row's outputs are the same bits alone and among `ROWS`; the latter."""
    alone = session.run(None, _feeds(bundle, graph, tokens, states, slice(0, 1)))
    among = session.run(None, _feeds(bundle, graph, tokens, states, slice(0, ROWS)))
    state_outputs = {s.output for s in bundle.state}  # [layers, rows, hidden]; others rows first
    for output, a, b in zip(session.get_outputs(), alone, among, strict=True):
        row = b[:, :1] if output.name in state_outputs else b[:1]
        assert np.array_equal(a, row), (graph, output.name)
    return among


def _first_row(
    bundle: Bundle, model: onnx.ModelProto, original: onnx.ModelProto | None, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The first row's logits of a one-token step of `model`, alone and among `ROWS`, and of
    `original` alone (None without it)."""
    tokens = np.random.default_rng(seed).integers(0, bundle.vocab_size, (ROWS, 1))
    states = row_states(bundle, ROWS)
    session = _session(model)
    alone = session.run(None, _feeds(bundle, "step", tokens, states, slice(0, 1)))[0]
    among = session.run(None, _feeds(bundle, "step", tokens, states, slice(0, ROWS)))[0]
    if original is None:
        return alone, among[:1], None
    before = _session(original).run(None, _feeds(bundle, "step", tokens, states, slice(0, 1)))
    return alone, among[:1], before[0]


@pytest.fixture(scope="module")
def lstm_fp32(tiny_bundle_factory: Callable[..., Path]) -> Bundle:
    return load_bundle(tiny_bundle_factory("lstm"))


@pytest.mark.parametrize("graph", ["step", "prefill", "score"])
@pytest.mark.parametrize("length", [1, 4])
def test_a_row_is_the_same_in_any_batch(lstm_fp32: Bundle, graph: str, length: int) -> None:
    original = _per_tensor(lstm_fp32, graph)
    rewritten = rowwise(original)
    ops = {n.op_type for n in rewritten.graph.node}
    assert not {"DynamicQuantizeLSTM", "DynamicQuantizeLinear", "MatMulInteger"} & ops
    assert "Scan" in ops
    tokens = np.random.default_rng(1).integers(0, lstm_fp32.vocab_size, (ROWS, length))
    states = row_states(lstm_fp32, ROWS)
    new, old = _session(rewritten), _session(original)
    among = _same_alone_and_among(lstm_fp32, new, graph, tokens, states)
    # The same model: as close to the fp32 graph as onnxruntime's own int8 graph is.
    fp32 = _session(onnx.load(str(lstm_fp32.graph_file(graph))))
    exact, before = (
        s.run(None, _feeds(lstm_fp32, graph, tokens, states, slice(0, ROWS))) for s in (fp32, old)
    )
    for output, a, b, c in zip(new.get_outputs(), among, before, exact, strict=True):
        ours, theirs = np.abs(a - c).mean(), np.abs(b - c).mean()
        assert ours < 1.25 * theirs + 1e-4, (output.name, ours, theirs)


def test_a_context_fed_at_once_or_a_token_at_a_time_reaches_the_same_state(
    lstm_fp32: Bundle,
) -> None:
    step, prefill = (_session(rowwise(_per_tensor(lstm_fp32, g))) for g in ("step", "prefill"))
    tokens = np.random.default_rng(2).integers(0, lstm_fp32.vocab_size, (3, 6))
    states = row_states(lstm_fp32, 3)
    at_once = step.run(None, {"tokens": tokens, **states})
    prefilled = prefill.run(None, {"tokens": tokens, **states})
    for t in range(tokens.shape[1]):
        logits, _, *carried = step.run(None, {"tokens": tokens[:, t : t + 1], **states})
        states = dict(zip(states, carried, strict=True))
        assert np.array_equal(logits[:, 0], at_once[0][:, t])
    for a, b, c in zip(at_once[2:], prefilled[1:], states.values(), strict=True):
        assert np.array_equal(a, c) and np.array_equal(b, c)


def test_an_unbounded_input_is_quantized_a_row_at_a_time(lstm_fp32: Bundle) -> None:
    model = _per_tensor(lstm_fp32, "step")
    graph = model.graph
    i, quant = next(
        (i, n) for i, n in enumerate(graph.node) if n.op_type == "DynamicQuantizeLinear"
    )
    # features x 3: outside [-1, 1], so no fixed grid holds it.
    graph.initializer.append(onnx.numpy_helper.from_array(np.array(3.0, np.float32), "three"))
    graph.node.insert(i, helper.make_node("Mul", [quant.input[0], "three"], ["tripled"]))
    quant.input[0] = "tripled"
    rewritten = rowwise(model)
    assert "MatMulInteger" in {n.op_type for n in rewritten.graph.node}
    alone, among, before = _first_row(lstm_fp32, rewritten, model, seed=3)
    assert np.array_equal(alone, among) and before is not None
    assert np.abs(_log_softmax(alone) - _log_softmax(before)).max() < 0.3


def test_a_gru_models_output_layer_reads_its_hidden_state_on_a_fixed_grid(
    tiny_bundle_factory: Callable[..., Path],
) -> None:
    bundle = load_bundle(tiny_bundle_factory("gru"))
    rewritten = rowwise(_per_tensor(bundle, "step"))
    ops = [n.op_type for n in rewritten.graph.node]
    assert "GRU" in ops and "QuantizeLinear" in ops and "MatMulInteger" not in ops
    alone, among, _ = _first_row(bundle, rewritten, None, seed=4)
    assert np.array_equal(alone, among)


def test_what_it_cannot_rewrite_is_refused_by_name(lstm_fp32: Bundle) -> None:
    model = _per_tensor(lstm_fp32, "step")
    lstm = next(n for n in model.graph.node if n.op_type == "DynamicQuantizeLSTM")
    lstm.attribute.append(helper.make_attribute("clip", 3.0))
    with pytest.raises(RowwiseError, match="cannot rewrite clip"):
        rowwise(model)


def test_a_residual_stack_reads_its_unbounded_inputs_a_row_at_a_time(
    tiny_corpus: Path, tmp_path: Path
) -> None:
    """Above the first layer a residual stack's input is a sum of hidden states, outside
    [-1, 1]: the export quantizes it (and the output layer's features) a row at a time."""
    from exporter.export import export_bundle
    from training.train import TrainOptions, train

    options = TrainOptions(corpus=tiny_corpus, out=tmp_path / "ckpt", cell="lstm", layers=2,
                           hidden=16, embedding=16, residual=True, dropout=0.0, epochs=1,
                           bptt=16, batch_size=8, seed=0, threads=1, quiet=True)  # fmt: skip
    path = export_bundle(train(options), tmp_path / "b", quantize="int8", max_perplexity_change=100)
    bundle = load_bundle(path)
    ops = {n.op_type for n in onnx.load(str(bundle.step_graph)).graph.node}
    assert {"MatMulInteger", "ReduceMax", "MatMulIntegerToFloat", "Scan"} <= ops
    tokens = np.random.default_rng(5).integers(0, bundle.vocab_size, (ROWS, 3))
    states = row_states(bundle, ROWS)
    for graph in ("step", "prefill", "score"):
        _same_alone_and_among(bundle, bundle.open_session(graph), graph, tokens, states)
