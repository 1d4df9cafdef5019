"""Running statistics of training steps: loss, gradient norms, clipping and speed.

A meter is a plain dict of sums (so `train_state.pt` stores it as it is); the loop keeps one
for the epoch and one for the interval between two `train` metrics records.
"""

from __future__ import annotations

import math


def perplexity(loss: float) -> float:
    """e^loss, or infinity where that is beyond a float (the loss of a diverging run)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def new_meters() -> dict[str, dict]:
    """The loop's two meters, empty: the epoch's and the current interval's."""
    return {"epoch": new_meter(), "interval": new_meter()}


def new_meter() -> dict:
    return {
        "loss_sum": 0.0,
        "tokens": 0,
        "steps": 0,
        "gnorm_sum": 0.0,
        "gnorm_max": 0.0,
        "clip_sum": 0.0,
        "clipped": 0,
        "seconds": 0.0,
    }


def meter_update(
    m: dict, loss: float, tokens: int, gnorm: float, limit: float, seconds: float
) -> None:
    m["loss_sum"] += loss * tokens
    m["tokens"] += tokens
    m["steps"] += 1
    m["gnorm_sum"] += gnorm
    m["gnorm_max"] = max(m["gnorm_max"], gnorm)
    m["clip_sum"] += limit
    m["clipped"] += gnorm > limit
    m["seconds"] += seconds


def meter_summary(m: dict) -> dict:
    """Loss, gradient norms, the clipping threshold and the training speed since the reset."""
    loss = m["loss_sum"] / max(m["tokens"], 1)
    steps = max(m["steps"], 1)
    clip = m.get("clip_sum", math.inf) / steps
    return {
        "train_loss": loss,
        "train_perplexity": perplexity(loss),
        "grad_norm_mean": m["gnorm_sum"] / steps,
        "grad_norm_max": m["gnorm_max"],
        "clip_threshold_mean": clip if math.isfinite(clip) else None,
        "clipped_fraction": m.get("clipped", 0) / steps,
        "tokens_per_s": m["tokens"] / m["seconds"] if m.get("seconds") else None,
    }
