"""Whether a bundle's results depend on what shares a batch, and what a per-row int8 decoder costs.

An int8 bundle's graphs quantize their activations per tensor at run time (`DynamicQuantizeLSTM`,
`DynamicQuantizeMatMul`): one scale for every row of a run, so a row's log-probs move with the
other rows of its batch. This prints, for `--bundle`, how many of 8 seeded generations of 100
tokens are the same alone and among 64 streams (and where the first differs); then, on random
weights of the word model's decoder shape, a row's output alone against in a batch of 64 and the
CPU a run for onnxruntime's `DynamicQuantizeMatMul` and for a decoder quantized a row at a time
(each row's own scale, zero point 128, `MatMulInteger`: its integer products are exact, so a row's
output is the same in any batch); then the same for one step of one LSTM layer of the word
model's shape: `DynamicQuantizeLSTM` against the cell written out with its two products
quantized a row at a time and its gates element-wise:

    PYTHONPATH=. python scripts/int8_batch_probe.py --bundle models/shakespeare-word
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from server.bundle import load_bundle
from server.engine import Engine, EngineConfig, SamplingParams

K, N = 200, 10_000  # the shipped word model's decoder: hidden 200, vocabulary 10,000


async def _generation(engine: Engine, seed: int, tokens: int = 100) -> list[int]:
    generation = engine.generate([], tokens, SamplingParams(seed=seed, temperature=1.0))
    out = []
    async for token in generation:
        out += [token.token_id] + [t.token_id for t in generation.take_ready()]
    return out


async def seeded(bundle_dir: Path) -> None:
    engine = Engine(load_bundle(bundle_dir), EngineConfig())
    await engine.start()
    try:
        alone = [await _generation(engine, seed) for seed in range(8)]
        crowd = await asyncio.gather(*(_generation(engine, seed) for seed in range(64)))
    finally:
        await engine.close()
    first = [
        next((i for i, (x, y) in enumerate(zip(a, c, strict=True)) if x != y), None)
        for a, c in zip(alone, crowd[:8], strict=True)
    ]
    same = sum(f is None for f in first)
    print(
        f"{bundle_dir}: {same} of 8 seeded generations the same alone and among 64; "
        f"the first token that differs: {first}"
    )


def _graph(nodes: list, inits: list) -> bytes:
    graph = helper.make_graph(
        nodes,
        "decoder",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["B", K])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["B", N])],
        inits,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def decoders() -> dict[str, bytes]:
    """DynamicQuantizeMatMul, and the same int8 weights with a scale a row of A."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((K, N)) * 0.05).astype(np.float32)
    w_scale = np.float32(np.abs(w).max() / 127)
    arrays = {
        "Wq": np.clip(np.round(w / w_scale), -127, 127).astype(np.int8),
        "ws": np.array(w_scale, np.float32),
        "wz": np.array(0, np.int8),
        "bias": (rng.standard_normal(N) * 0.1).astype(np.float32),
    }
    inits = [numpy_helper.from_array(a, name) for name, a in arrays.items()]
    node = helper.make_node
    dynamic = [
        node(
            "DynamicQuantizeMatMul", ["A", "Wq", "ws", "wz", "bias"], ["Y"], domain="com.microsoft"
        )
    ]
    consts = {
        "c127": np.array(127.0, np.float32),
        "tiny": np.array(1e-30, np.float32),
        "c128": np.array(128.0, np.float32),
        "az": np.array(128, np.uint8),
    }
    per_row = [
        node("Abs", ["A"], ["abs"]),
        node("ReduceMax", ["abs"], ["top"], axes=[1], keepdims=1),
        node("Div", ["top", "c127"], ["s0"]),
        node("Max", ["s0", "tiny"], ["s"]),  # a row's scale
        node("Div", ["A", "s"], ["a0"]),
        node("Round", ["a0"], ["a1"]),
        node("Add", ["a1", "c128"], ["a2"]),
        node("Cast", ["a2"], ["Aq"], to=TensorProto.UINT8),
        node("MatMulInteger", ["Aq", "Wq", "az", "wz"], ["Yi"]),
        node("Cast", ["Yi"], ["Yf"], to=TensorProto.FLOAT),
        node("Mul", ["s", "ws"], ["sw"]),
        node("Mul", ["Yf", "sw"], ["Ys"]),
        node("Add", ["Ys", "bias"], ["Y"]),
    ]
    const_inits = [numpy_helper.from_array(a, name) for name, a in consts.items()]
    return {
        "DynamicQuantizeMatMul": _graph(dynamic, inits),
        "a scale a row": _graph(per_row, inits + const_inits),
    }


