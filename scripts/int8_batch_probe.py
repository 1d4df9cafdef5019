"""Whether a bundle's results depend on what shares a batch, and what `exporter.rowwise` costs.

An int8 graph as onnxruntime's quantize_dynamic writes it quantizes its activations per tensor at
run time (`DynamicQuantizeLSTM`, `DynamicQuantizeLinear` before `MatMulInteger`): one scale for
every row of a run, so a row's log-probs move with the other rows of its batch; the export's
default since `exporter.rowwise` reads them a row at a time. This prints, for `--bundle`:

- how many of 8 seeded generations of 100 tokens are the same alone and among 64 streams (and
  where the first differs);
- for the step graph per tensor and a row at a time (the bundle's and `rowwise`'s rewrite of it,
  or `--per-tensor OLD_BUNDLE`'s and the bundle's): a row's logits alone against among 64, the
  two graphs' log-probs against each other, and each graph's CPU a one-token step at batch 1 to
  256 (one onnxruntime thread, the graphs alternating, medians of 3 rounds).

    PYTHONPATH=. python scripts/int8_batch_probe.py --bundle models/shakespeare-word
    git archive 4b25e68 models/shakespeare-word | tar -x -C /tmp/v6   # the last per-tensor one
    PYTHONPATH=. python scripts/int8_batch_probe.py --per-tensor /tmp/v6/models/shakespeare-word
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from exporter.rowwise import rowwise
from server.bundle import Bundle, load_bundle
from server.engine import Engine, EngineConfig, SamplingParams

BATCHES = (1, 6, 64, 256)
ROUNDS = 3


async def _generation(engine: Engine, seed: int, tokens: int = 100) -> list[int]:
    generation = engine.generate([], tokens, SamplingParams(seed=seed, temperature=1.0))
    out = []
    async for token in generation:
        out += [token.token_id] + [t.token_id for t in generation.take_ready()]
    return out


async def seeded(bundle: Bundle, name: str) -> None:
    engine = Engine(bundle, EngineConfig())
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
        f"{name}: {same} of 8 seeded generations the same alone and among 64; "
        f"the first token that differs: {first}"
    )


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _graphs(bundle: Bundle, per_tensor: Path | None) -> dict[str, onnx.ModelProto]:
    """The step graph per tensor and a row at a time, the ones there are."""
    own = onnx.load(str(bundle.step_graph))
    if any(n.op_type.startswith("DynamicQuantize") for n in own.graph.node):
        return {"per tensor": own, "rowwise": rowwise(own)}
    if per_tensor is None:
        return {"rowwise": own}
    return {"per tensor": onnx.load(str(load_bundle(per_tensor).step_graph)), "rowwise": own}


def step_graphs(bundle: Bundle, per_tensor: Path | None) -> None:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    sessions = {
        name: ort.InferenceSession(model.SerializeToString(), options, ["CPUExecutionProvider"])
        for name, model in _graphs(bundle, per_tensor).items()
    }
    rng = np.random.default_rng(0)
    rows = max(BATCHES)
    tokens = rng.integers(0, bundle.vocab_size, (rows, 1)).astype(np.int64)
    states = [
        (rng.standard_normal(s.shape) * 0.3).astype(np.float32) for s in bundle.zero_state(rows)
    ]
    names = [s.input for s in bundle.state]

    def feeds(n: int) -> dict[str, np.ndarray]:
        return {"tokens": tokens[:n], **{k: s[:, :n] for k, s in zip(names, states, strict=True)}}

    logits = {name: s.run(None, feeds(1))[0][0] for name, s in sessions.items()}
    for name, session in sessions.items():
        among = session.run(None, feeds(64))[0][0]
        print(f"{name}: a row's logits alone against among 64, max difference "
              f"{float(np.abs(logits[name] - among).max()):.3g}")  # fmt: skip
    if "per tensor" in logits:
        moved = np.abs(_log_softmax(logits["rowwise"]) - _log_softmax(logits["per tensor"])).max()
        print(f"rowwise against per tensor, one row: log-probs within {float(moved):.3g}")
    costs: dict[tuple[str, int], list[float]] = {}
    for _ in range(ROUNDS):
        for batch in BATCHES:
            for name, session in sessions.items():
                feed = feeds(batch)
                for _ in range(10):
                    session.run(None, feed)
                runs = max(50, 4000 // batch)
                start = time.thread_time()
                for _ in range(runs):
                    session.run(None, feed)
                costs.setdefault((name, batch), []).append((time.thread_time() - start) / runs)
    for name in sessions:
        each = ", ".join(f"{b}: {np.median(costs[(name, b)]) * 1e6:.0f} us" for b in BATCHES)
        print(f"{name}: a one-token step at batch {each}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, default=Path("models/shakespeare-word"))
    parser.add_argument(
        "--per-tensor", type=Path, metavar="OLD_BUNDLE", help="the same model per tensor"
    )
    args = parser.parse_args()
    bundle = load_bundle(args.bundle)
    asyncio.run(seeded(bundle, str(args.bundle)))
    step_graphs(bundle, args.per_tensor)


if __name__ == "__main__":
    main()
