"""Gradient-norm clipping at a fixed threshold or at one set from the running norms.

Pascanu, Mikolov and Bengio (2013, "On the difficulty of training recurrent neural networks")
clip the gradient's norm and suggest taking the threshold from the statistics of the norms seen
so far (they found half to ten times the average norm works). `AutoClip` clips at
`AUTO_FACTOR` times the median of the last `AUTO_WINDOW` norms, the current one included: a
spike (an "exploding gradient") is far above the median and is cut back to it, while the normal
drift of the norm during training moves the threshold along. The median, unlike the mean, is
not dragged up by the spikes it is meant to catch.
"""

from __future__ import annotations

import math
import statistics
from collections import deque

AUTO = "auto"
AUTO_FACTOR = 2.0
AUTO_WINDOW = 200


class FixedClip:
    """Clip at `clip`; 0 means never."""

    def __init__(self, clip: float) -> None:
        self.limit = clip if clip > 0 else math.inf
        self.last = self.limit  # the threshold of the latest step

    def threshold(self, norm: float) -> float:
        return self.limit

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None


class AutoClip:
    """Clip at `factor` x the median of the last `window` gradient norms (this one included)."""

    def __init__(self, factor: float = AUTO_FACTOR, window: int = AUTO_WINDOW) -> None:
        self.factor = factor
        self.norms: deque[float] = deque(maxlen=window)
        self.last = math.inf  # the threshold of the latest step

    def threshold(self, norm: float) -> float:
        if math.isfinite(norm):  # a non-finite norm fails the step; it must not poison the window
            self.norms.append(norm)
        self.last = self.factor * statistics.median(self.norms) if self.norms else math.inf
        return self.last

    def state_dict(self) -> dict:
        return {"norms": list(self.norms)}

    def load_state_dict(self, state: dict) -> None:
        self.norms.clear()
        self.norms.extend(float(n) for n in state.get("norms", []))


Clipper = FixedClip | AutoClip


def make_clipper(clip: float | str) -> Clipper:
    return AutoClip() if clip == AUTO else FixedClip(float(clip))
