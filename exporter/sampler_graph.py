"""Builds the batch sampler's ONNX graph `server/sampler.onnx`: `python -m exporter.sampler_graph`.

The graph does for all `[B, V]` rows at once what `server.sampling.Sampler` does (see that
module for the semantics), with B and V dynamic so one file serves every bundle:

1. log-sum-exp of the raw logits, and the requested top log-probs (TopK: ties by lower id);
2. repetition penalty over each row's seen tokens, bans (-inf), greedy rows' argmax;
3. per-row logit thresholds: top-k (TopK's k-th value), top-p over the top-k-renormalised
   distribution (cumulative sums of the sorted head, `_HEAD` candidates; an `If` redoes
   every row fully sorted when a row's nucleus is wider), min-p; ties at a threshold kept;
4. one uniform per row from a hash of (seed, position) in 32-bit lanes held in int64 (products
   stay below 2^49), bit-identical to `server.sampler.stream_uniforms`;
5. the inverse CDF over the kept weights in id order (float64 running sums).

The server only loads the committed file; `tests/test_sampler_graph.py` checks that this
script rebuilds it byte for byte.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from server.sampler import GRAPH_PATH, HASH_MIX, HASH_SHIFTS, HASH_START

OPSET = 18  # BitwiseXor and BitwiseAnd
_HEAD = 256  # sorted candidates for top-p before falling back to the whole row
_BISECT = 12  # bisection steps of a nucleus wider than the candidates, before its sort
_BLOCK = 128  # tokens per block of the inverse CDF's two-level search
_F, _D, _I, _B = TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.INT64, TensorProto.BOOL

INPUTS = (
    ("logits", _F, ["B", "V"]),
    ("temperature", _F, ["B"]),
    ("top_k", _I, ["B"]),
    ("top_p", _F, ["B"]),
    ("min_p", _F, ["B"]),
    ("repetition_penalty", _F, ["B"]),
    ("top_logprobs", _I, ["B"]),
    ("seed", _I, ["B"]),
    ("position", _I, ["B"]),
    ("banned", _B, ["B", "V"]),
    ("seen", _B, ["B", "V"]),
)
OUTPUTS = (
    ("tokens", _I, ["B"]),
    ("logprobs", _F, ["B"]),
    ("lse", _F, ["B"]),
    ("top_ids", _I, ["B", "K"]),
    ("top_values", _F, ["B", "K"]),
    ("uniforms", _D, ["B"]),  # each row's draw (for checks; the server does not fetch it)
)


class _Graph:
    """Nodes of one graph (or `If` branch), with names unique across the whole model."""

    def __init__(self, counter: list[int]) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self._consts: dict[tuple[str, bytes], str] = {}
        self._counter = counter

    def _name(self, stem: str) -> str:
        self._counter[0] += 1
        return f"{stem}_{self._counter[0]}"

    def ops(self, op: str, inputs: list[str], outputs: int, **attrs: Any) -> list[str]:
        names = [self._name(op.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, names, **attrs))
        return names

    def op(self, op: str, *inputs: str, **attrs: Any) -> str:
        return self.ops(op, list(inputs), 1, **attrs)[0]

    def const(self, value: float | int | list[int], dtype: type) -> str:
        """A constant (scalar, or 1-D for a list), emitted once per graph as a Constant node."""
        arr: np.ndarray = np.array(value, dtype=dtype)
        key = (arr.dtype.str + str(arr.shape), arr.tobytes())
        if key not in self._consts:
            name = self._name("const")
            tensor = numpy_helper.from_array(arr, name)
            self.nodes.append(helper.make_node("Constant", [], [name], value=tensor))
            self._consts[key] = name
        return self._consts[key]

    def i64(self, value: int | list[int]) -> str:
        return self.const(value, np.int64)

    def f32(self, value: float) -> str:
        return self.const(value, np.float32)

    def col(self, x: str) -> str:
        """`[B]` -> `[B, 1]`."""
        return self.op("Unsqueeze", x, self.i64([1]))

    def row_max(self, x: str) -> str:
        return self.op("ReduceMax", x, self.i64([1]), keepdims=1)

    def row_sum(self, x: str) -> str:
        return self.op("ReduceSum", x, self.i64([1]), keepdims=1)

    def where(self, cond: str, a: str, b: str) -> str:
        return self.op("Where", cond, a, b)

    def cast(self, x: str, to: int) -> str:
        return self.op("Cast", x, to=to)

    def any(self, cond: str) -> str:
        """Scalar bool: whether any element of bool `cond` is true."""
        return self.cast(self.op("ReduceMax", self.cast(cond, _I), keepdims=0), _B)

    def cols(self, x: str, start: int, end: int) -> str:
        """Columns `start:end` of `[B, N]` (negative counts from the end)."""
        return self.op("Slice", x, self.i64([start]), self.i64([end]), self.i64([1]))

    def branch(
        self,
        cond: str,
        then: Callable[[_Graph], list[str]],
        otherwise: Callable[[_Graph], list[str]],
    ) -> list[str]:
        """An `If` on scalar bool `cond`; each branch builds its outputs in its own graph."""
        graphs = []
        for name, build in (("then", then), ("else", otherwise)):
            sub = _Graph(self._counter)
            outs = [sub.op("Identity", out) for out in build(sub)]
            values = [helper.make_empty_tensor_value_info(out) for out in outs]
            graphs.append(helper.make_graph(sub.nodes, self._name(name), [], values))
        return self.ops(
            "If", [cond], len(graphs[0].output), then_branch=graphs[0], else_branch=graphs[1]
        )


def _mul32(g: _Graph, h: str, c: int) -> str:
    """`h * c mod 2^32` for int64 `h` in [0, 2^32) and `c` < 2^31 (the product < 2^63)."""
    return g.op("BitwiseAnd", g.op("Mul", h, g.i64(c)), g.i64(0xFFFFFFFF))


def _hash32(g: _Graph, h: str) -> str:
    """`server.sampler._hash32` on 32-bit values held in int64 (shifts right as divisions)."""
    for i, shift in enumerate(HASH_SHIFTS):
        h = g.op("BitwiseXor", h, g.op("Div", h, g.i64(1 << shift)))
        if i < len(HASH_MIX):
            h = _mul32(g, h, HASH_MIX[i])
    return h


def _uniforms(g: _Graph) -> str:
    """`[B]` float64 uniforms in [0, 1), as `server.sampler.stream_uniforms`."""
    mask = g.i64(0xFFFFFFFF)
    seed_lo = g.op("BitwiseAnd", "seed", mask)
    top = g.op("BitwiseAnd", "seed", g.i64(-(1 << 32)))  # a multiple of 2^32: exact division
    seed_hi = g.op("BitwiseAnd", g.op("Div", top, g.i64(1 << 32)), mask)
    pos_lo = g.op("BitwiseAnd", "position", mask)
    start = g.i64(HASH_START)
    h = start
    for word in (seed_lo, seed_hi, pos_lo, start):
        h = _hash32(g, g.op("BitwiseXor", h, word))
    return g.op("Mul", g.cast(h, _D), g.const(2.0**-32, np.float64))


def _penalised(g: _Graph) -> str:
    """The logits with each row's seen tokens penalised CTRL-style (bans come later)."""
    x, pen = "logits", g.col("repetition_penalty")
    scaled = g.where(g.op("Greater", x, g.f32(0.0)), g.op("Div", x, pen), g.op("Mul", x, pen))
    return g.where("seen", scaled, x)


