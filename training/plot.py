"""The loss and perplexity curves of a run, drawn from its metrics records into a PNG."""

from __future__ import annotations

import math
from pathlib import Path


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
        ax.plot(*_finite(train, f"train_{key}"), label="train", linewidth=1)
        ax.plot(*_finite(epochs, f"valid_{key}"), "o-", label="validation")
        ax.set_xlabel("tokens seen")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    ax_ppl.set_yscale("log")
    fig.savefig(path, dpi=100, metadata={"Title": title})
    plt.close(fig)


def _finite(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = [(r["tokens_seen"], r[key]) for r in records if math.isfinite(r[key])]
    return [x for x, _ in points], [y for _, y in points]


def run_title(name: str, train_args: dict) -> str:
    """The plot's title: the run's directory name and what it trains."""
    a = train_args
    what = f"{a['cell']} {a['layers']} x {a['hidden']}, {a['tokenizer']} tokens"
    preset = f", preset {a['preset']}" if a.get("preset") else ""
    return f"{name}: {what}{preset}"
