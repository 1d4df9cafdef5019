"""The A/B tool against real servers on a tiny bundle: one row per stream count and
configuration, every trial counted, and a server that cannot start named."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from benchmarks.ab import main


def test_two_configurations_are_measured_in_turn(
    default_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--bundle", str(default_bundle), "--streams", "1,4", "--trials", "2"]
    assert main([*args, "--duration", "0.3", "--config=", "--config=--batch-threads=2"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert len(rows) == 4
    for row, (streams, label) in zip(
        rows,
        [(1, "(defaults)"), (1, "--batch-threads=2"), (4, "(defaults)"), (4, "--batch-threads=2")],
        strict=True,
    ):
        match = re.match(
            rf"\s*{streams} streams  {re.escape(label)}\s+median\s+([\d,]+) tokens/s", row
        )
        assert match and int(match.group(1).replace(",", "")) > 0, row
        assert len(row.split("trials ")[1].split(", ")) == 2  # each trial listed


def test_a_server_that_cannot_start_is_named(
    default_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--bundle", str(default_bundle), "--trials", "1", "--duration", "0.2"]
    assert main([*args, "--config=--batch-threads=0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ab: ") and "--batch-threads" in err
