"""The loss and perplexity curves of a run, drawn from its metrics records into a PNG."""

from __future__ import annotations

import math
from pathlib import Path

# Perplexities above this are left off the (log-scale) perplexity panel: matplotlib's ticks
# overflow near 1e300, which a diverging run reaches. The loss panel still shows them.
PERPLEXITY_LIMIT = 1e12


def plot_metrics(records: list[dict], path: Path, title: str) -> None:
    """Training loss per interval and validation loss per epoch, against tokens seen, under
    `title` (which also goes into the PNG's metadata). Points whose value is not finite (a
    diverging run's) are left out."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("kind") == "train"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    fig.suptitle(title)
    for ax, key, label in (
        (ax_loss, "loss", "cross-entropy (nats/token)"),
        (ax_ppl, "perplexity", "perplexity"),
    ):
        limit = PERPLEXITY_LIMIT if key == "perplexity" else math.inf
        ax.plot(*_points(train, f"train_{key}", limit), label="train", linewidth=1)
        ax.plot(*_points(epochs, f"valid_{key}", limit), "o-", label="validation")
        ax.set_xlabel("tokens seen")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    ax_ppl.set_yscale("log")
    fig.savefig(path, dpi=100, metadata={"Title": title})
    plt.close(fig)


def _points(records: list[dict], key: str, limit: float) -> tuple[list[float], list[float]]:
    """(tokens seen, value) of the records whose value is finite and at most `limit`."""
    points = [(r["tokens_seen"], r[key]) for r in records if r[key] <= limit and r[key] < math.inf]
    return [x for x, _ in points], [y for _, y in points]


def run_title(name: str, train_args: dict) -> str:
    """The plot's title: the run's directory name and what it trains."""
    a = train_args
    what = f"{a['cell']} {a['layers']} x {a['hidden']}, {a['tokenizer']} tokens"
    preset = f", preset {a['preset']}" if a.get("preset") else ""
    return f"{name}: {what}{preset}"
