"""How a run shows its progress within an epoch: a progress bar on a terminal, and on anything
else (a log file, a pipe, a job scheduler's capture) plain lines at fixed points, so the log
gets a line per tenth of an epoch instead of a carriage-return-redrawn bar every second."""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm import tqdm


class EpochProgress:
    """The progress of one epoch's windows, shown as a bar or as lines (or not at all)."""

    def __init__(
        self, total: int, initial: int, desc: str, every: int, enabled: bool, file: TextIO
    ) -> None:
        self.total, self.desc, self.every, self.file = total, desc, every, file
        self.plain = enabled and not file.isatty()
        self.bar = tqdm(
            total=total,
            initial=initial,
            desc=desc,
            unit="batch",
            disable=not enabled or self.plain,
            leave=False,
            file=file,
            mininterval=1.0,
        )

    def update(self, window: int, loss: float, tokens_per_s: float) -> None:
        """Window `window` (1-based, of `total`) is done, at this loss and speed."""
        self.bar.update()
        self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:.0f}", refresh=False)
        if self.plain and (window % self.every == 0 or window == self.total):
            print(
                f"{self.desc} | batch {window}/{self.total} ({100 * window // self.total}%) | "
                f"loss {loss:.3f} | {tokens_per_s:.0f} tok/s",
                file=self.file,
                flush=True,
            )

    def close(self) -> None:
        self.bar.close()


def epoch_progress(total: int, initial: int, desc: str, every: int, enabled: bool) -> EpochProgress:
    """On standard error, where the run's other lines go."""
    return EpochProgress(total, initial, desc, every, enabled, sys.stderr)
