"""The continuous cache (Grave et al. 2017): a document's recent words, recalled by context.

A recurrent model soon forgets a rare name it read a few hundred words ago; a text that names
a character once tends to name them again. The cache keeps, for each position `i` already
scored, the pair `(h_i, y_i)`: the last layer's features there and the token that came next.
At a later position `t` it predicts the tokens that followed similar contexts,

    p_cache(y) = sum over the last `window` pairs of softmax_i(theta * h_t . h_i) [y_i == y]

and the probability of the next token mixes it with the model's:

    p(y) = (1 - lambda) p_model(y) + lambda p_cache(y).

`p_cache` is a distribution over the tokens the cache holds, so the mixture is one too; while
the cache is empty (a text's first token) `p = p_model`. It needs no training: `window`,
`theta` and `lambda` are tuned on validation text after training (`training/cache.py`) and
ship in the bundle manifest's `continuous_cache` block. The server applies it on request:
`Score` to every token of a text (`ContinuousCache`), `PredictNext` and `TypingSession` to the
next token after a context (`next_logprobs`, the whole distribution). This module is the one
implementation that tuning and serving use, so the tuned figures are the served ones.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class CacheParams:
    """The cache's three settings (the manifest spells `lam` as `lambda`)."""

    window: int  # pairs remembered
    theta: float  # sharpness of the recall over feature dot products
    lam: float  # the cache's share of the mixture

    def __post_init__(self) -> None:
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be an integer of at least 1, not {self.window!r}")
        if not self.theta > 0 or self.theta == float("inf"):
            raise ValueError(f"theta must be a positive finite number, not {self.theta!r}")
        if not 0 < self.lam < 1:
            raise ValueError(f"lambda must be between 0 and 1 (exclusive), not {self.lam!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"window": self.window, "theta": self.theta, "lambda": self.lam}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CacheParams:
        """From a manifest's or checkpoint's block; ValueError names a missing or bad field."""
        missing = [k for k in ("window", "theta", "lambda") if k not in data]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        for key in ("theta", "lambda"):
            value = data[key]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{key} must be a number, not {value!r}")
        return cls(data["window"], float(data["theta"]), float(data["lambda"]))


class ContinuousCache:
    """One document's cache. Feed it the document's positions in order, in chunks of any size."""

    def __init__(self, window: int, theta: float, hidden: int) -> None:
        self.window = window
        self.theta = theta
        self.keys = np.empty((0, hidden), dtype=np.float32)  # the last `window` features
        self.values = np.empty(0, dtype=np.int64)  # the token that followed each

    def recall(self, features: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`p_cache` of each target `[n]` (float64) and whether the cache held anything there;
        then remember the chunk's pairs. `features` `[n, hidden]`, `targets` `[n]`."""
        weights, values, seen = self.attend(features, targets)
        weights *= values[None, :] == targets[:, None]
        return weights.sum(axis=1, dtype=np.float64), seen

    def attend(
        self, features: np.ndarray, targets: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each position's recall weights over the pairs `[n, m]` (float32, summing to 1 where
        the cache held anything, else 0), the token of each pair `[m]` and whether it held any;
        then remember the chunk's pairs. `p_cache(y)` is the weight on the pairs whose token
        is `y`."""
        n, held = len(targets), len(self.values)
        keys = np.concatenate((self.keys, features.astype(np.float32, copy=False)))
        values = np.concatenate((self.values, targets.astype(np.int64, copy=False)))
        hidden, seen = _masks(n, held, self.window)
        scores = features.astype(np.float32, copy=False) @ keys.T
        scores *= np.float32(self.theta)
        np.putmask(scores, hidden, -np.inf)
        top = np.where(seen, scores.max(axis=1, initial=-np.inf), np.float32(0.0))
        weights = np.exp(scores - top[:, None], out=scores)
        total = weights.sum(axis=1, dtype=np.float64)
        weights /= np.where(seen, total, 1.0).astype(np.float32)[:, None]
        self.keys, self.values = keys[-self.window :], values[-self.window :]
        return weights, values, seen


@functools.lru_cache(maxsize=64)
def _masks(n: int, held: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Which of `held + n` pairs each of a chunk's `n` positions must not see (a pair at or
    after it, or more than `window` back), and whether it sees any. A document's chunks after
    the first few all have the same `(n, held)`, so the masks are kept."""
    col = np.arange(held + n)[None, :]
    row = held + np.arange(n)[:, None]
    visible = (col < row) & (col >= row - window)
    hidden, seen = ~visible, np.any(visible, axis=1)
    hidden.setflags(write=False)
    seen.setflags(write=False)
    return hidden, seen


def next_logprobs(
    logprobs: np.ndarray,
    query: np.ndarray,
    keys: np.ndarray,
    values: np.ndarray,
    params: CacheParams,
) -> np.ndarray:
    """float32 `[V]`: the model's next-token log-probs `logprobs` mixed with the cache's recall,
    by `query` (the features after the context), of the pairs `keys` `[m, hidden]` (the features
    before each token of `values`, in order). The last `window` pairs count, as in `recall`;
    with none, the model's alone."""
    if len(values) == 0:
        return logprobs
    cache = ContinuousCache(params.window, params.theta, len(query))
    cache.keys = keys[-params.window :].astype(np.float32, copy=False)
    cache.values = values[-params.window :].astype(np.int64, copy=False)
    # The query's own pair (its token unknown, 0 here) is after it, so it gets no weight.
    weights, tokens, _ = cache.attend(query[None, :], np.zeros(1, dtype=np.int64))
    p_cache = np.bincount(tokens, weights=weights[0], minlength=len(logprobs))
    return mix(logprobs, p_cache, np.ones(len(logprobs), dtype=bool), params.lam)


def mix(logprobs: np.ndarray, p_cache: np.ndarray, seen: np.ndarray, lam: float) -> np.ndarray:
    """float32 log p of each target under the mixture; the model's alone where nothing was seen."""
    mixed = np.log((1.0 - lam) * np.exp(logprobs.astype(np.float64)) + lam * p_cache)
    return np.where(seen, mixed, logprobs).astype(np.float32)
