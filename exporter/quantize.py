"""int8 dynamic quantization of the exported graphs, and the quality check that admits it.

Each fp32 graph is folded first (`quant_pre_process`: onnxruntime's optimizer at the BASIC
level, which turns the tied decoder's `Transpose` of the embedding into a plain initializer),
then `onnxruntime.quantization.quantize_dynamic` rewrites it: LSTM -> `DynamicQuantizeLSTM`,
MatMul with a constant weight -> `MatMulInteger`, and the embedding `Gather` reads a uint8
table. Weights are int8 (uint8 for the embedding). Those ops quantize their activations with
one scale for a whole run, so by default `exporter.rowwise` then rewrites them to read each
row's activations on a grid of its own: a row's results do not depend on its batch
(`per_tensor_activations` keeps onnxruntime's form, whose long batch-1 runs are cheaper).
onnxruntime has no integer GRU or RNN kernel, so those layers keep float32 weights and only the
output layer and the embedding of such a model are quantized; `quantized_ops` records exactly
which ops were and were not quantized.

Dynamic quantization needs no calibration, but it changes the model's numbers, so the bundle is
admitted only after its perplexity and top-1 agreement against the fp32 graphs are measured on
held-out text: the checkpoint's validation split when its corpus is still there (and unchanged),
otherwise a text the caller gives.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic
from tokenizers import Tokenizer

from exporter.rowwise import rowwise
from training.checkpoint import Checkpoint
from training.data import CorpusError, decode_lines, encode, join_lines, load_corpus, read_text

# Held-out tokens scored by each graph; enough for a paired fp32/int8 comparison at 1%.
EVAL_TOKENS = 20_000
# Tokens fed per call, state carried (as the server scores long documents).
EVAL_CHUNK = 256
# What each quantized op type becomes: with activations a row at a time (the default), and
# quantized per tensor at run time.
QUANTIZED_AS = {
    "LSTM": "the cell written out: MatMulIntegerToFloat in a Scan",
    "MatMul": "MatMulIntegerToFloat",
    "Gather": "Gather of a uint8 table",
}
QUANTIZED_PER_TENSOR_AS = {
    "LSTM": "DynamicQuantizeLSTM",
    "MatMul": "MatMulInteger",
    "Gather": "Gather of a uint8 table + DequantizeLinear",
}
# ONNX op type -> the weight inputs that make it a weight-carrying op.
WEIGHT_INPUTS = {"LSTM": (1, 2), "GRU": (1, 2), "RNN": (1, 2), "MatMul": (1,), "Gemm": (1,),
                 "Gather": (0,)}  # fmt: skip
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)


def activation_fields(per_tensor: bool) -> dict[str, Any]:
    """The manifest's `quantization` fields that say how activations are quantized, and so
    whether a row's results depend on what shares its batch (`Bundle.batch_independent`)."""
    if per_tensor:
        how = "uint8, quantized per tensor at run time: a row's results depend on its batch"
    else:
        how = (
            "uint8, a row at a time: 1/127 for values in [-1, 1] (hidden states), the embedding "
            "table's own integers, else each row its own scale (exporter.rowwise); a row's "
            "results do not depend on its batch"
        )
    return {"activations": how, "batch_independent": not per_tensor}


class QuantizationError(Exception):
    """The held-out text the int8 bundle is measured on is missing or unusable."""


@dataclass(frozen=True)
class EvaluationText:
    """Held-out token ids, eos first, and a record of where they came from."""

    ids: list[int]
    record: dict[str, Any]


def evaluation_text(
    ckpt: Checkpoint, calibration_text: str | Path | None, eos: int
) -> EvaluationText:
    """The held-out text to measure on: `calibration_text`, else the checkpoint's validation split.

    The validation split is rebuilt from the corpus files named in the checkpoint's training
    arguments and used only if their sha256 still matches the one recorded at training time.
    """
    tokenizer = Tokenizer.from_file(str(ckpt.tokenizer_path))
    if calibration_text is not None:
        return file_evaluation_text(tokenizer, calibration_text, eos, "--calibration-text")
    record: dict[str, Any] = {
        "source": "the checkpoint's validation split",
        "file": ckpt.provenance.get("corpus", {}).get("valid"),
    }
    return _evaluation(tokenizer, _validation_split(ckpt), record, eos)


