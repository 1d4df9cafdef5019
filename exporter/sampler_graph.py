"""Builds the batch sampler's ONNX graph `server/sampler.onnx`: `python -m exporter.sampler_graph`.

The graph does for all `[B, V]` rows at once what `server.sampling.Sampler` does (see that
module for the semantics), with B and V dynamic so one file serves every bundle, and the
logits `[B, V]` or a step graph's `[B, 1, V]` (viewed as `[B, V]` by a Reshape):

1. the repetition penalty over each row's seen tokens (only when some row has one);
2. the softmax of the tempered logits with each row's banned ids (a short `[B, N]` list, not a
   `[B, V]` mask: a mask costs a full-width pass) scattered to -inf;
3. only when some row needs them: the most likely allowed token (greedy rows' choice, and
   min-p's reference) from the weights' block maxima; per-row logit thresholds (ties
   kept): min-p and, on the rows that have them, top-k (TopK's k-th value) and top-p over the top-k-
   renormalised mass (running sums of `_HEAD` sorted candidates; a wider nucleus by
   bisection on logit values, then a sort of the few logits left);
4. one uniform per row, a hash of (seed, position) in 32-bit lanes held in int64 (products
   below 2^63), bit-identical to `server.sampler.stream_uniforms`;
5. the inverse CDF over the kept weights in id order, in two levels (blocks of `_BLOCK`);
6. the log-sum-exp of the raw logits (from the chosen token's weight and the banned logits
   where a row samples the raw distribution), the chosen token's log-prob, and the
   requested top log-probs (TopK: ties by lower id).

Each `If` gates work on what some row needs, and every row's result depends on that row
alone. A branch returns values it makes: an outer `[B, V]` value returned would be copied.

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
from server.sampling import BLOCK

OPSET = 18  # BitwiseXor and BitwiseAnd
_HEAD = 256  # sorted candidates for top-p before falling back to the whole row
_BISECT = 12  # bisection steps of a nucleus wider than the candidates, before its sort
_BLOCK = BLOCK  # tokens per block of the inverse CDF's two-level search (server.sampling)
_LOGITS = "logits_2d"  # the logits input, viewed as [B, V]
_F, _D, _I, _B = TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.INT64, TensorProto.BOOL

INPUTS = (
    ("logits", _F, ["B", "V"]),  # or [B, 1, V]: the written file leaves its rank open
    ("temperature", _F, ["B"]),
    ("top_k", _I, ["B"]),
    ("top_p", _F, ["B"]),
    ("min_p", _F, ["B"]),
    ("repetition_penalty", _F, ["B"]),
    ("top_logprobs", _I, ["B"]),
    ("seed", _I, ["B"]),
    ("position", _I, ["B"]),
    ("seen", _B, ["B", "V"]),
    ("banned_ids", _I, ["B", "N"]),
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
        self.nodes.append(helper.make_node(op, inputs, names, name=names[0], **attrs))
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
            outs = build(sub)
            made = {name for node in sub.nodes for name in node.output}
            # A branch output must be made in the branch: outer values pass through an
            # Identity (a copy, so branches return small values where they can).
            outs = [out if out in made else sub.op("Identity", out) for out in outs]
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
    """The logits with each row's seen tokens penalised CTRL-style (bans come later).

    x / pen where x > 0, else x * pen, is the smaller of the two when pen >= 1 and the larger
    when pen < 1: a sign per row turns both into one Min. Selection by exact 0/1 products
    (one term of each sum is zero), since onnxruntime's full-width Where costs about 5x a
    multiply."""
    x, pen = _LOGITS, g.col("repetition_penalty")
    sign = g.op("Sub", g.cast(g.op("GreaterOrEqual", pen, g.f32(1.0)), _F), g.f32(0.5))
    sign = g.op("Mul", sign, g.f32(2.0))  # +1 or -1
    smaller = g.op(
        "Min", g.op("Mul", g.op("Div", x, pen), sign), g.op("Mul", g.op("Mul", x, pen), sign)
    )
    scaled = g.op("Mul", smaller, sign)
    seen = g.cast("seen", _F)
    unseen = g.op("Sub", g.f32(1.0), seen)
    return g.op("Add", g.op("Mul", scaled, seen), g.op("Mul", x, unseen))


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
        x, w, p, last = (
            b.op("Gather", t, rows, axis=0) for t in (xp, weights, top_p, b.cols(vals, -1, 2**62))
        )
        tau = _wide_top_p(b, x, w, p, last)
        return [b.op("ScatterND", tau_p, b.op("Unsqueeze", rows, b.i64([1])), tau)]

    tau_p = g.branch(g.any(wide), wider, lambda b: [tau_p])[0]
    return g.op("Max", tau_k, tau_p)


def _heads(g: _Graph, xs: str, weights: str, rows: str) -> list[str]:
    """`[B, 1]` top-k/top-p threshold: computed for the rows `rows` only, -inf elsewhere."""
    x, w = (g.op("Gather", t, rows, axis=0) for t in (xs, weights))
    top_k, top_p = (g.op("Gather", g.col(n), rows, axis=0) for n in ("top_k", "top_p"))
    tau = _head_thresholds(g, x, w, top_k, top_p)
    shape = g.op("Concat", g.op("Shape", xs, start=0, end=1), g.i64([1]), axis=0)
    none = g.op(
        "ConstantOfShape", shape, value=numpy_helper.from_array(np.array([-np.inf], np.float32))
    )
    return [g.op("ScatterND", none, g.op("Unsqueeze", rows, g.i64([1])), tau)]


def _thresholded(g: _Graph, rows: _Rows, xs: str, weights: str, mp: str) -> str:
    """`weights` with each drawn row's tokens below its threshold (top-k, top-p, min-p) set
    to 0: ties at a threshold are kept. `mp`: each row's largest allowed logit."""
    drawn = g.op("Not", rows.greedy)
    min_p = g.col("min_p")
    tau = g.op("Add", mp, g.op("Mul", g.op("Log", min_p), g.col("temperature")))
    tau = g.where(g.op("And", drawn, g.op("Greater", min_p, g.f32(0.0))), tau, g.f32(-np.inf))
    k_or_p = g.op(
        "Or", g.op("Greater", g.col("top_k"), g.i64(0)), g.op("Less", g.col("top_p"), g.f32(1.0))
    )
    heads = g.op("And", drawn, k_or_p)
    tau_heads = g.branch(
        g.any(heads),
        lambda b: _heads(b, xs, weights, _rows(b, heads)),
        lambda b: [b.f32(-np.inf)],
    )[0]
    tau = g.op("Max", tau, tau_heads)
    return g.op("Mul", weights, g.cast(g.op("GreaterOrEqual", xs, tau), _F))