def _rows(g: _Graph, cond: str) -> str:
    """`[R]` indices of the rows where `[B, 1]` bool `cond` holds."""
    return g.op("Reshape", g.op("NonZero", g.op("Squeeze", cond, g.i64([1]))), g.i64([-1]))


def _top_p_threshold(
    g: _Graph, xp: str, weights: str, tau_k: str, top_p: str, width: str
) -> tuple[str, str]:
    """Top-p's `[R, 1]` threshold from each row's `width` largest logits, and the rows whose
    nucleus reaches past them (`[R, 1]` bool). `weights`: the rows' sampling weights;
    `tau_k`: their top-k threshold (-inf where off)."""
    vals, idx = g.ops("TopK", [xp, width], 2, axis=1, largest=1, sorted=1)
    q = g.op("GatherElements", weights, idx, axis=1)
    q = g.op("Mul", q, g.cast(g.op("GreaterOrEqual", vals, tau_k), _F))
    cum = g.op("CumSum", g.cast(q, _D), g.i64(1))
    # Within top-k the candidates hold all the kept mass; without it, the whole row does.
    in_k = g.op("Greater", tau_k, g.f32(-np.inf))
    total = g.where(in_k, g.cols(cum, -1, 2**62), g.row_sum(g.cast(weights, _D)))
    j = g.row_sum(g.cast(g.op("Less", cum, g.op("Mul", g.cast(top_p, _D), total)), _I))
    found = g.op("Less", j, width)
    tau = g.op("GatherElements", vals, g.op("Min", j, g.op("Sub", width, g.i64(1))), axis=1)
    nucleus = g.op("Less", top_p, g.f32(1.0))
    tau = g.where(g.op("And", nucleus, found), tau, g.f32(-np.inf))
    return tau, g.op("And", nucleus, g.op("Not", found))