def file_evaluation_text(
    tokenizer: Tokenizer, file: str | Path, eos: int, option: str
) -> EvaluationText:
    """The held-out text of `file` (named `option` on the command line), tokenized."""
    path = Path(file)
    try:
        text = join_lines(decode_lines(read_text(path, option), option, path))
    except CorpusError as e:
        raise QuantizationError(str(e)) from e
    return _evaluation(tokenizer, text, {"source": option, "file": str(path)}, eos)


def _evaluation(
    tokenizer: Tokenizer, text: str, record: dict[str, Any], eos: int
) -> EvaluationText:
    ids = [eos, *encode(tokenizer, text).tolist()]
    if len(ids) < 2:
        raise QuantizationError(f"{record['file']}: the held-out text has no tokens")
    record.update(
        sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
        text_tokens=len(ids) - 1,
        tokens=min(len(ids) - 1, EVAL_TOKENS),
    )
    return EvaluationText(ids=ids[: EVAL_TOKENS + 1], record=record)


def _validation_split(ckpt: Checkpoint) -> str:
    args, recorded = ckpt.train_args, ckpt.provenance.get("corpus_sha256")
    hint = "; give held-out text with --calibration-text FILE"
    where = ckpt.path / "config.json"
    try:
        if args.get("corpus"):
            corpus = load_corpus(Path(args["corpus"]), split=args.get("split", "lines"))
        elif all(args.get(split) for split in ("train", "valid", "test")):
            corpus = load_corpus(None, Path(args["train"]), Path(args["valid"]), Path(args["test"]))
        else:
            raise QuantizationError(
                f"{where}: the checkpoint does not name its corpus, so its validation text is "
                f"not available to measure the int8 bundle on{hint}"
            )
    except CorpusError as e:
        raise QuantizationError(
            f"{where}: the checkpoint's validation text is not available ({e}){hint}"
        ) from e
    if corpus.sha256 != recorded:
        raise QuantizationError(
            f"{where}: the corpus changed since training (sha256 {corpus.sha256[:12]}..., the "
            f"checkpoint recorded {str(recorded)[:12]}...), so its validation split is not the "
            f"held-out text{hint}"
        )
    return corpus.valid


def quantize_graph(
    blob: bytes, cell: str, per_channel: bool, per_tensor_activations: bool = False
) -> tuple[bytes, dict[str, Any]]:
    """One fp32 graph -> its int8 form (self-contained ONNX bytes) and `quantized_ops` of it.

    `per_channel` gives each LSTM gate row and each vocabulary column of the output layer its
    own scale instead of one per tensor: on a 10k-vocabulary 2x256 LSTM it made a batch-1 step
    about 30% slower for no better perplexity, so it is an option, not the default.
    `per_tensor_activations` keeps quantize_dynamic's graph as it is (see the module's doc).
    """
    with tempfile.TemporaryDirectory(prefix="rnnlm-quantize-") as tmp:
        folded, quantized = Path(tmp) / "folded.onnx", Path(tmp) / "int8.onnx"
        # quant_pre_process = ORT_ENABLE_BASIC folding + ONNX shape inference + the metadata
        # that tells quantize_dynamic the graph was prepared. Symbolic shape inference is for
        # transformers and adds nothing to recurrent graphs.
        quant_pre_process(onnx.load_from_string(blob), folded, skip_symbolic_shape=True)
        quantize_dynamic(folded, quantized, per_channel=per_channel, weight_type=QuantType.QInt8)
        int8 = onnx.load(quantized)
        if not per_tensor_activations:
            int8 = rowwise(int8)
        ops = quantized_ops(onnx.load(folded), int8, cell, per_tensor_activations)
        return int8.SerializeToString(), ops


def quantized_ops(
    folded: onnx.ModelProto, int8: onnx.ModelProto, cell: str, per_tensor_activations: bool
) -> dict[str, Any]:
    """Which weight-carrying ops were quantized, to what, and which stayed float, and why."""
    before, left = _weight_ops(folded), _weight_ops(int8)
    names = QUANTIZED_PER_TENSOR_AS if per_tensor_activations else QUANTIZED_AS
    quantized = {op: {"count": n, "as": names.get(op, "int8")} for op, n in (before - left).items()}
    floats = {}
    for op, n in left.items():
        reason = (
            f"onnxruntime has no integer {op} kernel (the {cell} cell), so these layers keep "
            "float32 weights"
            if op in ("GRU", "RNN")
            else "not quantized by onnxruntime.quantization.quantize_dynamic"
        )
        floats[op] = {"count": n, "reason": reason}
    return {"quantized": quantized, "float": floats}


