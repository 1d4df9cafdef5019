"""What a run shows and draws: a progress bar on a terminal but plain lines in a log, and a loss
plot titled with the run it belongs to."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_train import corpus, read_metrics, tiny

from training.console import EpochProgress
from training.plot import plot_metrics
from training.train import train

__all__ = ["corpus"]  # the corpus fixture of test_train, used here

torch.set_num_threads(1)


def test_a_log_gets_a_plain_line_per_tenth_of_an_epoch(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Standard error is not a terminal here (pytest captures it): no bar redrawn with
    carriage returns, but one line at each point a `train` metrics record is written."""
    out = train(tiny(corpus, tmp_path / "run", epochs=2, quiet=False))
    err = capsys.readouterr().err
    assert "\r" not in err
    progress = [line for line in err.splitlines() if " | batch " in line]
    records = [r for r in read_metrics(out) if r["kind"] == "train"]
    assert len(progress) == len(records) > 2
    assert progress[0].startswith("epoch 1/2 | batch ") and progress[-1].startswith("epoch 2/2")
    assert sum(line.startswith("epoch   ") for line in err.splitlines()) == 2  # the epoch lines


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_the_bar_and_no_lines() -> None:
    screen = Terminal()
    progress = EpochProgress(total=20, initial=0, desc="epoch 1/1", every=2, enabled=True,
                             file=screen)  # fmt: skip
    for window in range(1, 21):
        progress.update(window, loss=3.0, tokens_per_s=1000.0)
    progress.close()
    shown = screen.getvalue()
    assert "\r" in shown and "epoch 1/1" in shown
    assert " | batch " not in shown


def test_quiet_shows_nothing(
    corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train(tiny(corpus, tmp_path / "run", epochs=1, quiet=True))
    assert capsys.readouterr().err == ""


def test_the_loss_plot_is_titled_with_the_run(corpus: Path, tmp_path: Path) -> None:
    out = train(tiny(corpus, tmp_path / "my-run", epochs=1, cell="gru", tokenizer="char"))
    title = "my-run: gru 1 x 16, char tokens"
    assert Image.open(out / "metrics.png").info["Title"] == title
    assert json.loads((out / "config.json").read_text())["train_args"]["cell"] == "gru"


def test_a_diverging_run_still_gets_its_plot(tmp_path: Path) -> None:
    """Perplexities past what a log axis can tick (1e269 and infinity) are left off the
    perplexity panel instead of failing the checkpoint."""
    records = [
        {"kind": "train", "tokens_seen": 100 * i, "train_loss": loss, "train_perplexity": ppl}
        for i, (loss, ppl) in enumerate([(620.4, 2.9e269), (800.0, math.inf), (7.9, 2774.1)])
    ]
    records.append(
        {"kind": "epoch", "tokens_seen": 300, "valid_loss": 7.3, "valid_perplexity": 1459.4}
    )
    plot_metrics(records, tmp_path / "plot.png", "diverging")
    assert Image.open(tmp_path / "plot.png").info["Title"] == "diverging"
