"""int8 export: integer ops in the graphs, quality figures that are real, and the refusals."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from exporter.export import ExportError, export_bundle
from exporter.quantize import QUANTIZED_AS
from rnnlm.cli import main
from server.bundle import Bundle, external_data, load_bundle
from training.data import load_corpus


def op_types(graph: Path) -> Counter[str]:
    return Counter(n.op_type for n in onnx.load(str(graph), load_external_data=False).graph.node)


def session(bundle: Bundle, graph: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return bundle.open_session(graph, options)


def step_logprobs(bundle: Bundle, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Log-prob of each next token and the argmax, the whole text in one call at batch 1."""
    tokens = np.array([ids[:-1]], dtype=np.int64)
    logits, *_ = session(bundle, "step").run(
        None,
        {
            "tokens": tokens,
            **dict(zip([s.input for s in bundle.state], bundle.zero_state(1), strict=True)),
        },
    )
    row = logits[0].astype(np.float64)
    norm = np.log(np.exp(row - row.max(-1, keepdims=True)).sum(-1)) + row.max(-1)
    return row[np.arange(len(ids) - 1), ids[1:]] - norm, row.argmax(-1)


def validation_ids(bundle: Bundle, corpus: Path) -> tuple[str, list[int]]:
    text = load_corpus(corpus).valid
    return text, [bundle.eos_id, *bundle.tokenizer.encode(text).ids]


def test_int8_graphs_hold_integer_ops(int8_bundle: Path) -> None:
    bundle = load_bundle(int8_bundle)
    m = bundle.manifest
    assert bundle.precision == m["precision"] == "int8"
    for graph in ("step", "prefill", "score"):
        ops = op_types(bundle.graph_file(graph))
        output_layers = 0 if graph == "prefill" else 1
        # Each layer's input product beside its Scan (whose cell holds the recurrent one).
        assert ops["Scan"] == 2 and ops["MatMulIntegerToFloat"] == 2 + output_layers, ops
        assert not {"LSTM", "MatMul", "DynamicQuantizeLSTM", "DynamicQuantizeLinear"} & set(ops)
        record = m["quantization"]["ops"][graph]
        assert record["quantized"]["LSTM"] == {"count": 2, "as": QUANTIZED_AS["LSTM"]}
        if output_layers:
            assert record["quantized"]["MatMul"] == {"count": 1, "as": "MatMulIntegerToFloat"}
        assert record["float"] == {}
    assert m["quantization"]["per_channel"] is False
    assert m["quantization"]["batch_independent"] is True
    assert "quantization.quality" in m["parity"]["applies_to"]
    # The int8 weights are shared by the graphs like fp32 ones, and are int8 on disk.
    step = {(r.offset, r.length) for r in external_data(bundle.step_graph)}
    assert step <= {(r.offset, r.length) for r in external_data(bundle.graph_file("score"))}
    assert {(r.offset, r.length) for r in external_data(bundle.graph_file("prefill"))} <= step
    proto = onnx.load(str(bundle.step_graph))
    types = {t.name: t.data_type for t in proto.graph.initializer}
    cells = [n for n in proto.graph.node if n.op_type == "Scan"]
    for node in [*proto.graph.node, *(n for s in cells for n in s.attribute[0].g.node)]:
        weights = {"MatMulIntegerToFloat": (1,), "Gather": (0,)}
        for i in weights.get(node.op_type, ()):
            expected = onnx.TensorProto.UINT8 if node.op_type == "Gather" else onnx.TensorProto.INT8
            assert types[node.input[i]] == expected, (node.op_type, node.input[i])


