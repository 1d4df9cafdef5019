"""Sampling for a whole batch in one pass, with parameters as per-row vectors.

A batch's sampling parameters are data (`SamplingRows`: one vector per parameter, one row per
request, the banned ids, and a `[B, V]` mask of seen tokens), so a step samples every row with one
call whose Python cost does not depend on the batch size: `BatchSampler.sample(logits, rows)`
runs an ONNX graph (`server/sampler.onnx`, built by `exporter/sampler_graph.py`) fed the
step's `[B, V]` logits, and only the chosen ids, their log-probs and the requested top
log-probs come back to numpy. Filter semantics are those of `server.sampling` (vLLM's:
repetition penalty and bans, then temperature, top-k, top-p over the top-k-renormalised
distribution, min-p; ties at a threshold kept), and `ReferenceSampler` gives the same results
through the numpy `Sampler`.

Randomness is a counter-based stream: row r's uniform is a hash of (seed[r], position[r])
(`stream_uniforms`), computed for all rows at once, so a seeded request draws the same
uniforms whatever shares its batch. A request without a seed gets a random one, drawn once
when its row is built.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from server.sampling import GeneratedToken, Sampler, Samples, SamplingParams

GRAPH_PATH = Path(__file__).with_name("sampler.onnx")  # built by exporter/sampler_graph.py
_MASK32 = np.uint64(0xFFFFFFFF)
# A request's generation limits: the most tokens it generates, and the ids that stop it.
Limits = tuple[int, frozenset[int]]
NO_LIMITS: Limits = (0, frozenset())  # a request that does not generate
# The hash's constants (shared with the graph builder, which must compute the same bits).
HASH_START = 0x9E3779B9
# A 32-bit integer hash ("lowbias32" of Wellons' hash-prospector, second variant): multipliers
# below 2^31, so the graph's int64 products of 32-bit values stay below 2^63.
HASH_MIX = (0x21F0AAAD, 0x735A2D97)
HASH_SHIFTS = (16, 15, 15)


@dataclass
class SamplingRows:
    """Per-row generation data of a batch: row r of every field belongs to request r.

    A generating row's sampling parameters, its counter-based random stream (seed, position:
    the position is also how many tokens the row has generated), its limits (the most tokens,
    the ids that stop it) and its last token (the next step's input). Rows of requests that
    do not generate hold neutral parameters and a limit of 0. Build rows for new requests
    with `from_params`, keep them with the batch (`filter`, `concatenate`), and call `advance`
    with each step's chosen tokens: it says which rows ended, for the whole batch at once.

    A batch's rows are filtered and concatenated whenever requests end and start (about once
    a step at 64 streams of 64-token calls), so no field is as wide as the vocabulary: the
    repetition penalty's seen tokens are a mask per penalised row only, and a `[B, V]` mask
    is made (`seen_mask`) only for the sampler graph, which reads one (two `[64, V]` masks
    filtered and concatenated cost 1.4 ms, a third of a 64-row step).
    """

    temperature: np.ndarray  # [B] float32; 0 = greedy
    top_k: np.ndarray  # [B] int64; 0 = off
    top_p: np.ndarray  # [B] float32; 1 = off
    min_p: np.ndarray  # [B] float32; 0 = off
    repetition_penalty: np.ndarray  # [B] float32; 1 = off
    top_logprobs: np.ndarray  # [B] int64: alternatives to report
    seed: np.ndarray  # [B] int64: the stream's seed mod 2**64, as two's complement
    position: np.ndarray  # [B] int64: index of the row's next uniform in its stream
    # [B, N] int64: each row's distinct banned ids, then -1s (what the samplers read: a mask
    # costs the graph a full-width pass).
    banned_ids: np.ndarray
    max_tokens: np.ndarray  # [B] int64: the most tokens the row generates (0: it does not)
    stop_ids: np.ndarray  # [B, S] int64: the ids that end the row's generation, then -1s
    last_token: np.ndarray  # [B] int64: the row's last sampled token (-1 before its first)
    # Per row: bool [V], the tokens the repetition penalty applies to, for a penalised row
    # (repetition_penalty != 1); None for the others.
    seen: list[np.ndarray | None]
    vocab_size: int

    @classmethod
    def from_params(
        cls,
        params: Sequence[SamplingParams],
        histories: Sequence[np.ndarray | None],
        vocab_size: int,
        limits: Sequence[Limits] | None = None,
    ) -> SamplingRows:
        """Rows for new requests; `histories[r]`: the prompt's token ids (for the penalty);
        `limits[r]`: the request's most tokens and stop ids (default: it does not generate).

        Draws the random seed of each request without one: build a request's row once.
        """
        n = len(params)
        limits = limits if limits is not None else [NO_LIMITS] * n
        banned_ids = _padded_ids([p.banned_ids for p in params])
        stop_ids = _padded_ids([stops for _, stops in limits])
        seen: list[np.ndarray | None] = [None] * n
        for r, (p, h) in enumerate(zip(params, histories, strict=True)):
            if p.repetition_penalty != 1.0:
                seen[r] = np.zeros(vocab_size, dtype=np.bool_)
                if h is not None:
                    seen[r][np.asarray(h, dtype=np.int64)] = True  # type: ignore[index]
        seeds = [secrets.randbits(64) if p.seed is None else p.seed % 2**64 for p in params]
        return cls(
            temperature=np.array([p.temperature for p in params], dtype=np.float32),
            top_k=np.array([p.top_k for p in params], dtype=np.int64),
            top_p=np.array([p.top_p for p in params], dtype=np.float32),
            min_p=np.array([p.min_p for p in params], dtype=np.float32),
            repetition_penalty=np.array([p.repetition_penalty for p in params], dtype=np.float32),
            top_logprobs=np.array([p.top_logprobs for p in params], dtype=np.int64),
            seed=np.array(seeds, dtype=np.uint64).view(np.int64),
            position=np.zeros(n, dtype=np.int64),
            banned_ids=banned_ids,
            max_tokens=np.array([most for most, _ in limits], dtype=np.int64),
            stop_ids=stop_ids,
            last_token=np.full(n, -1, dtype=np.int64),
            seen=seen,
            vocab_size=vocab_size,
        )

    def __len__(self) -> int:
        return len(self.temperature)

    def filter(self, rows: np.ndarray | Sequence[int]) -> SamplingRows:
        """The rows `rows` (indices into this batch), in that order, as new arrays."""
        idx = np.asarray(rows, dtype=np.intp)
        arrays = {name: getattr(self, name)[idx] for name in ROW_ARRAYS}
        seen = [None if (m := self.seen[i]) is None else m.copy() for i in idx.tolist()]
        return SamplingRows(**arrays, seen=seen, vocab_size=self.vocab_size)

    @staticmethod
    def concatenate(parts: Sequence[SamplingRows]) -> SamplingRows:
        """The rows of `parts`, one after another, as new arrays."""
        vocab_size = parts[0].vocab_size
        if any(p.vocab_size != vocab_size for p in parts):
            raise ValueError("sampling rows of different vocabularies cannot share a batch")
        fields = {
            name: _concatenate_ids([getattr(p, name) for p in parts])
            if name in ID_LISTS
            else np.concatenate([getattr(p, name) for p in parts])
            for name in ROW_ARRAYS
        }
        seen = [None if m is None else m.copy() for p in parts for m in p.seen]
        return SamplingRows(**fields, seen=seen, vocab_size=vocab_size)

    def advance(self, tokens: np.ndarray) -> np.ndarray:
        """Record each row's chosen token, in place: next stream position (one more token
        generated), last token, token now seen. Returns [B] bool: the rows whose generation
        the token ends (a stop id, or the most tokens reached).

        O(B) numpy work whatever the batch; the penalised rows' masks are updated, not copied.
        """
        self.position += 1
        self.last_token[:] = tokens
        for r in (self.repetition_penalty != 1.0).nonzero()[0].tolist():
            mask = self.seen[r]
            assert mask is not None, "a penalised row has its seen tokens"
            mask[int(tokens[r])] = True
        ended = self.position >= self.max_tokens
        if self.stop_ids.shape[1]:
            ended |= (self.stop_ids == tokens[:, None]).any(axis=1)
        return ended

    def histories(self) -> list[np.ndarray | None]:
        """Each row's seen token ids, what the numpy sampler's penalty reads (None for a row
        not penalised)."""
        return [None if m is None else np.flatnonzero(m) for m in self.seen]

    def seen_mask(self) -> np.ndarray:
        """`[B, V]` bool: every row's seen tokens (none for a row not penalised)."""
        mask = np.zeros((len(self), self.vocab_size), dtype=np.bool_)
        for r, m in enumerate(self.seen):
            if m is not None:
                mask[r] = m
        return mask


