"""`rnnlm import onnx`: any ONNX RNN LM with its state as inputs and outputs.

The source graph takes one token per row (`[N, 1]` int64, as k2-fsa icefall's `with-state`
exports and sherpa-onnx run them: inputs `x`, `h0`, `c0`; outputs `log_softmax`, `next_h0`,
`next_c0`) and its states `[layers, N, hidden]`, and returns next-token logits or log-probs
(`[N, V]` or `[N, 1, V]`) and the next states. The server feeds prompts and documents many
tokens per row, so the bundle's graphs wrap the source graph, unchanged, as the body of an ONNX
`Scan` over the time axis:

- step: `tokens [B, T]`, states -> `logits [B, T, V]` (the source's output: logits or
  log-probs, which the server normalises the same), `features [B, T, H]`, final states;
- prefill: the same without `logits`;
- score: `tokens`, `targets [B, T]`, states -> `target_logprobs [B, T]` (log-softmax of the
  output, gathered at the targets), `features`, final states.

`features` (what Embed pools) is the last layer of the first state after each token: for an
LSTM's `h`, a GRU's or an Elman RNN's state, that is the last layer's output. The source's
weights are lifted out of the body into the outer graph, so the three graphs share one copy
(`weights.bin`). The source itself, run one token per call in onnxruntime, is the parity
reference.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper
from tokenizers import Tokenizer

from importers.errors import ImportFailure
from importers.write import Imported, read_text, source_record
from rnnlm.bundle import GRAPH_KINDS, graph_io, state_specs
from training.model import ModelConfig

FORMAT = "onnx"
MIN_OPSET = 11  # Scan's axis attributes, GatherElements, negative Gather indices
PREFIX = "source/"  # every name of the source graph, inside the Scan body
KINDS = {"WordLevel": "word", "BPE": "bpe"}


@dataclass(frozen=True)
class OnnxSpec:
    """Which of the source graph's inputs and outputs are which."""

    tokens: str
    output: str
    log_probs: bool
    states: tuple[tuple[str, str], ...]  # (input, output) per state, h first
    eos_id: int | None = None
    cell: str | None = None
    tokenizer_kind: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> OnnxSpec:
        states = []
        for pair in args.state:
            names = pair.split(":")
            if len(names) != 2 or not all(names):
                raise ImportFailure(f"--state {pair[:80]!r} must be INPUT:OUTPUT")
            states.append((names[0], names[1]))
        return cls(
            tokens=args.tokens,
            output=args.logits or args.log_probs,
            log_probs=args.log_probs is not None,
            states=tuple(states),
            eos_id=args.eos_id,
            cell=args.cell,
            tokenizer_kind=args.tokenizer_kind,
        )


