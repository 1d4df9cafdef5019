"""Next-token sampling, vectorised over a batch of rows with per-row parameters.

Every filter becomes a per-row logit threshold (top-k, top-p and min-p keep the tokens whose
logit is at least the threshold), so one masked pass serves any mix of parameters, and a row's
result depends only on its own logits, parameters and uniform draw: the batch it shares never
changes which token it gets. Tokens are drawn by inverse CDF from exactly one uniform per row,
over the vocabulary in id order, with a two-level (block of 128, then token) search instead of
a full-width cumulative sum (10x slower in numpy).

Filter semantics (as vLLM): repetition penalty and bans first; then, on the
temperature-scaled distribution, top-k, top-p over the top-k-renormalised distribution, and
min-p relative to the most likely token. Ties at a threshold are all kept.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from server.fastsample import kernels as _fastsample  # None where none was built

# The most alternatives a request may ask for per token (the public API's limit).
MAX_TOP_LOGPROBS = 20
# Tokens per block of the two-level searches. Blocks of at most 128 also make block sums
# independent of how many trailing zeros a row carries (numpy sums <= 128 items in 8 fixed
# lanes), which keeps thresholds identical whatever width the batch asked for.
BLOCK = 128
# Candidates sorted first when top-p needs the head of the distribution; rows whose nucleus is
# wider are redone with the whole row sorted.
_TOP_P_CANDIDATES = 256


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens.

    The one place sampling parameters are validated (the ranges of the public API, see
    docs/api.md): construction raises ValueError naming the field, and `check_vocab` checks
    them against a model's vocabulary. Callers turn the message into their error.
    """

    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # CTRL-style, on prompt and generated tokens
    seed: int | None = None  # same seed -> same tokens, whatever else shares the batch
    top_logprobs: int = 0  # alternatives to report per token
    banned_ids: frozenset[int] = field(default_factory=frozenset)  # never sampled

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"{name} must be {rule}, not {getattr(self, name)!r}")

        check(
            math.isfinite(self.temperature) and self.temperature >= 0,
            "temperature",
            ">= 0 (0 is greedy)",
        )
        check(self.top_k >= 0, "top_k", ">= 0 (0 is off)")
        check(0.0 < self.top_p <= 1.0, "top_p", "in (0, 1]")
        check(0.0 <= self.min_p < 1.0, "min_p", "in [0, 1) (0 is off)")
        check(
            math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
            "repetition_penalty",
            "> 0 (1 is off)",
        )
        check(
            0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
            "top_logprobs",
            f"in [0, {MAX_TOP_LOGPROBS}]",
        )
        bad = sorted(i for i in self.banned_ids if not isinstance(i, int) or i < 0)
        if bad:
            raise ValueError(f"banned_ids must hold token ids (integers >= 0), not {bad[:5]}")

    def check_vocab(self, vocab_size: int) -> None:
        """Raise ValueError when the parameters do not fit a vocabulary of `vocab_size`."""
        outside = sorted(i for i in self.banned_ids if i >= vocab_size)
        if outside:
            raise ValueError(
                f"banned_ids {outside[:5]} are outside the vocabulary (size {vocab_size})"
            )
        if len(self.banned_ids) >= vocab_size:
            raise ValueError(f"banned_ids bans all {vocab_size} tokens; nothing could be sampled")
        if self.top_logprobs > vocab_size:
            raise ValueError(
                f"top_logprobs must be at most the vocabulary size {vocab_size}, "
                f"not {self.top_logprobs}"
            )

    def rng(self) -> np.random.Generator:
        """The request's own random stream: seeded, or fresh entropy when `seed` is None."""
        if self.seed is None:
            return np.random.default_rng()
        return np.random.default_rng(self.seed % 2**64)


class GeneratedToken(NamedTuple):
    """One sampled token (a named tuple: made 64 times a step, it must be cheap to build)."""

    token_id: int
    logprob: float  # log-prob under the model's (unmodified) distribution
    top: tuple[tuple[int, float], ...]  # top alternatives (token_id, logprob), most likely first


