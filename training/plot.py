"""The loss and perplexity curves of a run, drawn from its metrics records into a PNG."""

from __future__ import annotations

from pathlib import Path


def plot_metrics(records: list[dict], path: Path) -> None:
    """Training loss per interval and validation loss per epoch, against tokens seen."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("kind") == "train"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, key, label in (
        (ax_loss, "loss", "cross-entropy (nats/token)"),
        (ax_ppl, "perplexity", "perplexity"),
    ):
        ax.plot(
            [r["tokens_seen"] for r in train],
            [r[f"train_{key}"] for r in train],
            label="train",
            linewidth=1,
        )
        ax.plot(
            [r["tokens_seen"] for r in epochs],
            [r[f"valid_{key}"] for r in epochs],
            "o-",
            label="validation",
        )
        ax.set_xlabel("tokens seen")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    ax_ppl.set_yscale("log")
    fig.savefig(path, dpi=100)
    plt.close(fig)