def _wide_top_p(g: _Graph, xp: str, weights: str, top_p: str, hi: str) -> str:
    """Top-p's `[R, 1]` threshold for rows whose nucleus reaches below `hi` (their smallest
    sorted candidate) and that have no top-k, without sorting whole rows.

    The threshold t is the largest logit whose tokens at or above it hold `top_p` of the
    mass. Bisection on logit values narrows [lo, hi] around t (mass at or above lo reaches
    the target; t <= hi throughout), then the few logits left in [lo, hi] are sorted and
    summed in order onto the mass above hi, as the candidates' path does."""
    wd = g.cast(weights, _D)
    target = g.op("Mul", g.cast(top_p, _D), g.row_sum(wd))
    allowed = g.where(g.op("IsInf", xp, detect_positive=0), hi, xp)
    lo = g.op("ReduceMin", allowed, g.i64([1]), keepdims=1)
    for _ in range(_BISECT):
        mid = g.op("Mul", g.op("Add", lo, hi), g.f32(0.5))
        mass = g.row_sum(g.op("Mul", wd, g.cast(g.op("GreaterOrEqual", xp, mid), _D)))
        reaches = g.op("GreaterOrEqual", mass, target)
        lo, hi = g.where(reaches, mid, lo), g.where(reaches, hi, mid)
    left = g.op("And", g.op("GreaterOrEqual", xp, lo), g.op("LessOrEqual", xp, hi))
    count = g.op("ReduceMax", g.row_sum(g.cast(left, _I)), keepdims=0)
    count = g.op("Max", g.op("Reshape", count, g.i64([1])), g.i64([1]))
    vals, idx = g.ops(
        "TopK", [g.where(left, xp, g.f32(-np.inf)), count], 2, axis=1, largest=1, sorted=1
    )
    q = g.op(
        "Mul",
        g.op("GatherElements", wd, idx, axis=1),
        g.cast(g.op("Greater", vals, g.f32(-np.inf)), _D),
    )
    above = g.row_sum(g.op("Mul", wd, g.cast(g.op("Greater", xp, hi), _D)))
    cum = g.op("Add", above, g.op("CumSum", q, g.i64(1)))
    j = g.row_sum(g.cast(g.op("Less", cum, target), _I))
    return g.op("GatherElements", vals, g.op("Min", j, g.op("Sub", count, g.i64(1))), axis=1)