def _best(g: _Graph, xs: str, blocks: str) -> tuple[str, str]:
    """Each row's `[B, 1]` most likely allowed token (the lowest id among equals) and its
    logit, from the weights' blocks: the first block holding the largest weight, then the
    first token in it. A unique largest weight is the largest allowed logit (exp is
    monotone); rows where it is tied take a full pass. `blocks`: the weights in blocks."""
    block_max = g.op("ReduceMax", blocks, g.i64([2]), keepdims=0)
    top = g.row_max(block_max)
    hit = g.op("Equal", block_max, top)
    block = g.op("ArgMax", g.cast(hit, _F), axis=1, keepdims=1)
    inner = _block_of(g, blocks, block)
    inner_hit = g.op("Equal", inner, top)
    token = g.op(
        "Add",
        g.op("Mul", block, g.i64(_BLOCK)),
        g.op("ArgMax", g.cast(inner_hit, _F), axis=1, keepdims=1),
    )
    ties = g.op("Add", g.row_sum(g.cast(hit, _I)), g.row_sum(g.cast(inner_hit, _I)))
    unsure = g.op("Greater", ties, g.i64(2))

    def exact(b: _Graph) -> list[str]:
        return [b.where(unsure, b.op("ArgMax", xs, axis=1, keepdims=1), token)]

    token = g.branch(g.any(unsure), exact, lambda b: [token])[0]
    return token, g.op("GatherElements", xs, token, axis=1)


def _filtered_choice(g: _Graph, rows: _Rows, xs: str, weights: str) -> list[str]:
    """`_choose` when some row is greedy or has a filter."""
    blocks = _blocks(g, weights)
    best, mp = _best(g, xs, blocks)
    token = g.branch(
        rows.any_drawn_filter,
        lambda b: [_draw(b, _thresholded(b, rows, xs, weights, mp), rows.u)],
        lambda b: [_draw(b, weights, rows.u, blocks)],
    )[0]
    return [g.where(rows.greedy, best, token)]


