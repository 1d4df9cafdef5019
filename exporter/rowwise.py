"""int8 graphs whose rows do not depend on each other: activations quantized a row at a time.

onnxruntime's dynamic quantization (`DynamicQuantizeLSTM`, and `DynamicQuantizeLinear` before a
`MatMulInteger`) quantizes a run's activations with one scale for all its rows, so a row's
results move with whatever shares its batch (docs/performance.md, "what is not built yet").
`rowwise` rewrites such a graph, keeping its int8 weights:

    DynamicQuantizeLinear(x) -> MatMulInteger       each row of x its own scale, max|row| / 127,
                                                    uint8 with zero point 128 for every row

    DynamicQuantizeLSTM(X, W, R, B, h0, c0)          the cell written out:
        xg = rows(X) @ W * scales + Wb + Rb          all time steps' input products at once
        Scan over time, from (h0, c0):
            g = rows(h) @ R * scales + xg[t]         the recurrent product, a row at a time
            i, o, f, z = split(g)                    ONNX's gate order
            c = sigmoid(f) * c + sigmoid(i) * tanh(z)
            h = sigmoid(o) * tanh(c)

Each integer product is exact and every other op works element by element or along a row,
so a row's outputs are the same bits in any batch. Only forward LSTMs without peepholes,
sequence lengths, clipping or custom activations are rewritten (what the exporter writes);
anything else is refused by name.

Not yet used by the export: on the shipped word model a step so rewritten costs 1.4 to 1.7
times the original (docs/performance.md says where, and what comes next).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# Shared constants of the row quantization.
_C127, _TINY, _C128 = "rowwise_127", "rowwise_tiny", "rowwise_128"
_ZP_U8, _ZP_I8 = "rowwise_zp_u8", "rowwise_zp_i8"
_AXIS0, _AXIS1 = "rowwise_axis0", "rowwise_axis1"


class RowwiseError(ValueError):
    """A graph holds a quantized op this rewrite does not handle."""


def rowwise(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` (with its weights loaded) with every dynamically quantized LSTM and matrix
    product quantizing its activations a row at a time (a new model)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {t.name: t for t in graph.initializer}
    products = _products(graph, inits)
    replaced = {id(n) for chain in products.values() for n in chain[1]}
    nodes: list[onnx.NodeProto] = []
    added: list[onnx.TensorProto] = []
    for i, node in enumerate(graph.node):
        if node.op_type == "DynamicQuantizeLSTM":
            new, tensors = _lstm(node, inits, f"rowwise{i}")
            nodes += new
            added += tensors
        elif id(node) in products:  # a product's last node: the product written out there
            (x, weight, scale, out_name), _ = products[id(node)]
            nodes += _product(x, weight, scale, out_name, f"rowwise{i}")
        elif id(node) not in replaced:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for n in nodes for name in n.input} | _body_inputs(nodes)
    kept = [t for t in graph.initializer if t.name in used]  # the replaced ops' weights go
    del graph.initializer[:]
    graph.initializer.extend([*kept, *added, *_constants()])
    return out


def _body_inputs(nodes: list[onnx.NodeProto]) -> set[str]:
    """Names the subgraphs of `nodes` read from the enclosing graph (the cells' weights)."""
    names: set[str] = set()
    for node in nodes:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                names |= {name for n in attr.g.node for name in n.input}
    return names


Chain = tuple[tuple[str, str, str, str], list[onnx.NodeProto]]


def _products(graph: onnx.GraphProto, inits: dict[str, onnx.TensorProto]) -> dict[int, Chain]:
    """Each dynamically quantized product, keyed by its last node: quantize_dynamic writes

        DynamicQuantizeLinear(x) -> (xq, xs, xz); MatMulInteger(xq, W, xz, Wz) -> i;
        Cast(i) -> f; Mul(xs, Ws) -> s; Mul(f, s) -> out

    and all five nodes are replaced by `_product(x, W, Ws, out)` (onnxruntime would fuse the
    last three into MatMulIntegerToFloat, which takes a scale a column, not a row)."""
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
        chains[id(last)] = ((x, weight, w_scale, last.output[0]), [quant, mmi, cast, scales, last])
    return chains


def _constants() -> list[onnx.TensorProto]:
    values: dict[str, np.ndarray] = {
        _C127: np.array(127.0, np.float32),
        _TINY: np.array(1e-30, np.float32),
        _C128: np.array(128.0, np.float32),
        _ZP_U8: np.array(128, np.uint8),
        _ZP_I8: np.array(0, np.int8),
        _AXIS0: np.array([0], np.int64),
        _AXIS1: np.array([1], np.int64),
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


def _product(x: str, weight: str, scale: str, out: str, prefix: str) -> list[onnx.NodeProto]:
    """out = x @ weight (int8) * scale, `x` quantized a row at a time."""
    node = helper.make_node
    return [
        *_rows(x, f"{prefix}_xq", f"{prefix}_xs", prefix),
        node("MatMulInteger", [f"{prefix}_xq", weight, _ZP_U8, _ZP_I8], [f"{prefix}_i"]),
        node("Cast", [f"{prefix}_i"], [f"{prefix}_f"], to=TensorProto.FLOAT),
        # The weights' scale first, then the rows': onnxruntime fuses a MatMulInteger, Cast and
        # Mul by the product of two scales into MatMulIntegerToFloat, which takes a scale per
        # column, not per row (the rows' scales there gave wrong logits).
        node("Mul", [f"{prefix}_f", scale], [f"{prefix}_w"]),
        node("Mul", [f"{prefix}_w", f"{prefix}_xs"], [out]),
    ]


def _lstm(
    node: onnx.NodeProto, inits: dict[str, onnx.TensorProto], prefix: str
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """A `DynamicQuantizeLSTM` as the nodes of the written-out cell, and its new weights."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    inputs = list(node.input) + [""] * (12 - len(node.input))
    x, w, r, b, lengths, h0, c0, peepholes, w_scale, w_zero, r_scale, r_zero = inputs
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
        f"{prefix}_ws": array[w_scale].reshape(-1).astype(np.float32),  # one, or one a column
        f"{prefix}_rs": array[r_scale].reshape(-1).astype(np.float32),
        f"{prefix}_b": bias.astype(np.float32),
    }
    tensors = [numpy_helper.from_array(v, name) for name, v in weights.items()]
    make = helper.make_node
    y, y_h, y_c = [*node.output, "", "", ""][:3]
    nodes = [
        *_product(x, f"{prefix}_W", f"{prefix}_ws", f"{prefix}_xw", f"{prefix}_x"),
        make("Add", [f"{prefix}_xw", f"{prefix}_b"], [f"{prefix}_xg"]),  # [T, B, 4H]
        make("Squeeze", [h0, _AXIS0], [f"{prefix}_h0"]),
        make("Squeeze", [c0, _AXIS0], [f"{prefix}_c0"]),
        make(
            "Scan",
            [f"{prefix}_h0", f"{prefix}_c0", f"{prefix}_xg"],
            [f"{prefix}_hT", f"{prefix}_cT", f"{prefix}_ys"],
            num_scan_inputs=1,
            body=_cell(prefix, hidden),
        ),
    ]
    for name, source, axis in ((y, "ys", _AXIS1), (y_h, "hT", _AXIS0), (y_c, "cT", _AXIS0)):
        if name:
            nodes.append(make("Unsqueeze", [f"{prefix}_{source}", axis], [name]))
    return nodes, tensors


def _cell(prefix: str, hidden: int) -> onnx.GraphProto:
    """One time step: (h, c, the step's input gates) -> (h, c, h); the recurrent weights and
    the shared constants are read from the enclosing graph."""
    make, p = helper.make_node, f"{prefix}_cell"
    nodes = [
        *_product("h", f"{prefix}_R", f"{prefix}_rs", f"{p}_hr", p),
        make("Add", [f"{p}_hr", "xg"], [f"{p}_g"]),
        make("Split", [f"{p}_g"], [f"{p}_gi", f"{p}_go", f"{p}_gf", f"{p}_gz"], axis=-1),
        make("Sigmoid", [f"{p}_gi"], [f"{p}_si"]),
        make("Sigmoid", [f"{p}_go"], [f"{p}_so"]),
        make("Sigmoid", [f"{p}_gf"], [f"{p}_sf"]),
        make("Tanh", [f"{p}_gz"], [f"{p}_tz"]),
        make("Mul", [f"{p}_sf", "c"], [f"{p}_fc"]),
        make("Mul", [f"{p}_si", f"{p}_tz"], [f"{p}_iz"]),
        make("Add", [f"{p}_fc", f"{p}_iz"], ["c_next"]),
        make("Tanh", ["c_next"], [f"{p}_tc"]),
        make("Mul", [f"{p}_so", f"{p}_tc"], ["h_next"]),
        make("Identity", ["h_next"], ["h_out"]),
    ]

    def value(name: str, width: int) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["rows", width])

    return helper.make_graph(
        nodes,
        f"{prefix}_step",
        [value("h", hidden), value("c", hidden), value("xg", 4 * hidden)],
        [value("h_next", hidden), value("c_next", hidden), value("h_out", hidden)],
    )