# The fields holding one value (or one row of values) per row, which `filter` and
# `concatenate` index as arrays: all but the per-row masks and the vocabulary's size.
ROW_ARRAYS = tuple(f for f in SamplingRows.__dataclass_fields__ if f not in ("seen", "vocab_size"))
# Those holding a list of ids per row, padded with -1s to the batch's longest.
ID_LISTS = ("banned_ids", "stop_ids")


def _padded_ids(lists: Sequence[frozenset[int]]) -> np.ndarray:
    """[N, the longest] int64: each set's ids in order, then -1s."""
    out = np.full((len(lists), max((len(ids) for ids in lists), default=0)), -1, dtype=np.int64)
    for r, ids in enumerate(lists):
        out[r, : len(ids)] = sorted(ids)
    return out


def _concatenate_ids(parts: Sequence[np.ndarray]) -> np.ndarray:
    """`_padded_ids` arrays of several batches, one after another, padded to the widest.
    (Filled in place: `np.pad` cost 30 us a part, paid for both id lists whenever requests
    join a batch, as they do almost every step under load, mostly for no padding at all.)"""
    width = max(p.shape[1] for p in parts)
    if all(p.shape[1] == width for p in parts):
        return np.concatenate(parts)
    out = np.full((sum(len(p) for p in parts), width), -1, dtype=np.int64)
    row = 0
    for p in parts:
        out[row : row + len(p), : p.shape[1]] = p
        row += len(p)
    return out