def _head_thresholds(g: _Graph, xp: str, weights: str, top_k: str, top_p: str) -> str:
    """`[R, 1]` threshold of top-k, then top-p over the top-k-renormalised mass, for rows
    `xp` `[R, V]` (every one with a top-k or a top-p)."""
    vocab = g.op("Shape", xp, start=1, end=2)
    any_p = g.cast(g.op("ReduceMax", g.cast(g.op("Less", top_p, g.f32(1.0)), _I)), _I)
    width = g.op("Max", g.op("ReduceMax", top_k, keepdims=0), g.op("Mul", any_p, g.i64(_HEAD)))
    width = g.op("Min", g.op("Max", g.op("Reshape", width, g.i64([1])), g.i64([1])), vocab)
    vals = g.ops("TopK", [xp, width], 2, axis=1, largest=1, sorted=1)[0]
    k_idx = g.op("Sub", g.op("Min", g.op("Max", top_k, g.i64(1)), width), g.i64(1))
    tau_k = g.op("GatherElements", vals, k_idx, axis=1)
    tau_k = g.where(g.op("Greater", top_k, g.i64(0)), tau_k, g.f32(-np.inf))
    tau_p, wide = _top_p_threshold(g, xp, weights, tau_k, top_p, width)

    def wider(b: _Graph) -> list[str]:  # rows whose nucleus is wider than the candidates
        rows = _rows(b, wide)
        sub = [b.op("Gather", t, rows, axis=0) for t in (xp, weights, top_p)]
        last = b.op("Gather", b.cols(vals, -1, 2**62), rows, axis=0)
        tau = _wide_top_p(b, *sub, last)
        return [b.op("ScatterND", tau_p, b.op("Unsqueeze", rows, b.i64([1])), tau)]

    tau_p = g.branch(g.any(wide), wider, lambda b: [tau_p])[0]
    return g.op("Max", tau_k, tau_p)


def _heads(g: _Graph, xp: str, weights: str, rows: str) -> list[str]:
    """`[B, 1]` top-k/top-p threshold: computed for the rows `rows` only, -inf elsewhere."""
    sub = [g.op("Gather", t, rows, axis=0) for t in (xp, weights)]
    top_k, top_p = (g.op("Gather", g.col(n), rows, axis=0) for n in ("top_k", "top_p"))
    tau = _head_thresholds(g, sub[0], sub[1], top_k, top_p)
    shape = g.op("Concat", g.op("Shape", xp, start=0, end=1), g.i64([1]), axis=0)
    none = g.op(
        "ConstantOfShape", shape, value=numpy_helper.from_array(np.array([-np.inf], np.float32))
    )
    return [g.op("ScatterND", none, g.op("Unsqueeze", rows, g.i64([1])), tau)]


def _filtered(g: _Graph, xs: str, weights: str, greedy: str) -> str:
    """`weights` with each row's tokens below its threshold (top-k, top-p, min-p; the
    maximum for greedy rows) set to 0: ties at a threshold are kept."""
    xp = g.where("banned", g.f32(-np.inf), xs)
    mp = g.row_max(xp)
    drawn = g.op("Not", greedy)
    min_p = g.col("min_p")
    temperature = g.where(greedy, g.f32(1.0), g.col("temperature"))
    tau = g.op("Add", mp, g.op("Mul", g.op("Log", min_p), temperature))
    tau = g.where(g.op("And", drawn, g.op("Greater", min_p, g.f32(0.0))), tau, g.f32(-np.inf))
    tau = g.where(greedy, mp, tau)
    k_or_p = g.op(
        "Or", g.op("Greater", g.col("top_k"), g.i64(0)), g.op("Less", g.col("top_p"), g.f32(1.0))
    )
    heads = g.op("And", drawn, k_or_p)
    tau_heads = g.branch(
        g.any(heads),
        lambda b: _heads(b, xp, weights, _rows(b, heads)),
        lambda b: [b.f32(-np.inf)],
    )[0]
    tau = g.op("Max", tau, tau_heads)
    return g.op("Mul", weights, g.cast(g.op("GreaterOrEqual", xp, tau), _F))