def _padded(g: _Graph, x: str) -> str:
    """`x` `[B, V]` padded with -inf to whole blocks of `_BLOCK` tokens."""
    vocab = g.op("Shape", x, start=1, end=2)
    block = g.i64([_BLOCK])
    pad = g.op("Mod", g.op("Sub", block, g.op("Mod", vocab, block)), block)
    return g.op("Pad", x, g.op("Concat", g.i64([0, 0, 0]), pad, axis=0), g.f32(-np.inf))


def _blocks(g: _Graph, weights: str) -> str:
    """Weights padded to whole blocks, `[B, blocks * _BLOCK]`, as `[B, blocks, _BLOCK]`."""
    return g.op("Reshape", weights, g.i64([0, -1, _BLOCK]))


def _block_of(g: _Graph, blocks: str, block: str) -> str:
    """Each row's block `block` (`[B, 1]` int64) of `blocks` `[B, n, _BLOCK]`: `[B, _BLOCK]`."""
    where = g.op("Expand", g.op("Unsqueeze", block, g.i64([2])), g.i64([1, 1, _BLOCK]))
    return g.op("Reshape", g.op("GatherElements", blocks, where, axis=1), g.i64([0, _BLOCK]))


def _draw(g: _Graph, weights: str, u: str, blocks: str | None = None) -> str:
    """`[B, 1]` index per row with P(i) = w_i / sum(w), by inverse CDF from the row's
    uniform `u`: the first index whose running sum of weights passes
    `u * sum(w)`. Two levels: blocks of `_BLOCK` tokens (`blocks`, when the caller has
    them), then the tokens of the target's block."""
    blocks = _blocks(g, weights) if blocks is None else blocks
    sums = g.cast(g.op("ReduceSum", blocks, g.i64([2]), keepdims=0), _D)
    block_cum = g.op("CumSum", sums, g.i64(1))
    target = g.op("Mul", u, g.cols(block_cum, -1, 2**62))
    passed = g.row_sum(g.cast(g.op("LessOrEqual", block_cum, target), _I))
    last_block = g.op("Sub", g.op("Shape", block_cum, start=1, end=2), g.i64(1))
    block = g.op("Min", passed, last_block)
    zero = g.op("Mul", g.cols(block_cum, 0, 1), g.const(0.0, np.float64))
    before = g.op("GatherElements", g.op("Concat", zero, block_cum, axis=1), block, axis=1)
    inner = _block_of(g, blocks, block)
    running = g.op("Add", before, g.op("CumSum", g.cast(inner, _D), g.i64(1)))
    within = g.row_sum(g.cast(g.op("LessOrEqual", running, target), _I))
    token = g.op("Add", g.op("Mul", block, g.i64(_BLOCK)), within)
    vocab = g.op("Shape", _LOGITS, start=1, end=2)
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
        drawn_filter = g.op("Concat", *filters[1:], axis=1)
        self.any_drawn_filter = g.any(g.op("And", drawn_filter, g.op("Not", self.greedy)))
        # Rows whose sampling softmax is not that of the raw logits (their log-sum-exp needs
        # its own pass): a temperature other than 0 or 1, or a repetition penalty.
        hot = g.op("Not", g.op("Or", self.greedy, g.op("Equal", temperature, g.f32(1.0))))
        self.any_hot = g.any(hot)
        penalty = g.op("Not", g.op("Equal", g.col("repetition_penalty"), g.f32(1.0)))
        self.own_lse = g.op("Or", hot, penalty)
        self.u = g.col(_uniforms(g))


def _choose(g: _Graph, rows: _Rows, xb: str, weights: str) -> str:
    """`[B, 1]` chosen tokens from `weights`, the softmax of the banned logits `xb` at each
    row's temperature (filters and greedy rows' maxima applied here)."""
    return g.branch(
        rows.any_filter,
        lambda b: _filtered_choice(b, rows, xb, weights),
        lambda b: [_draw(b, weights, rows.u)],
    )[0]


def _banned(g: _Graph, xs: str) -> str:
    """`xs` padded to whole blocks (`_padded`) with each row's `banned_ids` at -inf: a scatter
    into the padded copy, in place (-1s change nothing: they write the row's first banned
    id again, or, in a row with none, token 0 its own value)."""
    ids = "banned_ids"
    first = g.op("Max", g.cols(ids, 0, 1), g.i64(0))
    idx = g.where(g.op("GreaterOrEqual", ids, g.i64(0)), ids, first)
    any_ban = g.op("GreaterOrEqual", g.cols(ids, 0, 1), g.i64(0))
    own = g.op("GatherElements", xs, idx, axis=1)
    values = g.where(any_ban, g.f32(-np.inf), own)
    return g.op("ScatterElements", _padded(g, xs), idx, values, axis=1)


