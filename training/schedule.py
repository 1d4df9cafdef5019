"""The learning rate at each step: linear warm-up, then constant, cosine or plateau decay.

- `plateau`: the pytorch/examples word_language_model rule. After a validation that is not
  better than the best so far, the rate is multiplied by `PLATEAU_DECAY` (divided by 4).
- `cosine`: from `lr` down to `min_lr` along half a cosine over the run's progress. With a time
  budget (`--max-minutes`) the progress is `max(step / total_steps, elapsed / budget)`, so the
  decay ends when the run does, whichever limit comes first.
- `constant`: `lr` throughout.

The warm-up multiplies any of them by `(step + 1) / warmup_steps` for the first steps (after
Goyal et al. 2017); Adam's early moment estimates are noisy, so large first steps can wreck a
recurrent network before it has learnt anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("plateau", "cosine", "constant")
PLATEAU_DECAY = 0.25
MIN_LR_RATIO = 0.1  # the default floor of the cosine, as a fraction of `lr` (nanoGPT's)


@dataclass
class Schedule:
    kind: str
    lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int
    budget_s: float | None = None
    scale: float = 1.0  # plateau: the product of the decays so far

    def progress(self, step: int, elapsed_s: float) -> float:
        """How far the run is, from 0 to 1, by steps or by wall time, whichever is further."""
        by_steps = step / max(self.total_steps, 1)
        by_time = elapsed_s / self.budget_s if self.budget_s else 0.0
        return min(1.0, max(by_steps, by_time))

    def rate(self, step: int, elapsed_s: float = 0.0) -> float:
        """The learning rate of optimizer step `step` (0-based)."""
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        if self.kind == "cosine":
            cosine = 0.5 * (1.0 + math.cos(math.pi * self.progress(step, elapsed_s)))
            return warm * (self.min_lr + (self.lr - self.min_lr) * cosine)
        return warm * self.lr * self.scale

    def validated(self, improved: bool) -> None:
        """Called after each validation; the plateau rule decays when it did not improve."""
        if self.kind == "plateau" and not improved:
            self.scale *= PLATEAU_DECAY

    def state_dict(self) -> dict:
        return {"scale": self.scale}

    def load_state_dict(self, state: dict) -> None:
        if "scale" in state:
            self.scale = float(state["scale"])
        else:  # a checkpoint from before this module: torch's ReduceLROnPlateau state
            self.scale = float(state["_last_lr"][0]) / self.lr