def _row_quantized(x: str, tag: str) -> list:
    """Nodes quantizing `x` [rows, K] a row at a time into `{tag}q` (uint8, zero point "az"
    = 128) with its scales `{tag}s` [rows, 1] (constants "c127", "tiny", "c128")."""
    node = helper.make_node
    names = [f"{tag}_{i}" for i in range(6)]
    return [
        node("Abs", [x], [names[0]]),
        node("ReduceMax", [names[0]], [names[1]], axes=[1], keepdims=1),
        node("Div", [names[1], "c127"], [names[2]]),
        node("Max", [names[2], "tiny"], [f"{tag}s"]),
        node("Div", [x, f"{tag}s"], [names[3]]),
        node("Round", [names[3]], [names[4]]),
        node("Add", [names[4], "c128"], [names[5]]),
        node("Cast", [names[5]], [f"{tag}q"], to=TensorProto.UINT8),
    ]


def cells() -> dict[str, tuple[bytes, bool]]:
    """One LSTM layer step on [rows, K] inputs (x, h0, c0), onnxruntime's kernel and the cell
    written out, with the same int8 weights; each with whether it is onnxruntime's kernel
    (whose inputs have a time axis, and whose first output is y)."""
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((4 * K, K)) * 0.08).astype(np.float32)  # ONNX's [4H, in], gates iofc
    r = (rng.standard_normal((4 * K, K)) * 0.08).astype(np.float32)
    bias = (rng.standard_normal(8 * K) * 0.1).astype(np.float32)
    w_scale, r_scale = np.float32(np.abs(w).max() / 127), np.float32(np.abs(r).max() / 127)
    wq = np.clip(np.round(w / w_scale), -127, 127).astype(np.int8)
    rq = np.clip(np.round(r / r_scale), -127, 127).astype(np.int8)
    node, f = helper.make_node, TensorProto.FLOAT
    value = helper.make_tensor_value_info
    kernel = helper.make_graph(
        [
            node(
                "DynamicQuantizeLSTM",
                ["x", "W", "R", "B", "", "h0", "c0", "", "ws", "wz", "rs", "rz"],
                ["y", "h", "c"],
                domain="com.microsoft",
                hidden_size=K,
            )
        ],
        "kernel",
        [value(n, f, [1, "B", K]) for n in ("x", "h0", "c0")],
        [value("y", f, [1, 1, "B", K]), value("h", f, [1, "B", K]), value("c", f, [1, "B", K])],
        [
            numpy_helper.from_array(wq.T[None].copy(), "W"),
            numpy_helper.from_array(rq.T[None].copy(), "R"),
            numpy_helper.from_array(bias[None], "B"),
            numpy_helper.from_array(np.array([w_scale], np.float32), "ws"),
            numpy_helper.from_array(np.array([0], np.int8), "wz"),
            numpy_helper.from_array(np.array([r_scale], np.float32), "rs"),
            numpy_helper.from_array(np.array([0], np.int8), "rz"),
        ],
    )
    gates = [
        node("MatMulInteger", ["xq", "Wt", "az", "z8"], ["xi"]),
        node("MatMulInteger", ["hq", "Rt", "az", "z8"], ["hi"]),
        node("Cast", ["xi"], ["xf"], to=f),
        node("Cast", ["hi"], ["hf"], to=f),
        node("Mul", ["xs", "wsc"], ["xsw"]),
        node("Mul", ["hs", "rsc"], ["hsr"]),
        node("Mul", ["xf", "xsw"], ["xg"]),
        node("Mul", ["hf", "hsr"], ["hg"]),
        node("Add", ["xg", "hg"], ["g0"]),
        node("Add", ["g0", "bias"], ["g"]),
        node("Split", ["g"], ["gi", "go", "gf", "gc"], axis=1),
        node("Sigmoid", ["gi"], ["i"]),
        node("Sigmoid", ["go"], ["o"]),
        node("Sigmoid", ["gf"], ["fg"]),
        node("Tanh", ["gc"], ["cc"]),
        node("Mul", ["fg", "c0"], ["c1"]),
        node("Mul", ["i", "cc"], ["c2"]),
        node("Add", ["c1", "c2"], ["c"]),
        node("Tanh", ["c"], ["tc"]),
        node("Mul", ["o", "tc"], ["h"]),
    ]
    consts = {
        "Wt": wq.T.copy(),
        "Rt": rq.T.copy(),
        "wsc": np.array(w_scale, np.float32),
        "rsc": np.array(r_scale, np.float32),
        "bias": (bias[: 4 * K] + bias[4 * K :]).astype(np.float32),
        "c127": np.array(127.0, np.float32),
        "tiny": np.array(1e-30, np.float32),
        "c128": np.array(128.0, np.float32),
        "az": np.array(128, np.uint8),
        "z8": np.array(0, np.int8),
    }
    written = helper.make_graph(
        _row_quantized("x", "x") + _row_quantized("h0", "h") + gates,
        "written_out",
        [value(n, f, ["B", K]) for n in ("x", "h0", "c0")],
        [value("h", f, ["B", K]), value("c", f, ["B", K])],
        [numpy_helper.from_array(a, name) for name, a in consts.items()],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return {
        "DynamicQuantizeLSTM": (
            helper.make_model(kernel, opset_imports=opsets).SerializeToString(),
            True,
        ),
        "the cell written out": (
            helper.make_model(written, opset_imports=opsets).SerializeToString(),
            False,
        ),
    }


Feeds = Callable[[int], dict[str, np.ndarray]]


def _compare(name: str, graph: bytes, feeds: Feeds, output: int, what: str) -> None:
    """`graph`'s first row of `output` alone against among 64 rows, and its CPU a run at
    batch 1 to 256 (one onnxruntime thread)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    alone = session.run(None, feeds(1))[output].reshape(1, -1)[0]
    among = session.run(None, feeds(64))[output].reshape(64, -1)[0]
    costs = []
    for batch in (1, 6, 64, 256):
        for _ in range(10):
            session.run(None, feeds(batch))
        runs = max(50, 8000 // batch)
        start = time.thread_time()
        for _ in range(runs):
            session.run(None, feeds(batch))
        costs.append(f"{batch}: {(time.thread_time() - start) / runs * 1e6:.0f} us")
    diff = float(np.abs(alone - among).max())
    print(
        f"{name}: a row alone against among 64, max difference {diff:.3g}; "
        f"{what} at batch {', '.join(costs)}"
    )


def timed() -> None:
    rng = np.random.default_rng(1)
    scales = rng.uniform(0.2, 5, (256, 1)).astype(np.float32)
    a = rng.standard_normal((256, K)).astype(np.float32) * scales
    for name, graph in decoders().items():
        _compare(name, graph, lambda n: {"A": a[:n]}, 0, "a run")
    x = rng.standard_normal((256, K)).astype(np.float32)
    h0 = (rng.standard_normal((256, K)) * 0.5).astype(np.float32)
    for name, (graph, kernel) in cells().items():

        def feeds(n: int, kernel: bool = kernel) -> dict[str, np.ndarray]:
            arrays = {"x": x[:n], "h0": h0[:n], "c0": h0[:n]}
            return {k: a[None] if kernel else a for k, a in arrays.items()}

        _compare(name, graph, feeds, 1 if kernel else 0, "a layer's step (its h)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, default=Path("models/shakespeare-word"))
    args = parser.parse_args()
    asyncio.run(seeded(args.bundle))
    timed()


if __name__ == "__main__":
    main()