def import_onnx(
    model_path: Path, tokenizer_path: Path, spec: OnnxSpec, test_text: Path | None = None
) -> Imported:
    """Read and wrap an ONNX RNN LM; nothing is written here."""
    source = _load(model_path)
    layers, hidden = _check_io(model_path, source.graph, spec)
    tok = _tokenizer(tokenizer_path)
    vocab = _vocab(model_path, source.graph, spec, tok)
    cell = _cell(spec)
    eos = _eos(model_path, source, spec, vocab)
    ids = None
    if test_text is not None:
        try:
            ids = tok.encode(read_text(test_text)).ids
        except Exception as e:  # tokenizers raises a bare Exception (a word without an id)
            raise ImportFailure(f"{test_text}: the tokenizer cannot encode it ({e})") from e
    config = ModelConfig(cell=cell, vocab_size=vocab, embedding=hidden, hidden=hidden,
                         layers=layers)  # fmt: skip
    blobs = {kind: wrap(source, spec, kind, config) for kind in GRAPH_KINDS}
    details = {"inputs": [spec.tokens, *(i for i, _ in spec.states)],
               "outputs": [spec.output, *(o for _, o in spec.states)],
               "output_is": "log-probs" if spec.log_probs else "logits",
               "metadata": {p.key: p.value[:200] for p in source.metadata_props}}  # fmt: skip
    kind = spec.tokenizer_kind or KINDS.get(type(tok.model).__name__)
    if kind is None:
        raise ImportFailure(
            f"{tokenizer_path}: a {type(tok.model).__name__} tokenizer; pass --tokenizer-kind"
        )
    return Imported(
        source_path=model_path,
        source=source_record(FORMAT, model_path, tokenizer=str(tokenizer_path), **details),
        config=config,
        blobs=blobs,
        reference=source_reference(source.SerializeToString(), spec),
        tokenizer=tok,
        tokenizer_kind=kind,
        special_tokens={"eos": eos},
        real_ids=ids or [],
        test_ids=ids or None,
        test_file=None if test_text is None else str(test_text.resolve()),
        architecture={"embedding": None, "tied": None},
        exporter="the source graph, unchanged, as the body of an ONNX Scan over time",
        optional_graphs=True,
        notes=[
            f"{spec.output} is the next-token {details['output_is']}; features are the "
            f"last layer of {spec.states[0][1]}",
            *([] if ids else ["no --test-text: parity ran on random tokens only"]),
        ],
    )


def _load(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        raise ImportFailure(f"{path}: no such file")
    try:
        model = onnx.load(str(path))
    except Exception as e:  # onnx raises several types for a damaged file
        raise ImportFailure(f"{path}: not an ONNX model ({str(e)[:200]})") from e
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise ImportFailure(f"{path}: opset {opset}; re-export it with opset >= {MIN_OPSET}")
    return model


def _dims(value: onnx.ValueInfoProto) -> list[int | None]:
    shape = value.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else None for d in shape.dim]


def _check_io(path: Path, graph: onnx.GraphProto, spec: OnnxSpec) -> tuple[int, int]:
    """The states' (layers, hidden); every named input and output exists with the right type."""
    weights = {t.name for t in graph.initializer}  # listed as inputs too before IR 4
    inputs = {v.name: v for v in graph.input if v.name not in weights}
    outputs = {v.name: v for v in graph.output}
    for name in inputs:
        if name not in {spec.tokens, *(i for i, _ in spec.states)}:
            raise ImportFailure(f"{path}: input {name[:80]!r} is neither --tokens nor a --state")
    for name, table, kind in [(spec.tokens, inputs, "input"), (spec.output, outputs, "output"),
                              *((i, inputs, "input") for i, _ in spec.states),
                              *((o, outputs, "output") for _, o in spec.states)]:  # fmt: skip
        if name not in table:
            raise ImportFailure(f"{path}: has no {kind} {name[:80]!r} (it has {sorted(table)})")
    if inputs[spec.tokens].type.tensor_type.elem_type != TensorProto.INT64:
        raise ImportFailure(f"{path}: --tokens {spec.tokens!r} must be int64")
    if outputs[spec.output].type.tensor_type.elem_type != TensorProto.FLOAT:
        raise ImportFailure(f"{path}: output {spec.output!r} must be float32")
    shapes = set()
    for name, out in spec.states:
        dims = _dims(inputs[name])
        if len(dims) != 3 or dims[0] is None or dims[2] is None:
            raise ImportFailure(
                f"{path}: state {name!r} has shape {dims}; expected [layers, batch, hidden] "
                "with fixed layers and hidden"
            )
        for n in (name, out):
            value = inputs.get(n) or outputs[n]
            if value.type.tensor_type.elem_type != TensorProto.FLOAT:
                raise ImportFailure(f"{path}: state {n!r} must be float32")
        shapes.add((dims[0], dims[2]))
    if len(shapes) != 1:
        raise ImportFailure(
            f"{path}: the states have shapes {sorted(shapes)} (layers, hidden); a bundle "
            "holds states of one shape"
        )
    ((layers, hidden),) = shapes
    return layers, hidden


