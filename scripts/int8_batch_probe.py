"""Whether a bundle's results depend on what shares a batch, and what a per-row int8 decoder costs.

An int8 bundle's graphs quantize their activations per tensor at run time (`DynamicQuantizeLSTM`,
`DynamicQuantizeMatMul`): one scale for every row of a run, so a row's log-probs move with the
other rows of its batch. This prints, for `--bundle`, how many of 8 seeded generations of 100
tokens are the same alone and among 64 streams (and where the first differs); then, on random
weights of the word model's decoder shape, a row's output alone against in a batch of 64 and the
CPU a run for onnxruntime's `DynamicQuantizeMatMul` and for a decoder quantized a row at a time
(each row's own scale, zero point 128, `MatMulInteger`: its integer products are exact, so a row's
output is the same in any batch):

    PYTHONPATH=. python scripts/int8_batch_probe.py --bundle models/shakespeare-word
"""

from __future__ import annotations

import argparse
import asyncio
import time
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


def timed() -> None:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    rng = np.random.default_rng(1)
    a = rng.standard_normal((256, K)).astype(np.float32) * rng.uniform(0.2, 5, (256, 1)).astype(
        np.float32
    )
    for name, graph in decoders().items():
        session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        alone = session.run(None, {"A": a[:1]})[0][0]
        among = session.run(None, {"A": a[:64]})[0][0]
        costs = []
        for batch in (1, 6, 64, 256):
            x = a[:batch]
            for _ in range(10):
                session.run(None, {"A": x})
            runs = max(20, 4000 // batch)
            start = time.thread_time()
            for _ in range(runs):
                session.run(None, {"A": x})
            costs.append(f"{batch}: {(time.thread_time() - start) / runs * 1e6:.0f} us")
        diff = float(np.abs(alone - among).max())
        print(
            f"{name}: a row alone against among 64, max difference {diff:.3g}; "
            f"a run at batch {', '.join(costs)}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, default=Path("models/shakespeare-word"))
    args = parser.parse_args()
    asyncio.run(seeded(args.bundle))
    timed()


if __name__ == "__main__":
    main()