def _blocks(g: _Graph, weights: str) -> str:
    """`weights` zero-padded to whole blocks: `[B, blocks, _BLOCK]`."""
    vocab = g.op("Shape", weights, start=1, end=2)
    block = g.i64([_BLOCK])
    pad = g.op("Mod", g.op("Sub", block, g.op("Mod", vocab, block)), block)
    padded = g.op("Pad", weights, g.op("Concat", g.i64([0, 0, 0]), pad, axis=0))
    return g.op("Reshape", padded, g.i64([0, -1, _BLOCK]))


def _draw(g: _Graph, weights: str, u: str) -> str:
    """`[B, 1]` index per row with P(i) = w_i / sum(w), by inverse CDF from its uniform `u`:
    the first index whose running sum of weights passes `u * sum(w)` (u = 0: the first
    token of any weight). Two levels: blocks of `_BLOCK` tokens, then the target's block."""
    blocks = _blocks(g, weights)
    sums = g.cast(g.op("ReduceSum", blocks, g.i64([2]), keepdims=0), _D)
    block_cum = g.op("CumSum", sums, g.i64(1))
    target = g.op("Mul", u, g.cols(block_cum, -1, 2**62))
    passed = g.row_sum(g.cast(g.op("LessOrEqual", block_cum, target), _I))
    last_block = g.op("Sub", g.op("Shape", block_cum, start=1, end=2), g.i64(1))
    block = g.op("Min", passed, last_block)
    zero = g.op("Mul", g.cols(block_cum, 0, 1), g.const(0.0, np.float64))
    before = g.op("GatherElements", g.op("Concat", zero, block_cum, axis=1), block, axis=1)
    where = g.op("Expand", g.op("Unsqueeze", block, g.i64([2])), g.i64([1, 1, _BLOCK]))
    inner = g.op("Reshape", g.op("GatherElements", blocks, where, axis=1), g.i64([0, _BLOCK]))
    running = g.op("Add", before, g.op("CumSum", g.cast(inner, _D), g.i64(1)))
    within = g.row_sum(g.cast(g.op("LessOrEqual", running, target), _I))
    token = g.op("Add", g.op("Mul", block, g.i64(_BLOCK)), within)
    vocab = g.op("Shape", weights, start=1, end=2)
    clamped = g.op("Min", token, g.op("Sub", vocab, g.i64(1)))
    weightless = g.op("LessOrEqual", g.op("GatherElements", weights, clamped, axis=1), g.f32(0))
    lost = g.op("Or", g.op("GreaterOrEqual", token, vocab), weightless)

    def best(b: _Graph) -> list[str]:  # rounding stepped past the weights: the row's best
        return [b.where(lost, b.op("ArgMax", weights, axis=1, keepdims=1), clamped)]

    return g.branch(g.any(lost), best, lambda b: [clamped])[0]


class _Rows:
    """Per-row `[B, 1]` values every stage reads."""

    def __init__(self, g: _Graph) -> None:
        temperature = g.col("temperature")
        self.greedy = g.op("Equal", temperature, g.f32(0.0))
        self.inv_t = g.op("Reciprocal", g.where(self.greedy, g.f32(1.0), temperature))
        filters = [
            self.greedy,
            g.op("Greater", g.col("top_k"), g.i64(0)),
            g.op("Less", g.col("top_p"), g.f32(1.0)),
            g.op("Greater", g.col("min_p"), g.f32(0.0)),
        ]
        self.any_filter = g.any(g.op("Concat", *filters, axis=1))
        # Rows whose sampling softmax is not that of the raw logits (their log-sum-exp needs
        # its own pass): a temperature other than 0 or 1, or a repetition penalty.
        hot = g.op("Not", g.op("Or", self.greedy, g.op("Equal", temperature, g.f32(1.0))))
        penalty = g.op("Not", g.op("Equal", g.col("repetition_penalty"), g.f32(1.0)))
        self.own_lse = g.op("Or", hot, penalty)
        u = g.col(_uniforms(g))
        self.uniforms = u
        self.u = g.where(self.greedy, g.const(0.0, np.float64), u)  # greedy: the first max


