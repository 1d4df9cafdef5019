"""int8 graphs whose rows do not depend on each other: no activation scale is shared by a run.

onnxruntime's dynamic quantization (`DynamicQuantizeLSTM`, and `DynamicQuantizeLinear` before a
`MatMulInteger`) quantizes a run's activations with one scale for all its rows (and, in an LSTM,
all its time steps), so a row's results move with whatever shares its batch and with how its
context was cut into runs (docs/performance.md, "int8 and batching"). `rowwise` rewrites such a
graph, keeping its int8 weights, so that every integer product reads its activations on a grid
that depends on nothing but the row itself:

    an operand known to lie in [-1, 1]        a fixed grid: QuantizeLinear(x, 1/127, 128)
      (an LSTM's or GRU's hidden state, a       (the hidden state, the layers above the first,
      tanh, through reshapes and slices)         the output layer's features)
    rows of a uint8 table (DequantizeLinear     the table's own integers and scale (the
      of a Gather)                               embedding into the first layer): exact
    anything else                               each row its own scale (max|row| / 127),
                                                uint8 with zero point 128

    DynamicQuantizeLinear(x) -> MatMulInteger   the product of x's operand and the weights:
      -> Cast -> Mul -> Mul                     MatMulIntegerToFloat on a fixed grid, a row's
                                                scale applied after the integer product else

    DynamicQuantizeLSTM(X, W, R, B, h0, c0)     the cell written out:
        xg = X @ W * scales + Wb + Rb           all time steps' input products at once
        Scan over time, from (h0, c0):
            g = q(h) @ R * scales + xg[t]       the recurrent product, h on the fixed grid
            i, o, f = sigmoid(g[:3H]); z = tanh(g[3H:])    (ONNX's gate order)
            c = f * c + i * z;  h = o * tanh(c)

Every integer product is exact and every other op works element by element or along a row, so a
row's outputs are the same bits in any batch, and a context fed in one run or a token at a time
reaches the same state. A state whose h leaves [-1, 1] (none an LSTM makes) is clipped to it.
Only forward LSTMs without peepholes, sequence lengths, clipping or custom activations are
rewritten (what the exporter writes); anything else is refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MS = "com.microsoft"
# Shared constants.
_UNIT, _ZP_U8, _ZP_I8 = "rowwise_unit", "rowwise_zp_u8", "rowwise_zp_i8"
_C127, _TINY, _C128 = "rowwise_127", "rowwise_tiny", "rowwise_128"

# Ops whose outputs hold only values of their (first, or every) input: a bound passes through.
_SHAPE_OPS = {"Squeeze", "Unsqueeze", "Transpose", "Reshape", "Flatten", "Identity", "Slice",
              "Split", "Gather", "Concat", "Expand"}  # fmt: skip
_ALL_INPUTS = {"Concat"}
_TANH_BOUNDED = {"DynamicQuantizeLSTM": 2, "LSTM": 2, "GRU": 2}  # outputs Y and Y_h


class RowwiseError(ValueError):
    """A graph holds a quantized op this rewrite does not handle."""


@dataclass(frozen=True)
class Operand:
    """How an activation enters an integer product: its uint8 tensor, scale and zero point.

    `per_row` when the scale is a column of the rows' own scales (applied after the product)
    rather than one fixed scalar (which `MatMulIntegerToFloat` applies inside it)."""

    quantized: str
    scale: str
    zero: str
    per_row: bool


def rowwise(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` (with its weights loaded) with every dynamically quantized LSTM and matrix
    product reading its activations a row at a time (a new model)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {t.name: t for t in graph.initializer}
    made = {o: n for n in graph.node for o in n.output}
    products = _products(graph, inits)
    replaced = {id(n) for chain in products.values() for n in chain[1]}
    bounded = _unit_bounded(graph)
    nodes: list[onnx.NodeProto] = []
    added: list[onnx.TensorProto] = []
    for i, node in enumerate(graph.node):
        if node.op_type == "DynamicQuantizeLSTM":
            operand, steps = _operand(node.input[0], bounded, made, inits, f"rowwise{i}_x")
            new, tensors = _lstm(node, operand, inits, f"rowwise{i}")
            nodes += steps + new
            added += tensors
        elif id(node) in products:  # a product's last node: the product written out there
            (x, weight, scale, out_name, bias), _ = products[id(node)]
            operand, steps = _operand(x, bounded, made, inits, f"rowwise{i}")
            nodes += steps + _product(operand, weight, scale, out_name, f"rowwise{i}", bias)
        elif id(node) not in replaced:
            nodes.append(node)
    nodes = _live(nodes, _graph_outputs(graph))
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for n in nodes for name in n.input} | _body_inputs(nodes)
    # The replaced ops' weights and the constants no node reads go.
    shared = [t for t in _constants() if t.name not in inits]  # once, if rewritten before
    tensors = [*graph.initializer, *added, *shared]
    del graph.initializer[:]
    graph.initializer.extend(t for t in tensors if t.name in used)
    if not any(o.domain == MS for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(MS, 1))
    return out


def _live(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """`nodes` without those whose outputs nothing reads (the embedding's `DequantizeLinear`
    once its integers enter the first layer as they are)."""
    needed, kept = set(outputs), []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed |= set(node.input) | _body_inputs([node])
    return kept[::-1]


def _unit_bounded(graph: onnx.GraphProto) -> set[str]:
    """Names whose values lie in [-1, 1]: the hidden states recurrent layers output, tanh and
    sigmoid, and what shape ops make of them (graph nodes are in topological order)."""
    bounded: set[str] = set()
    for node in graph.node:
        op = node.op_type
        if op in _TANH_BOUNDED or (op == "RNN" and _tanh_rnn(node)):
            bounded |= {o for o in node.output[: _TANH_BOUNDED.get(op, 2)] if o}
        elif op in ("Tanh", "Sigmoid"):
            bounded.add(node.output[0])
        elif op in _SHAPE_OPS:
            data = [i for i in node.input if i] if op in _ALL_INPUTS else node.input[:1]
            if data and all(i in bounded for i in data):
                bounded |= {o for o in node.output if o}
    return bounded


def _tanh_rnn(node: onnx.NodeProto) -> bool:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return all(a == b"Tanh" for a in attrs.get("activations", [b"Tanh"]))


def _operand(
    x: str,
    bounded: set[str],
    made: dict[str, onnx.NodeProto],
    inits: dict[str, onnx.TensorProto],
    prefix: str,
) -> tuple[Operand, list[onnx.NodeProto]]:
    """How `x` enters an integer product, and the nodes that quantize it."""
    source = made.get(x)
    if source is not None and source.op_type == "DequantizeLinear" and _table(source, made, inits):
        q, scale, zero = source.input[:3]
        return Operand(q, scale, zero, per_row=False), []
    if x in bounded:
        q = f"{prefix}_q"
        return Operand(q, _UNIT, _ZP_U8, per_row=False), [
            helper.make_node("QuantizeLinear", [x, _UNIT, _ZP_U8], [q])
        ]
    q, scale = f"{prefix}_q", f"{prefix}_s"
    return Operand(q, scale, _ZP_U8, per_row=True), _rows(x, q, scale, prefix)


def _table(
    dequantize: onnx.NodeProto, made: dict[str, onnx.NodeProto], inits: dict[str, onnx.TensorProto]
) -> bool:
    """Whether `dequantize` reads rows of a uint8 initializer with one scalar scale and zero
    point (the quantized embedding): its integers can then enter a product as they are."""
    scale, zero = [*dequantize.input[1:3], "", ""][:2]
    if not all(n in inits and not inits[n].dims for n in (scale, zero)):
        return False
    name = dequantize.input[0]
    while name not in inits:
        node = made.get(name)
        if node is None or node.op_type not in _SHAPE_OPS - _ALL_INPUTS:
            return False
        name = node.input[0]
    return inits[name].data_type == TensorProto.UINT8


def _body_inputs(nodes: list[onnx.NodeProto]) -> set[str]:
    """Names the subgraphs of `nodes` read from the enclosing graph (the cells' weights)."""
    names: set[str] = set()
    for node in nodes:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                names |= {name for n in attr.g.node for name in n.input}
    return names


Chain = tuple[tuple[str, str, str, str, str], list[onnx.NodeProto]]


def _products(graph: onnx.GraphProto, inits: dict[str, onnx.TensorProto]) -> dict[int, Chain]:
    """Each dynamically quantized product, keyed by its last node: quantize_dynamic writes

        DynamicQuantizeLinear(x) -> (xq, xs, xz); MatMulInteger(xq, W, xz, Wz) -> i;
        Cast(i) -> f; Mul(xs, Ws) -> s; Mul(f, s) -> out

    and all five nodes are replaced by `_product(x's operand, W, Ws, out)`; an `Add` of a
    constant bias vector to `out` (the output layer's) is folded into it, as onnxruntime's own
    fusion of the original does (on `[64, V]` logits it costs a tenth of the step alone)."""
    made = {o: n for n in graph.node for o in n.output}
    uses: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for name in n.input:
            uses.setdefault(name, []).append(n)
    chains: dict[int, Chain] = {}
    for quant in (n for n in graph.node if n.op_type == "DynamicQuantizeLinear"):
        x, (xq, xs, _) = quant.input[0], quant.output
        try:
            (mmi,) = uses[xq]
            (cast,) = uses[mmi.output[0]]
            (last,) = uses[cast.output[0]]
            scales = made[next(i for i in last.input if i != cast.output[0])]
        except (KeyError, ValueError, StopIteration):
            raise RowwiseError(
                f"{quant.name or x}: not the pattern quantize_dynamic writes"
            ) from None
        weight, weight_zero = mmi.input[1], mmi.input[3] if len(mmi.input) > 3 else ""
        if weight_zero and np.any(numpy_helper.to_array(inits[weight_zero])):
            raise RowwiseError(f"{mmi.name or weight}: weights with a nonzero zero point")
        (w_scale,) = [i for i in scales.input if i != xs]
        nodes, out, bias = [quant, mmi, cast, scales, last], last.output[0], ""
        add = uses.get(out, [])
        if len(add) == 1 and add[0].op_type == "Add" and out not in _graph_outputs(graph):
            (other,) = [i for i in add[0].input if i != out] or [""]
            if other in inits and len(inits[other].dims) == 1:
                nodes, out, bias = [*nodes, add[0]], add[0].output[0], other
        chains[id(nodes[-1])] = ((x, weight, w_scale, out, bias), nodes)
    return chains


def _graph_outputs(graph: onnx.GraphProto) -> set[str]:
    return {o.name for o in graph.output}


def _constants() -> list[onnx.TensorProto]:
    values: dict[str, np.ndarray] = {
        _UNIT: np.array(1.0 / 127.0, np.float32),
        _C127: np.array(127.0, np.float32),
        _TINY: np.array(1e-30, np.float32),
        _C128: np.array(128.0, np.float32),
        _ZP_U8: np.array(128, np.uint8),
        _ZP_I8: np.array(0, np.int8),
    }
    return [numpy_helper.from_array(v, name) for name, v in values.items()]


def _rows(x: str, quantized: str, scale: str, prefix: str) -> list[onnx.NodeProto]:
    """`x` quantized along its last axis, a row at a time: `quantized` (uint8, zero point 128)
    and `scale` (the row's largest magnitude / 127, the last axis kept as 1)."""
    n = [f"{prefix}_q{i}" for i in range(6)]
    node = helper.make_node
    return [
        node("Abs", [x], [n[0]]),
        node("ReduceMax", [n[0]], [n[1]], axes=[-1], keepdims=1),
        node("Div", [n[1], _C127], [n[2]]),
        node("Max", [n[2], _TINY], [scale]),  # an all-zero row still divides
        node("Div", [x, scale], [n[3]]),
        node("Round", [n[3]], [n[4]]),
        node("Add", [n[4], _C128], [n[5]]),
        node("Cast", [n[5]], [quantized], to=TensorProto.UINT8),
    ]


def _product(
    x: Operand, weight: str, scale: str, out: str, prefix: str, bias: str = ""
) -> list[onnx.NodeProto]:
    """out = x @ weight (int8) * scales (+ bias)."""
    node = helper.make_node
    if not x.per_row:
        inputs = [x.quantized, weight, x.scale, scale, x.zero, _ZP_I8] + ([bias] if bias else [])
        return [node("MatMulIntegerToFloat", inputs, [out], domain=MS)]
    last = f"{prefix}_r" if bias else out
    return [
        node("MatMulInteger", [x.quantized, weight, x.zero, _ZP_I8], [f"{prefix}_i"]),
        node("Cast", [f"{prefix}_i"], [f"{prefix}_f"], to=TensorProto.FLOAT),
        # The weights' scale first, then the rows': onnxruntime fuses a MatMulInteger, Cast and
        # Mul by the product of two scales into MatMulIntegerToFloat, which takes a scale per
        # column, not per row (the rows' scales there gave wrong logits).
        node("Mul", [f"{prefix}_f", scale], [f"{prefix}_w"]),
        node("Mul", [f"{prefix}_w", x.scale], [last]),
        *([node("Add", [last, bias], [out])] if bias else []),
    ]


def _lstm(
    node: onnx.NodeProto, x: Operand, inits: dict[str, onnx.TensorProto], prefix: str
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """A `DynamicQuantizeLSTM` whose input enters as `x`: the nodes of the written-out cell,
    and its new weights."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    inputs = list(node.input) + [""] * (12 - len(node.input))
    _, w, r, b, lengths, h0, c0, peepholes, w_scale, w_zero, r_scale, r_zero = inputs
    unsupported = [
        name
        for name, bad in (
            ("a direction other than forward", attrs.get("direction", b"forward") != b"forward"),
            ("activations", "activations" in attrs),
            ("clip", "clip" in attrs),
            ("input_forget", attrs.get("input_forget", 0) != 0),
            ("sequence_lens", bool(lengths)),
            ("peepholes", bool(peepholes)),
            ("no initial state", not (h0 and c0)),
            ("weights that are not initializers", not all(n in inits for n in (w, r, b))),
        )
        if bad
    ]
    array = {
        n: numpy_helper.to_array(inits[n]) for n in (w, r, b, w_scale, w_zero, r_scale, r_zero) if n
    }
    if any(np.any(array[z]) for z in (w_zero, r_zero) if z):
        unsupported.append("weights with a nonzero zero point")
    if unsupported:
        raise RowwiseError(f"{node.name or node.op_type}: cannot rewrite {', '.join(unsupported)}")
    hidden = int(attrs["hidden_size"])
    bias = array[b][0, : 4 * hidden] + array[b][0, 4 * hidden :]
    weights = {
        f"{prefix}_W": array[w][0],  # [in, 4H]
        f"{prefix}_R": array[r][0],  # [H, 4H]
        f"{prefix}_ws": _column_scales(array[w_scale]),
        f"{prefix}_rs": _column_scales(array[r_scale]),
        f"{prefix}_b": bias.astype(np.float32),
        f"{prefix}_split": np.array([3 * hidden, hidden], np.int64),
    }
    tensors = [numpy_helper.from_array(v, name) for name, v in weights.items()]
    # The Scan's states and outputs keep the LSTM's direction axis: h and c [1, B, H], each
    # step's h [1, B, H] (Y [T, 1, B, H]), so no reshaping op surrounds it.
    y, y_h, y_c = (name or f"{prefix}_{kind}" for name, kind in
                   zip([*node.output, "", "", ""][:3], ("y", "hT", "cT"), strict=True))  # fmt: skip
    nodes = [
        *_product(x, f"{prefix}_W", f"{prefix}_ws", f"{prefix}_xg", f"{prefix}_x", f"{prefix}_b"),
        helper.make_node(
            "Scan",
            [h0, c0, f"{prefix}_xg"],  # xg: [T, B, 4H]
            [y_h, y_c, y],
            num_scan_inputs=1,
            body=_cell(prefix, hidden),
        ),
    ]
    return nodes, tensors


def _column_scales(scale: np.ndarray) -> np.ndarray:
    """An LSTM weight's scale (one per tensor, or one per gate row) as `MatMulIntegerToFloat`
    takes it: a scalar, or one a column of the transposed weights."""
    flat = scale.reshape(-1).astype(np.float32)
    return flat.reshape(()) if flat.size == 1 else flat


def _cell(prefix: str, hidden: int) -> onnx.GraphProto:
    """One time step: (h, c [1, B, H], the step's input gates [B, 4H]) -> (h, c, h); the
    recurrent weights and the shared constants are read from the enclosing graph."""
    make, p = helper.make_node, f"{prefix}_cell"
    h = Operand(f"{p}_hq", _UNIT, _ZP_U8, per_row=False)
    nodes = [
        make("QuantizeLinear", ["h", _UNIT, _ZP_U8], [h.quantized]),
        *_product(h, f"{prefix}_R", f"{prefix}_rs", f"{p}_hr", p),
        make("Add", [f"{p}_hr", "xg"], [f"{p}_g"]),
        make("Split", [f"{p}_g", f"{prefix}_split"], [f"{p}_gs", f"{p}_gz"], axis=-1),
        make("Sigmoid", [f"{p}_gs"], [f"{p}_s"]),
        make("Split", [f"{p}_s"], [f"{p}_si", f"{p}_so", f"{p}_sf"], axis=-1),
        make("Tanh", [f"{p}_gz"], [f"{p}_tz"]),
        make("Mul", [f"{p}_sf", "c"], [f"{p}_fc"]),
        make("Mul", [f"{p}_si", f"{p}_tz"], [f"{p}_iz"]),
        make("Add", [f"{p}_fc", f"{p}_iz"], ["c_next"]),
        make("Tanh", ["c_next"], [f"{p}_tc"]),
        make("Mul", [f"{p}_so", f"{p}_tc"], ["h_next"]),
        make("Identity", ["h_next"], ["h_out"]),
    ]

    def value(name: str, *shape: int | str) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))

    state = (1, "rows", hidden)
    return helper.make_graph(
        nodes,
        f"{prefix}_step",
        [value("h", *state), value("c", *state), value("xg", "rows", 4 * hidden)],
        [value("h_next", *state), value("c_next", *state), value("h_out", *state)],
    )