@dataclass(frozen=True)
class Samples:
    """What `Sampler.sample` chose for each row."""

    tokens: np.ndarray  # [R] int64
    logprobs: np.ndarray  # [R] float32, under the unmodified distribution
    lse: np.ndarray  # [R] float32, log-sum-exp of each row's raw logits
    top: list[tuple[tuple[int, float], ...]]  # per row; empty where not asked for


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-softmax over the last axis of float32 logits (a new array): in one native pass a row
    where the extension was built (server/_fastsample.c; about 4 times numpy's speed, which
    every next-token call pays), else numpy's; the two agree to a float32 rounding."""
    if _fastsample is not None and logits.dtype == np.float32 and logits.size:
        x = np.ascontiguousarray(logits)
        out = np.empty_like(x)
        _fastsample.log_softmax(x, out)
        return out
    return numpy_log_softmax(logits)


def native_top_k(values: np.ndarray, k: int) -> np.ndarray | None:
    """The indices of the `k` largest of 1-D float `values` (1 <= k), largest first, ties by
    the lower index, in one native pass (server/_fastsample.c: 2 us for a 10,000-token row
    against 12 for numpy's sampled partition); None where the extension is not built, or
    when `values` holds fewer than `k` that are not NaN."""
    if _fastsample is None or values.dtype not in _TOP_K_TYPES or values.ndim != 1:
        return None
    ids = np.empty(k, dtype=np.int64)
    got = _fastsample.top_k(np.ascontiguousarray(values), ids, np.empty(k, dtype=values.dtype))
    return ids if got == k else None


_TOP_K_TYPES = (np.dtype(np.float32), np.dtype(np.float64))


def numpy_log_softmax(logits: np.ndarray) -> np.ndarray:
    """`log_softmax` in numpy (the reference of the native one)."""
    m = logits.max(axis=-1, keepdims=True)
    return logits - (m + np.log(np.exp(logits - m).sum(axis=-1, keepdims=True)))