@dataclass(frozen=True)
class SampledRows:
    """What a sampler chose for each row of a batch."""

    tokens: np.ndarray  # [B] int64
    logprobs: np.ndarray  # [B] float32: the chosen token's, under the unmodified distribution
    lse: np.ndarray  # [B] float32: log-sum-exp of each row's raw logits
    # The top alternatives, most likely first, ties by lower id; K = the most any row asked
    # for, and row r's first top_counts[r] columns are its answer (the rest: unspecified).
    top_ids: np.ndarray  # [B, K] int64
    top_logprobs: np.ndarray  # [B, K] float32: their log-probs (unmodified distribution)
    top_counts: np.ndarray  # [B] int64

    @staticmethod
    def from_samples(parts: Sequence[Samples], top_counts: np.ndarray) -> SampledRows:
        """The numpy `Sampler`'s results for consecutive blocks of rows, in this form."""
        tops = [top for s in parts for top in s.top]
        width = int(top_counts.max(initial=0))
        top_ids = np.zeros((len(tops), width), dtype=np.int64)
        top_lps = np.zeros((len(tops), width), dtype=np.float32)
        for r, top in enumerate(tops):
            if top:
                top_ids[r, : len(top)] = [t for t, _ in top]
                top_lps[r, : len(top)] = [lp for _, lp in top]
        tokens, logprobs, lse = (
            np.concatenate([getattr(s, f) for s in parts]) for f in ("tokens", "logprobs", "lse")
        )
        return SampledRows(tokens, logprobs, lse, top_ids, top_lps, top_counts)

    def generated(self) -> list[GeneratedToken]:
        """Each row's result as a `GeneratedToken` (top alternatives cut to the row's ask)."""
        if not self.top_counts.any():  # no row asked for alternatives: the common case
            # tuple.__new__ straight from map: no Python frame a row (GeneratedToken(...) and
            # its _make each run one: 48 against 32 us for 256 rows).
            rows = zip(self.tokens.tolist(), self.logprobs.tolist(), itertools.repeat(()))
            return list(map(tuple.__new__, itertools.repeat(GeneratedToken), rows))
        ids, lps = self.top_ids.tolist(), self.top_logprobs.tolist()
        return [
            GeneratedToken(t, lp, tuple(zip(ids[r][:k], lps[r][:k], strict=True)))
            for r, (t, lp, k) in enumerate(
                zip(
                    self.tokens.tolist(),
                    self.logprobs.tolist(),
                    self.top_counts.tolist(),
                    strict=True,
                )
            )
        ]


def stream_uniforms(seed: np.ndarray, position: np.ndarray) -> np.ndarray:
    """Row r's uniform in [0, 1) (float64, 32 random bits) at `position[r]` of `seed[r]`'s
    stream: a hash of the seed's two 32-bit halves and the position (mod 2^32, the stream's
    period), bit-identical to the sampler graph's."""
    s = np.asarray(seed, dtype=np.int64).view(np.uint64)
    p = np.asarray(position, dtype=np.int64).view(np.uint64)
    words = [s & _MASK32, s >> np.uint64(32), p & _MASK32]
    h = np.full(s.shape, HASH_START, dtype=np.uint32)
    for w in words:
        h = _hash32(h ^ w.astype(np.uint32))
    h = _hash32(h ^ np.uint32(HASH_START))  # a second round after the counter
    return h.astype(np.float64) * 2.0**-32