def test_recorded_quality_is_real(
    int8_bundle: Path, default_bundle: Path, tiny_corpus: Path
) -> None:
    int8, fp32 = load_bundle(int8_bundle), load_bundle(default_bundle)
    quality = int8.manifest["quantization"]["quality"]
    text, ids = validation_ids(int8, tiny_corpus)
    assert quality["text"]["sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert quality["text"]["tokens"] == len(ids) - 1 <= quality["chunk"]  # one call: as here
    lp32, top32 = step_logprobs(fp32, ids)
    lp8, top8 = step_logprobs(int8, ids)
    ppl32, ppl8 = float(np.exp(-lp32.mean())), float(np.exp(-lp8.mean()))
    assert quality["fp32_perplexity"] == pytest.approx(ppl32, rel=1e-6)
    assert quality["int8_perplexity"] == pytest.approx(ppl8, rel=1e-6)
    change = 100 * (ppl8 / ppl32 - 1)
    assert quality["perplexity_change_percent"] == pytest.approx(change, rel=1e-3, abs=1e-6)
    assert quality["top1_agreement"] == pytest.approx(float(np.mean(top32 == top8)))
    # The int8 score graph is measured too, since the server scores with it.
    targets = np.array([ids[1:]], dtype=np.int64)
    states = dict(zip([s.input for s in int8.state], int8.zero_state(1), strict=True))
    (score_lp, *_) = session(int8, "score").run(
        None, {"tokens": np.array([ids[:-1]]), "targets": targets, **states}
    )
    ppl_score = float(np.exp(-score_lp.astype(np.float64).mean()))
    assert quality["score_graph_int8_perplexity"] == pytest.approx(ppl_score, rel=1e-6)
    # Real figures for a real quantization: different numbers, nearly the same model.
    assert ppl8 != ppl32 and abs(change) < quality["max_perplexity_change_percent"] == 1.0


def test_refused_when_perplexity_moves_more_than_allowed(
    tiny_checkpoint_factory: Callable[..., Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ckpt, target = tiny_checkpoint_factory("lstm"), tmp_path / "models" / "lstm-int8"
    with pytest.raises(ExportError, match=r"refused: perplexity moves .* nothing was written"):
        export_bundle(ckpt, target, quantize="int8", max_perplexity_change=0.0001)
    assert list(tmp_path.iterdir()) == []
    args = ["export", str(ckpt), str(target), "--quantize", "int8"]
    assert main([*args, "--max-perplexity-change", "0.0001"]) == 2
    err = capsys.readouterr().err.strip()
    assert "more than --max-perplexity-change 0.0001%" in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("cell", "op"), [("gru", "GRU"), ("rnn_tanh", "RNN")])
def test_cells_without_integer_kernels_say_so(
    cell: str,
    op: str,
    tiny_checkpoint_factory: Callable[..., Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    target = tmp_path / f"{cell}-int8"
    # Not the quality gate (tested above): a tiny model's int8 perplexity on 90 tokens moves a
    # few percent on some CPUs' kernels.
    argv = ["export", str(tiny_checkpoint_factory(cell)), str(target), "--quantize", "int8"]
    assert main([*argv, "--max-perplexity-change", "100"]) == 0
    out = capsys.readouterr().out
    assert (
        f"note: {op} x2 stays float32: onnxruntime has no integer {op} kernel (the {cell} cell)"
        in out
    )
    assert "int8: quantized Gather x1" in out and "MatMul x1 -> MatMulIntegerToFloat" in out
    bundle = load_bundle(target)
    record = bundle.manifest["quantization"]["ops"]["step"]
    assert record["float"][op]["count"] == 2
    assert set(record["quantized"]) == {"Gather", "MatMul"}
    ops = op_types(bundle.step_graph)
    assert ops[op] == 2 and ops["MatMulIntegerToFloat"] == 1


def test_per_channel_scales(tiny_checkpoint_factory: Callable[..., Path], tmp_path: Path) -> None:
    path = export_bundle(
        tiny_checkpoint_factory("lstm"),
        tmp_path / "pc",
        quantize="int8",
        per_channel=True,
        max_perplexity_change=100.0,  # not the gate: see test_cells_without_integer_kernels_say_so
    )
    bundle = load_bundle(path)
    assert bundle.manifest["quantization"]["per_channel"] is True
    proto = onnx.load(str(bundle.step_graph))
    inits = {t.name: t for t in proto.graph.initializer}
    matmul = next(n for n in proto.graph.node if n.input[-1] == "model.decoder.bias")
    assert list(inits[matmul.input[3]].dims) == [bundle.vocab_size]  # a scale per column


def test_per_tensor_activations_keep_onnxruntimes_ops(
    tiny_checkpoint_factory: Callable[..., Path], tmp_path: Path
) -> None:
    path = export_bundle(
        tiny_checkpoint_factory("lstm"),
        tmp_path / "pt",
        quantize="int8",
        per_tensor_activations=True,
        max_perplexity_change=100.0,  # not the gate: see test_cells_without_integer_kernels_say_so
    )
    bundle = load_bundle(path)
    quantization = bundle.manifest["quantization"]
    assert quantization["batch_independent"] is False
    assert quantization["ops"]["step"]["quantized"]["LSTM"]["as"] == "DynamicQuantizeLSTM"
    ops = op_types(bundle.step_graph)
    assert ops["DynamicQuantizeLSTM"] == 2 and ops["MatMulInteger"] == 1 and "Scan" not in ops


def without_corpus(source: Path, tmp_path: Path, corpus: str) -> Path:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(source, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["train_args"]["corpus"] = corpus
    (ckpt / "config.json").write_text(json.dumps(config))
    return ckpt


def test_held_out_text_must_be_available(
    tiny_checkpoint_factory: Callable[..., Path], tmp_path: Path
) -> None:
    ckpt = without_corpus(tiny_checkpoint_factory("lstm"), tmp_path, str(tmp_path / "gone.txt"))
    with pytest.raises(
        ExportError,
        match=r"config\.json: the checkpoint's validation text is not available \(--corpus "
        r".*gone\.txt: no such file\); give held-out text with --calibration-text FILE",
    ):
        export_bundle(ckpt, tmp_path / "out", quantize="int8")
    other = tmp_path / "other.txt"
    other.write_text("a different corpus .\n" * 40)
    ckpt = without_corpus(ckpt, tmp_path / "changed", str(other))
    with pytest.raises(ExportError, match=r"the corpus changed since training"):
        export_bundle(ckpt, tmp_path / "out", quantize="int8")
    with pytest.raises(ExportError, match=r"--calibration-text .*missing\.txt: no such file"):
        export_bundle(ckpt, tmp_path / "out", quantize="int8", calibration_text="missing.txt")
    assert not (tmp_path / "out").exists()
    held_out = tmp_path / "held-out.txt"
    held_out.write_text("the cat sees the moon .\na dog likes a red house .\n")
    bundle = load_bundle(
        export_bundle(ckpt, tmp_path / "out", quantize="int8", calibration_text=held_out)
    )
    text = bundle.manifest["quantization"]["quality"]["text"]
    assert text["source"] == "--calibration-text" and text["file"] == str(held_out)
    assert text["tokens"] == 15  # 6 and 7 words, each line ending in eos


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--calibration-text", "x.txt"], "--calibration-text is only used with --quantize int8"),
        (["--per-channel"], "--per-channel is only used with --quantize int8"),
        (
            ["--quantize", "int8", "--max-perplexity-change", "-1"],
            "--max-perplexity-change must be a percentage >= 0, not -1.0",
        ),
    ],
)
def test_option_errors(
    args: list[str],
    message: str,
    tiny_checkpoint_factory: Callable[..., Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["export", str(tiny_checkpoint_factory("lstm")), str(tmp_path / "o"), *args]) == 2
    assert capsys.readouterr().err.strip() == f"rnnlm export: error: {message}"
    assert list(tmp_path.iterdir()) == []