class Sampler:
    """Samples rows of logits, keeping its `[rows, V]` temporaries from call to call.

    Fresh multi-megabyte arrays on every step cost more in page faults than the arithmetic
    (measured: 6.5 ms instead of 1.5 ms for 64 rows of 10k), so each sampler owns reusable
    scratch buffers; use one sampler per thread.
    """

    def __init__(self) -> None:
        self._scratch: dict[str, np.ndarray] = {}

    def _buffer(self, name: str, rows: int, cols: int, dtype: type = np.float32) -> np.ndarray:
        buf = self._scratch.get(name)
        if buf is None or buf.shape[0] < rows or buf.shape[1] != cols:
            buf = self._scratch[name] = np.empty((rows, cols), dtype=dtype)
        return buf[:rows]

    def _padded(self, name: str, rows: int, cols: int) -> np.ndarray:
        """A float32 scratch buffer `[rows, blocks * BLOCK]` whose columns past `cols` are 0.

        Callers write only `[:, :cols]`, so the padding stays zero and block searches can
        read whole blocks without bounds checks (see `_locate`).
        """
        width = -(-cols // BLOCK) * BLOCK
        buf = self._scratch.get(name)
        if buf is None or buf.shape[0] < rows or buf.shape[1] != width:
            buf = self._scratch[name] = np.zeros((rows, width), dtype=np.float32)
        return buf[:rows]

    def sample(
        self,
        logits: np.ndarray,
        params: Sequence[SamplingParams],
        history: Sequence[np.ndarray | None],
        uniforms: np.ndarray,
    ) -> Samples:
        """Pick one token per row of float32 `logits` `[R, V]`.

        `history[r]`: the token ids the repetition penalty applies to (prompt and generated;
        None when the row has no penalty). `uniforms[r]`: the row's one uniform draw in [0, 1).

        Rows with only a temperature and bans (the common case) take a short path that reuses
        the exponentials computed for the log-sum-exp; rows with filters or a penalty take the
        general one. Which path a row takes depends on its own parameters only.
        """
        rows, vocab = logits.shape
        is_plain = [_plain(p, h) for p, h in zip(params, history, strict=True)]
        plain = [r for r in range(rows) if is_plain[r]]
        filtered = [r for r in range(rows) if not is_plain[r]]
        m = logits.max(axis=1, keepdims=True)
        padded = self._padded("exp", rows, vocab)
        e = padded[:, :vocab]
        np.exp(np.subtract(logits, m, out=e), out=e)
        # Plain rows' banned tokens weigh nothing in their sampling weights, but they count
        # in the log-sum-exp of the unmodified distribution: their weights are added back.
        bans = _ban_pairs(params, plain)
        if bans is not None:
            banned = e[bans]
            e[bans] = 0.0
        e_blocks = _block_sums(e)
        total = e_blocks.sum(axis=1, dtype=np.float64)
        if bans is not None:
            total += np.bincount(bans[0], weights=banned, minlength=rows)
        lse = m[:, 0] + np.log(total).astype(np.float32)
        u = np.asarray(uniforms, dtype=np.float64)
        tokens = np.empty(rows, dtype=np.int64)
        if plain:
            filtered += self._sample_plain(logits, m, padded, e_blocks, params, u, plain, tokens)
        if filtered:
            if len(filtered) == rows:
                tokens[:] = self._sample_filtered(logits, params, history, u)
            else:
                filtered.sort()
                idx = np.array(filtered, dtype=np.intp)
                sub_params = [params[r] for r in filtered]
                sub_history = [history[r] for r in filtered]
                tokens[idx] = self._sample_filtered(logits[idx], sub_params, sub_history, u[idx])
        chosen = logits[np.arange(rows), tokens] - lse
        top = self._top(logits, lse, params)
        return Samples(tokens, chosen.astype(np.float32), lse, top)

    def _sample_plain(
        self,
        logits: np.ndarray,
        m: np.ndarray,
        padded: np.ndarray,
        e_blocks: np.ndarray,
        params: Sequence[SamplingParams],
        u: np.ndarray,
        plain: list[int],
        tokens: np.ndarray,
    ) -> list[int]:
        """Sample rows without filters or penalty into `tokens`; rows it cannot do are returned.

        `padded[:, :V]` holds `exp(logits - max)` with the plain rows' banned tokens zeroed:
        the sampling weights at temperature 1, whose block sums are `e_blocks`. Rows at other
        temperatures get theirs recomputed. A row whose banned tokens outweigh all others by so
        much that the rest underflow is handed back, for the general path (which subtracts
        the allowed maximum instead).
        """
        vocab = logits.shape[1]
        e = padded[:, :vocab]
        greedy = [r for r in plain if params[r].temperature == 0]
        drawn = [r for r in plain if params[r].temperature != 0]
        if greedy:
            g = np.array(greedy, dtype=np.intp)
            sub = logits[g]
            bans = _ban_pairs(params, greedy)
            if bans is not None:
                sub[np.searchsorted(g, bans[0]), bans[1]] = -np.inf
            tokens[g] = sub.argmax(axis=1)
        if not drawn:
            return []
        hot = [r for r in drawn if params[r].temperature != 1.0]
        if hot:
            inv_t = np.array([1.0 / params[r].temperature for r in hot], dtype=np.float32)
            if len(hot) == len(e):  # every row: in place
                np.subtract(logits, m, out=e)
                np.multiply(e, inv_t[:, None], out=e)
                np.exp(e, out=e)
            else:
                h = np.array(hot, dtype=np.intp)
                e[h] = np.exp((logits[h] - m[h]) * inv_t[:, None])
            bans = _ban_pairs(params, hot)
            if bans is not None:
                e[bans] = 0.0
            if len(hot) == len(e):
                e_blocks[:] = _block_sums(e)
            else:
                e_blocks[h] = _block_sums(e[h])
        d = np.array(drawn, dtype=np.intp)
        block_cum = np.cumsum(e_blocks[d], axis=1, dtype=np.float64)
        # Below this total the allowed tokens' weights may have underflowed (see above).
        lost = block_cum[:, -1] < 1e-20
        if lost.any():
            keep = ~lost
            d, block_cum = d[keep], block_cum[keep]
        if d.size:
            tokens[d] = _inverse_cdf(padded, vocab, block_cum, u[d], d)
        return [drawn[i] for i in np.flatnonzero(lost).tolist()]

    def _sample_filtered(
        self,
        logits: np.ndarray,
        params: Sequence[SamplingParams],
        history: Sequence[np.ndarray | None],
        u: np.ndarray,
    ) -> np.ndarray:
        """Tokens for rows with any filters and penalties (the general path)."""
        rows, vocab = logits.shape
        temps = np.array([p.temperature for p in params], dtype=np.float32)
        scaled = self._penalised(logits, params, history)
        m_scaled = scaled.max(axis=1, keepdims=True)
        greedy = temps == 0
        inv_t = (1.0 / np.where(greedy, 1.0, temps)).astype(np.float32)
        padded = self._padded("weights", rows, vocab)
        weights = padded[:, :vocab]
        np.subtract(scaled, m_scaled, out=weights)
        np.multiply(weights, inv_t[:, None], out=weights)
        np.exp(weights, out=weights)
        blocks = _block_sums(weights)

        tokens = scaled.argmax(axis=1) if greedy.any() else np.empty(rows, dtype=np.int64)
        drawn = np.flatnonzero(~greedy)
        if drawn.size:
            tau = self._thresholds(scaled, m_scaled[:, 0], inv_t, blocks, params, drawn)
            if np.isfinite(tau).any():
                keep = self._buffer("keep", rows, vocab, np.bool_)
                # A multiply, not np.where: with half a row masked, where is 40x slower.
                np.multiply(weights, np.greater_equal(scaled, tau[:, None], out=keep), out=weights)
                blocks = _block_sums(weights)
            block_cum = np.cumsum(blocks[drawn], axis=1, dtype=np.float64)
            tokens[drawn] = _inverse_cdf(padded, vocab, block_cum, u[drawn], drawn)
        return tokens

    def _penalised(
        self,
        logits: np.ndarray,
        params: Sequence[SamplingParams],
        history: Sequence[np.ndarray | None],
    ) -> np.ndarray:
        """`logits` with repetition penalties and bans applied (a scratch copy if any apply)."""
        pen_rows = [
            r
            for r, p in enumerate(params)
            if p.repetition_penalty != 1.0 and (h := history[r]) is not None and h.size
        ]
        ban_rows = [r for r, p in enumerate(params) if p.banned_ids]
        if not pen_rows and not ban_rows:
            return logits
        out = self._buffer("scaled", *logits.shape)
        np.copyto(out, logits)
        if pen_rows:
            ids = [np.asarray(history[r], dtype=np.int64) for r in pen_rows]
            counts = [len(i) for i in ids]
            rr, cc = np.repeat(pen_rows, counts), np.concatenate(ids)
            pen = np.repeat(
                np.array([params[r].repetition_penalty for r in pen_rows], dtype=np.float32),
                counts,
            )
            vals = out[rr, cc]
            # Repeated (row, id) pairs write the same value: the penalty never compounds.
            out[rr, cc] = np.where(vals > 0, vals / pen, vals * pen)
        if ban_rows:
            ids = [_banned_array(params[r].banned_ids) for r in ban_rows]
            out[np.repeat(ban_rows, [len(i) for i in ids]), np.concatenate(ids)] = -np.inf
        return out

    def _thresholds(
        self,
        scaled: np.ndarray,
        m_scaled: np.ndarray,
        inv_t: np.ndarray,
        blocks: np.ndarray,
        params: Sequence[SamplingParams],
        drawn: np.ndarray,
    ) -> np.ndarray:
        """Per-row logit threshold of top-k, top-p and min-p (-inf where none applies).

        Only the rows in `drawn` (those that sample rather than take the argmax) get one;
        `blocks` are the block sums of the rows' weights (for top-p's total mass).
        """
        rows, vocab = scaled.shape
        tau = np.full(rows, -np.inf, dtype=np.float32)
        if not any(
            (p := params[r]).min_p > 0 or p.top_k > 0 or p.top_p < 1.0 for r in drawn.tolist()
        ):
            return tau
        min_p = np.zeros(rows, dtype=np.float32)
        top_k = np.zeros(rows, dtype=np.int64)
        top_p = np.ones(rows, dtype=np.float64)
        for r in drawn.tolist():
            p = params[r]
            min_p[r], top_k[r], top_p[r] = p.min_p, min(p.top_k, vocab), p.top_p
        has_min = np.flatnonzero(min_p > 0)
        if has_min.size:
            # p_i / p_max >= min_p  <=>  logit_i >= max + T * log(min_p)
            tau[has_min] = m_scaled[has_min] + np.log(min_p[has_min]) / inv_t[has_min]
        heads = np.flatnonzero((top_k > 0) | (top_p < 1.0))
        if heads.size == 0:
            return tau
        want = int(top_k[heads].max())
        mass = None
        if (top_p[heads] < 1.0).any():
            want = max(want, _TOP_P_CANDIDATES)
            mass = blocks[heads].sum(axis=1, dtype=np.float64)
        sub = self._buffer("heads", heads.size, vocab)
        np.take(scaled, heads, axis=0, out=sub, mode="clip")
        head_tau = self._head_thresholds(
            sub, inv_t[heads], top_k[heads], top_p[heads], mass, min(want, vocab)
        )
        tau[heads] = np.maximum(tau[heads], head_tau)
        return tau

    def _head_thresholds(
        self,
        sub: np.ndarray,
        inv_t: np.ndarray,
        top_k: np.ndarray,
        top_p: np.ndarray,
        mass: np.ndarray | None,
        width: int,
    ) -> np.ndarray:
        """Thresholds of top-k then top-p from each row's `width` largest logits.

        `sub` (scratch rows, reordered in place) holds the scaled logits; `mass` each row's
        total weight, for top-p without top-k. Rows whose nucleus reaches past the candidates
        are redone with the whole row sorted.
        """
        n, vocab = sub.shape
        if width < vocab:
            sub.partition(vocab - width, axis=1)
            vals = np.sort(sub[:, vocab - width :], axis=1)[:, ::-1]
        else:
            sub.sort(axis=1)
            vals = sub[:, ::-1]
        idx = np.arange(n)
        tau = np.where(top_k > 0, vals[idx, np.maximum(top_k, 1) - 1], -np.inf).astype(np.float32)
        if mass is None:
            return tau
        q_padded = self._padded("nucleus", n, width)
        q = q_padded[:, :width]
        np.subtract(vals, vals[:, :1], out=q)
        np.multiply(q, inv_t[:, None], out=q)
        np.exp(q, out=q)
        np.multiply(q, vals >= tau[:, None], out=q)
        block_cum = np.cumsum(_block_sums(q), axis=1, dtype=np.float64)
        # Within top-k the candidates hold all the kept mass; without it, the whole row does.
        total = np.where(top_k > 0, block_cum[:, -1], mass)
        j = _locate(q_padded, block_cum, top_p * total, strict=False)
        nucleus = top_p < 1.0
        found = nucleus & (j < width)
        tau[found] = np.maximum(tau[found], vals[found, j[found]])
        wide = np.flatnonzero(nucleus & ~found)
        # With every token a candidate, only rounding stops short of top_p: keep the row.
        if wide.size and width < vocab:
            full = self._head_thresholds(sub, inv_t, top_k, top_p, mass, vocab)
            tau[wide] = full[wide]
        return tau

    def _top(
        self, logits: np.ndarray, lse: np.ndarray, params: Sequence[SamplingParams]
    ) -> list[tuple[tuple[int, float], ...]]:
        """Each row's `top_logprobs` most likely tokens, raw distribution (ties: lower id)."""
        counts = np.array([p.top_logprobs for p in params], dtype=np.int64)
        out: list[tuple[tuple[int, float], ...]] = [()] * len(params)
        rows = np.flatnonzero(counts)
        if rows.size == 0:
            return out
        vocab = logits.shape[1]
        n = int(counts[rows].max())
        sub = self._buffer("top", rows.size, vocab)
        np.take(logits, rows, axis=0, out=sub, mode="clip")
        part = self._buffer("top_part", rows.size, vocab)
        np.copyto(part, sub)
        part.partition(vocab - n, axis=1)
        keep = self._buffer("top_keep", rows.size, vocab, np.bool_)
        r, c = np.nonzero(np.greater_equal(sub, part[:, vocab - n, None], out=keep))
        vals = sub[r, c]
        order = np.lexsort((c, -vals, r))
        r, c, lps = r[order], c[order], vals[order] - lse[rows][r[order]]
        starts = np.searchsorted(r, np.arange(rows.size))
        ids_list, lps_list = c.tolist(), lps.tolist()
        for i, row in enumerate(rows.tolist()):
            s, k = int(starts[i]), int(counts[row])
            out[row] = tuple(zip(ids_list[s : s + k], lps_list[s : s + k], strict=True))
        return out


_BANNED_CACHE: dict[frozenset[int], np.ndarray] = {}


def _banned_array(banned: frozenset[int]) -> np.ndarray:
    """The ids of a banned set as an array, built once per distinct set (they repeat per step)."""
    arr = _BANNED_CACHE.get(banned)
    if arr is None:
        if len(_BANNED_CACHE) > 1024:
            _BANNED_CACHE.clear()
        arr = _BANNED_CACHE[banned] = np.fromiter(sorted(banned), dtype=np.int64)
    return arr


def _block_sums(w: np.ndarray) -> np.ndarray:
    """The sums of each row's blocks of `BLOCK` items, `[n, blocks]`."""
    return np.add.reduceat(w, np.arange(0, w.shape[1], BLOCK), axis=1)


def _locate(
    padded: np.ndarray,
    block_cum: np.ndarray,
    target: np.ndarray,
    strict: bool,
    rows: np.ndarray | None = None,
) -> np.ndarray:
    """Per row, the first index whose running sum of weights passes `target` (> if strict,
    else >=).

    `padded`: the weights in a buffer from `Sampler._padded` (zero past the last column);
    `rows`: its rows that `block_cum` and `target` describe (default: all, in order). May
    return an index past the row (or past a block's end, by rounding); callers clamp.
    """
    n = block_cum.shape[0]
    t = target[:, None]
    passed = block_cum <= t if strict else block_cum < t
    block = np.minimum(passed.sum(axis=1), block_cum.shape[1] - 1)
    idx = np.arange(n)
    before = np.where(block > 0, block_cum[idx, np.maximum(block - 1, 0)], 0.0)
    picked = padded.reshape(len(padded), -1, BLOCK)[idx if rows is None else rows, block]
    running = before[:, None] + np.cumsum(picked, axis=1, dtype=np.float64)
    passed_in = running <= t if strict else running < t
    return block * BLOCK + passed_in.sum(axis=1)


def _inverse_cdf(
    padded: np.ndarray, vocab: int, block_cum: np.ndarray, uniforms: np.ndarray, rows: np.ndarray
) -> np.ndarray:
    """Index i per row with P(i) = w_i / sum(w), from one uniform each.

    `padded[:, :vocab]`: the weights (see `_locate`); `rows`: the rows to draw from;
    `block_cum`: the running sums of their blocks (float64 `[len(rows), blocks]`).
    """
    tokens = _locate(padded, block_cum, uniforms * block_cum[:, -1], strict=True, rows=rows)
    # Rounding can step past a block's last weighted token: take the row's best instead.
    bad = (tokens >= vocab) | (padded[rows, np.minimum(tokens, vocab - 1)] <= 0)
    if bad.any():
        tokens[bad] = padded[rows[bad], :vocab].argmax(axis=1)
    return tokens


def _plain(p: SamplingParams, history: np.ndarray | None) -> bool:
    """Whether a row needs only its temperature and bans (see `Sampler.sample`)."""
    return (
        p.top_k == 0
        and p.top_p >= 1.0
        and p.min_p == 0
        and (p.repetition_penalty == 1.0 or history is None or not history.size)
    )


def _ban_pairs(
    params: Sequence[SamplingParams], rows: list[int]
) -> tuple[np.ndarray, np.ndarray] | None:
    """(row, token id) of every banned token of `rows`, or None when none has bans.

    Rows sharing a banned set (usually all: the servicer bans `<unk>`) are handled together.
    """
    groups: dict[frozenset[int], list[int]] = {}
    for r in rows:
        banned = params[r].banned_ids
        if banned:
            groups.setdefault(banned, []).append(r)
    if not groups:
        return None
    pairs = [
        (np.repeat(members, len(ids)), np.tile(ids, len(members)))
        for banned, members in groups.items()
        for ids in (_banned_array(banned),)
    ]
    if len(pairs) == 1:
        return pairs[0]
    return np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])