def _tokenizer(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for a bad file
        raise ImportFailure(f"{path}: not a tokenizers file ({str(e)[:200]})") from e


def _vocab(path: Path, graph: onnx.GraphProto, spec: OnnxSpec, tok: Tokenizer) -> int:
    output = next(v for v in graph.output if v.name == spec.output)
    dims = _dims(output)
    size = tok.get_vocab_size(with_added_tokens=True)
    if dims and dims[-1] is not None and dims[-1] != size:
        raise ImportFailure(
            f"{path}: {spec.output!r} scores {dims[-1]} tokens but the tokenizer has {size}"
        )
    return size


def _cell(spec: OnnxSpec) -> str:
    if len(spec.states) == 2:
        if spec.cell not in (None, "lstm"):
            raise ImportFailure(f"two states make an lstm, not {spec.cell}")
        return "lstm"
    if len(spec.states) != 1:
        raise ImportFailure(f"{len(spec.states)} --state pairs; a bundle holds one or two (LSTM)")
    if spec.cell in (None, "lstm"):
        raise ImportFailure("one state: pass --cell gru, rnn_tanh or rnn_relu")
    return spec.cell


def _eos(path: Path, model: onnx.ModelProto, spec: OnnxSpec, vocab: int) -> int:
    meta = {p.key: p.value for p in model.metadata_props}
    eos = spec.eos_id
    if eos is None:
        if not meta.get("eos_id", "").strip().isdigit():
            raise ImportFailure(f"{path}: has no eos_id metadata; pass --eos-id")
        eos = int(meta["eos_id"])
    if not 0 <= eos < vocab:
        raise ImportFailure(f"eos id {eos} is not below the vocabulary size {vocab}")
    return eos


def _rename(graph: onnx.GraphProto, name: Callable[[str], str]) -> None:
    """Apply `name` to every value name of `graph` and of the graphs its nodes hold."""
    for value in [*graph.input, *graph.output, *graph.value_info, *graph.initializer]:
        value.name = name(value.name)
    for sparse in graph.sparse_initializer:
        sparse.values.name = name(sparse.values.name)
        sparse.indices.name = name(sparse.indices.name)
    for node in graph.node:
        node.input[:] = [name(n) for n in node.input]
        node.output[:] = [name(n) for n in node.output]
        for attr in node.attribute:
            for sub in [attr.g, *attr.graphs] if attr.HasField("g") else attr.graphs:
                _rename(sub, name)


def _const(name: str, values: list[int], scalar: bool = False) -> onnx.NodeProto:
    tensor = helper.make_tensor(name, TensorProto.INT64, [] if scalar else [len(values)], values)
    return helper.make_node("Constant", [], [name], value=tensor)


def _body(
    source: onnx.GraphProto, spec: OnnxSpec, kind: str
) -> tuple[onnx.GraphProto, list[onnx.TensorProto], list[onnx.SparseTensorProto]]:
    """The Scan body: states and one column of tokens (and targets) in; the source's nodes;
    the next states, then this step's outputs for the kind of graph. The source's weights are
    returned apart, for the outer graph (the body reads them from there)."""
    graph = onnx.GraphProto()
    graph.CopyFrom(source)
    _rename(graph, lambda n: PREFIX + n if n else n)
    p = PREFIX
    states_in = [helper.make_tensor_value_info(p + i, TensorProto.FLOAT, None)
                 for i, _ in spec.states]  # fmt: skip
    scans = [helper.make_tensor_value_info("token_t", TensorProto.INT64, ["batch"])]
    nodes = [
        _const("column", [-1, 1]),
        _const("rows", [0, -1]),
        _const("last", [-1], scalar=True),
        helper.make_node("Reshape", ["token_t", "column"], [p + spec.tokens]),
        *graph.node,
        helper.make_node("Reshape", [p + spec.output, "rows"], ["logits_t"]),
        helper.make_node("Gather", [p + spec.states[0][1], "last"], ["features_t"], axis=0),
    ]
    outs = {"step": ["logits_t", "features_t"], "prefill": ["features_t"],
            "score": ["picked_t", "features_t"]}[kind]  # fmt: skip
    if kind == "score":
        scans.append(helper.make_tensor_value_info("target_t", TensorProto.INT64, ["batch"]))
        nodes += [
            _const("flat", [-1]),
            helper.make_node("LogSoftmax", ["logits_t"], ["logprobs_t"], axis=1),
            helper.make_node("Reshape", ["target_t", "column"], ["target_col"]),
            helper.make_node("GatherElements", ["logprobs_t", "target_col"], ["picked"], axis=1),
            helper.make_node("Reshape", ["picked", "flat"], ["picked_t"]),
        ]
    body = helper.make_graph(
        nodes,
        f"{kind}_body",
        states_in + scans,
        [helper.make_tensor_value_info(p + o, TensorProto.FLOAT, None) for _, o in spec.states]
        + [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs],
    )
    body.value_info.extend(graph.value_info)
    return body, list(graph.initializer), list(graph.sparse_initializer)


def wrap(source: onnx.ModelProto, spec: OnnxSpec, kind: str, config: ModelConfig) -> bytes:
    """The bundle graph `kind` ("step", "prefill" or "score"): a Scan over the source graph,
    with the inputs and outputs the bundle contract names."""
    body, weights, sparse = _body(source.graph, spec, kind)
    vocab, layers, hidden = config.vocab_size, config.layers, config.hidden
    state = state_specs(config.cell, layers, hidden)
    inputs, outputs = graph_io(kind, state)
    data_in, state_in = inputs[: -len(state)], [s.input for s in state]
    data_out, state_out = outputs[: -len(state)], [s.output for s in state]
    scan = helper.make_node(
        "Scan",
        state_in + data_in,
        state_out + data_out,
        body=body,
        num_scan_inputs=len(data_in),
        scan_input_axes=[1] * len(data_in),
        scan_output_axes=[1] * len(data_out),
    )
    dims: dict[str, list[str | int | None]] = {
        "logits": ["batch", "time", vocab],
        "features": ["batch", "time", hidden],
        "target_logprobs": ["batch", "time"],
    }
    state_dims: list[str | int | None] = [layers, "batch", hidden]
    graph = helper.make_graph(
        [scan],
        f"rnnlm_import_{kind}",
        [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "time"]) for n in data_in]
        + [helper.make_tensor_value_info(n, TensorProto.FLOAT, state_dims) for n in state_in],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, dims[n]) for n in data_out]
        + [helper.make_tensor_value_info(n, TensorProto.FLOAT, state_dims) for n in state_out],
        initializer=weights,
        sparse_initializer=sparse,
    )
    model = helper.make_model(graph, opset_imports=list(source.opset_import))
    model.ir_version = source.ir_version
    model.functions.extend(source.functions)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise ImportFailure(
            f"the {kind} graph made around the source is invalid ({str(e)[:200]})"
        ) from e
    return model.SerializeToString()


def source_reference(blob: bytes, spec: OnnxSpec) -> Callable[..., tuple]:
    """The source graph in onnxruntime, fed one token per call, as a parity `Reference`."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
    outputs = [spec.output, *(o for _, o in spec.states)]
    state_in = [i for i, _ in spec.states]

    def reference(
        tokens: np.ndarray, state: tuple[np.ndarray, ...]
    ) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, ...]]:
        logits, features = [], []
        for t in range(tokens.shape[1]):
            feed = {spec.tokens: tokens[:, t : t + 1], **dict(zip(state_in, state, strict=True))}
            out, *rest = session.run(outputs, feed)
            state = tuple(rest)
            logits.append(out.reshape(tokens.shape[0], -1))
            features.append(state[0][-1])
        return np.stack(logits, 1), np.stack(features, 1), state

    return reference