def _lse(g: _Graph, rows: _Rows, weights: str, tokens: str) -> str:
    """`[B, 1]` log-sum-exp of the raw logits. A row that drew at temperature 0 or 1 without
    a penalty gets it from its chosen token's weight (exp(logit - lse of the allowed
    tokens)) and its banned tokens' logits; other rows from a LogSoftmax pass (only when
    there are any). A row's value depends on that row alone."""
    picked = g.op("GatherElements", weights, tokens, axis=1)
    own = g.op("Or", rows.own_lse, g.op("Less", picked, g.f32(1e-30)))  # no precision left
    chosen = g.op("GatherElements", _LOGITS, tokens, axis=1)
    allowed = g.op("Sub", chosen, g.op("Log", g.op("Max", picked, g.f32(1e-30))))
    ids = "banned_ids"
    banned = g.op("GatherElements", _LOGITS, g.op("Max", ids, g.i64(0)), axis=1)
    banned = g.where(g.op("GreaterOrEqual", ids, g.i64(0)), banned, g.f32(-np.inf))
    terms = g.op("Concat", allowed, banned, axis=1)
    top = g.row_max(terms)
    from_weights = g.op("Add", top, g.op("Log", g.row_sum(g.op("Exp", g.op("Sub", terms, top)))))

    def exact(b: _Graph) -> list[str]:
        log_probs = b.op("LogSoftmax", _LOGITS, axis=1)
        lse = b.op("Sub", b.cols(_LOGITS, 0, 1), b.cols(log_probs, 0, 1))
        return [b.where(own, lse, from_weights)]

    return g.branch(g.any(own), exact, lambda b: [from_weights])[0]


def _sample(g: _Graph, rows: _Rows, xs: str) -> list[str]:
    """`[B, 1]` tokens and log-sum-exps, sampling from the (penalised) logits `xs`. The
    weights are padded to whole blocks of the draw with zeros."""
    xb = _banned(g, xs)
    weights = g.branch(
        rows.any_hot,
        lambda b: [b.op("Softmax", b.op("Mul", xb, rows.inv_t), axis=1)],
        lambda b: [b.op("Softmax", xb, axis=1)],
    )[0]
    tokens = _choose(g, rows, xb, weights)
    return [tokens, _lse(g, rows, weights, tokens)]


def _body(g: _Graph) -> list[str]:
    """The graph's outputs, in `OUTPUTS` order."""
    rows = _Rows(g)
    any_pen = g.any(g.op("Not", g.op("Equal", "repetition_penalty", g.f32(1.0))))
    tokens, lse = g.branch(
        any_pen,
        lambda b: _sample(b, rows, _penalised(b)),
        lambda b: _sample(b, rows, _LOGITS),
    )
    chosen = g.op("Sub", g.op("GatherElements", _LOGITS, tokens, axis=1), lse)
    n_top = g.op("Reshape", g.op("ReduceMax", "top_logprobs", keepdims=0), g.i64([1]))
    n_top = g.op("Max", n_top, g.i64([0]))
    top_vals, top_ids = g.ops("TopK", [_LOGITS, n_top], 2, axis=1, largest=1, sorted=1)
    flat = g.i64([-1])
    return [
        g.op("Reshape", tokens, flat),
        g.op("Reshape", chosen, flat),
        g.op("Reshape", lse, flat),
        top_ids,
        g.op("Sub", top_vals, lse),
        g.op("Reshape", rows.u, flat),
    ]


def build() -> onnx.ModelProto:
    """The sampler graph (deterministic: the same bytes on every build)."""
    g = _Graph([0])
    view = helper.make_node("Reshape", ["logits", g.i64([0, -1])], [_LOGITS], name=_LOGITS)
    g.nodes.append(view)
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
    # Checked as [B, V]; written with the rank open, so that a step graph's [B, 1, V] output
    # (which onnxruntime cannot re-view on a device) is fed as it is.
    model.graph.input[0].type.tensor_type.ClearField("shape")
    return model


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0]) if args else GRAPH_PATH
    path.write_bytes(build().SerializeToString())
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