def _choose(g: _Graph, rows: _Rows, xs: str, weights: str) -> list[str]:
    """`[B, 1]` chosen tokens from `weights` (bans applied; filters applied here)."""
    return g.branch(
        rows.any_filter,
        lambda b: [_draw(b, _filtered(b, xs, weights, rows.greedy), rows.u)],
        lambda b: [_draw(b, weights, rows.u)],
    )


def _lse(g: _Graph, rows: _Rows, probs: str) -> str:
    """`[B, 1]` log-sum-exp of the raw logits. Where a row samples from the raw logits'
    softmax `probs`, from its largest value (exp(max - lse)); elsewhere by a LogSoftmax pass
    (only when some row needs it). Either way a row's value depends on that row alone."""
    from_probs = g.op("Sub", g.row_max("logits"), g.op("Log", g.row_max(probs)))

    def own(b: _Graph) -> list[str]:
        log_probs = b.op("LogSoftmax", "logits", axis=1)
        exact = b.op("Sub", b.cols("logits", 0, 1), b.cols(log_probs, 0, 1))
        return [b.where(rows.own_lse, exact, from_probs)]

    return g.branch(g.any(rows.own_lse), own, lambda b: [from_probs])[0]


def _sample(g: _Graph, rows: _Rows, xs: str) -> list[str]:
    """`[B, 1]` tokens and log-sum-exps, sampling from the (penalised) logits `xs`.

    Bans zero the softmax's weights rather than set logits to -inf (cheaper, and the softmax
    of the raw logits then gives the log-sum-exp too); rows whose allowed tokens all
    underflowed next to a banned one are redone with the bans on the logits."""
    probs = g.op("Softmax", g.op("Mul", xs, rows.inv_t), axis=1)
    weights = g.op("Mul", probs, g.cast(g.op("Not", "banned"), _F))
    lost = g.op("Less", g.row_sum(weights), g.f32(1e-20))

    def exact(b: _Graph) -> list[str]:
        xb = b.where("banned", b.f32(-np.inf), xs)
        redone = b.op("Softmax", b.op("Mul", xb, rows.inv_t), axis=1)
        return _choose(b, rows, xs, b.where(lost, redone, weights))

    tokens = g.branch(g.any(lost), exact, lambda b: _choose(b, rows, xs, weights))[0]
    return [tokens, _lse(g, rows, probs)]


def _body(g: _Graph) -> list[str]:
    """The graph's outputs, in `OUTPUTS` order."""
    rows = _Rows(g)
    any_pen = g.any(g.op("Not", g.op("Equal", "repetition_penalty", g.f32(1.0))))
    tokens, lse = g.branch(
        any_pen,
        lambda b: _sample(b, rows, _penalised(b)),
        lambda b: _sample(b, rows, "logits"),
    )
    chosen = g.op("Sub", g.op("GatherElements", "logits", tokens, axis=1), lse)
    n_top = g.op("Reshape", g.op("ReduceMax", "top_logprobs", keepdims=0), g.i64([1]))
    n_top = g.op("Max", n_top, g.i64([0]))
    top_vals, top_ids = g.ops("TopK", ["logits", n_top], 2, axis=1, largest=1, sorted=1)
    flat = g.i64([-1])
    return [
        g.op("Reshape", tokens, flat),
        g.op("Reshape", chosen, flat),
        g.op("Reshape", lse, flat),
        top_ids,
        g.op("Sub", top_vals, lse),
        g.op("Reshape", rows.uniforms, flat),
    ]


def build() -> onnx.ModelProto:
    """The sampler graph (deterministic: the same bytes on every build)."""
    g = _Graph([0])
    outs = _body(g)
    renames = [
        helper.make_node("Identity", [src], [name])
        for src, (name, _, _) in zip(outs, OUTPUTS, strict=True)
    ]
    graph = helper.make_graph(
        g.nodes + renames,
        "batch_sampler",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in INPUTS],
        [helper.make_tensor_value_info(n, t, s) for n, t, s in OUTPUTS],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="rnnlm-sampler",
        ir_version=9,
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0]) if args else GRAPH_PATH
    path.write_bytes(build().SerializeToString())
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