def _weight_ops(model: onnx.ModelProto) -> Counter[str]:
    """Op type -> how many nodes of it have a float initializer as a weight input."""
    floats = {t.name for t in model.graph.initializer if t.data_type in FLOAT_TYPES}
    return Counter(
        node.op_type
        for node in model.graph.node
        if any(
            i < len(node.input) and node.input[i] in floats
            for i in WEIGHT_INPUTS.get(node.op_type, ())
        )
    )


def measure_quality(
    fp32: dict[str, bytes],
    int8: dict[str, bytes],
    ids: list[int],
    state_shapes: list[tuple[int, int]],
) -> dict[str, Any]:
    """Perplexity of the fp32 and int8 graphs on `ids` and how often their top-1 agrees.

    Every graph reads the same ids at batch 1, `EVAL_CHUNK` tokens a call with the state
    carried: the step graphs give perplexity and top-1 (argmax of the logits), the int8 score
    graph its own perplexity, since the server scores with it.
    """
    lp32, top32 = _step_run(_session(fp32["step"]), ids, state_shapes)
    lp8, top8 = _step_run(_session(int8["step"]), ids, state_shapes)
    ppl32, ppl8 = _perplexity(lp32), _perplexity(lp8)
    result: dict[str, Any] = {
        "fp32_perplexity": ppl32,
        "int8_perplexity": ppl8,
        "perplexity_change_percent": 100.0 * (ppl8 / ppl32 - 1.0),
        "top1_agreement": float(np.mean(top32 == top8)),
    }
    if "score" in int8:
        ppl_score = _perplexity(_score_run(_session(int8["score"]), ids, state_shapes))
        result["score_graph_int8_perplexity"] = ppl_score
        result["score_graph_perplexity_change_percent"] = 100.0 * (ppl_score / ppl32 - 1.0)
    return result


def worst_change(quality: dict[str, Any]) -> float:
    """The largest perplexity move of any int8 graph, in percent (absolute value)."""
    keys = ("perplexity_change_percent", "score_graph_perplexity_change_percent")
    return max(abs(quality[k]) for k in keys if k in quality)


def _session(blob: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"])


def _chunks(ids: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    tokens = np.array([ids[:-1]], dtype=np.int64)
    targets = np.array([ids[1:]], dtype=np.int64)
    return [
        (tokens[:, i : i + EVAL_CHUNK], targets[:, i : i + EVAL_CHUNK])
        for i in range(0, tokens.shape[1], EVAL_CHUNK)
    ]


def _zero_state(state_shapes: list[tuple[int, int]]) -> list[np.ndarray]:
    return [np.zeros((layers, 1, hidden), dtype=np.float32) for layers, hidden in state_shapes]


def _step_run(
    session: ort.InferenceSession, ids: list[int], state_shapes: list[tuple[int, int]]
) -> tuple[np.ndarray, np.ndarray]:
    """Log-prob of each target (float64) and the argmax of each step's logits."""
    names = [a.name for a in session.get_inputs()]
    state = _zero_state(state_shapes)
    logprobs, top = [], []
    for tokens, targets in _chunks(ids):
        logits, _, *state = session.run(None, dict(zip(names, [tokens, *state], strict=True)))
        row = logits[0].astype(np.float64)
        peak = row.max(axis=-1, keepdims=True)
        norm = peak[:, 0] + np.log(np.exp(row - peak).sum(axis=-1))
        logprobs.append(row[np.arange(row.shape[0]), targets[0]] - norm)
        top.append(row.argmax(axis=-1))
    return np.concatenate(logprobs), np.concatenate(top)


def _score_run(
    session: ort.InferenceSession, ids: list[int], state_shapes: list[tuple[int, int]]
) -> np.ndarray:
    names = [a.name for a in session.get_inputs()]
    state = _zero_state(state_shapes)
    logprobs = []
    for tokens, targets in _chunks(ids):
        out, *rest = session.run(None, dict(zip(names, [tokens, targets, *state], strict=True)))
        state = rest[-len(state_shapes) :]  # after the features of a current score graph
        logprobs.append(out[0].astype(np.float64))
    return np.concatenate(logprobs)


def _perplexity(logprobs: np.ndarray) -> float:
    return float(np.exp(-logprobs.mean()))