def _hash32(h: np.ndarray) -> np.ndarray:
    """The 32-bit integer hash (a bijection with near-full avalanche), wrapping uint32."""
    a, b, c = HASH_SHIFTS
    h = h ^ (h >> np.uint32(a))
    h = h * np.uint32(HASH_MIX[0])
    h = h ^ (h >> np.uint32(b))
    h = h * np.uint32(HASH_MIX[1])
    return h ^ (h >> np.uint32(c))


class ReferenceSampler:
    """The numpy reference: today's `Sampler`, row by row parameters, same uniforms."""

    def __init__(self) -> None:
        self._sampler = Sampler()

    def sample(
        self, logits: np.ndarray, rows: SamplingRows, uniforms: np.ndarray | None = None
    ) -> SampledRows:
        """Sample float32 `logits` `[B, V]`; `uniforms` default to the rows' streams."""
        logits = np.ascontiguousarray(logits, dtype=np.float32)
        u = stream_uniforms(rows.seed, rows.position) if uniforms is None else uniforms
        params = [_row_params(rows, r) for r in range(len(rows))]
        s = self._sampler.sample(logits, params, rows.histories(), np.asarray(u, dtype=np.float64))
        return SampledRows.from_samples([s], rows.top_logprobs)


def _row_params(rows: SamplingRows, r: int) -> SamplingParams:
    return SamplingParams(
        temperature=float(rows.temperature[r]),
        top_k=int(rows.top_k[r]),
        top_p=float(rows.top_p[r]),
        min_p=float(rows.min_p[r]),
        repetition_penalty=float(rows.repetition_penalty[r]),
        top_logprobs=int(rows.top_logprobs[r]),
        banned_ids=frozenset(i for i in rows.banned_ids[r].tolist() if i >= 0),
    )


class BatchSampler:
    """Samples a batch's `[B, V]` logits in one pass of the sampler graph.

    `sample(logits, rows)`: `logits` float32 `[B, V]` or `[B, 1, V]` (a step graph's output as
    it is), a numpy array or an `onnxruntime.OrtValue` (fed to the graph where it is, on
    whatever device); returns a `SampledRows`. The Python
    work per call is the same whatever B. One sampler may serve one thread at a time.
    """

    def __init__(
        self,
        providers: Sequence[str] | None = None,
        options: ort.SessionOptions | None = None,
    ) -> None:
        """`providers`, `options`: for the graph's onnxruntime session (default: CPU, one
        thread)."""
        if options is None:
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(
            str(GRAPH_PATH),
            sess_options=options,
            providers=list(providers) if providers else ["CPUExecutionProvider"],
        )

    def sample(self, logits: np.ndarray | ort.OrtValue, rows: SamplingRows) -> SampledRows:
        shape = tuple(logits.shape()) if isinstance(logits, ort.OrtValue) else logits.shape
        rows_vocab = (len(rows), rows.vocab_size)
        if shape not in (rows_vocab, (rows_vocab[0], 1, rows_vocab[1])):
            raise ValueError(
                f"logits of shape {shape} do not match {len(rows)} rows of a vocabulary "
                f"of {rows_vocab[1]}"
            )
        if rows.banned_ids.size and int(rows.banned_ids.max()) >= rows_vocab[1]:
            raise ValueError(f"banned_ids reach past the vocabulary of {rows_vocab[1]}")
        feeds: dict[str, np.ndarray | ort.OrtValue] = dict(graph_feeds(rows))
        feeds["logits"] = logits
        tokens, logprobs, lse, top_ids, top_values = self._session.run(_OUTPUTS, feeds)
        return SampledRows(tokens, logprobs, lse, top_ids, top_values, rows.top_logprobs)


# The graph's inputs besides the logits: `SamplingRows` fields of the same names.
GRAPH_INPUTS = (
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "top_logprobs",
    "seed",
    "position",
    "seen",
    "banned_ids",
)
_OUTPUTS = ["tokens", "logprobs", "lse", "top_ids", "top_values"]


def graph_feeds(rows: SamplingRows) -> dict[str, np.ndarray]:
    """The sampler graph's inputs besides the logits, from `rows`."""
    return {n: rows.seen_mask() if n == "seen" else getattr(rows, n) for n in GRAPH_INPUTS}
