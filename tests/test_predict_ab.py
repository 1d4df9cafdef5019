"""The PredictNext A/B tool against real servers on a tiny bundle: one row per checkout with
every round's ratio, and a directory that is not a checkout refused."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from benchmarks.predict_ab import main

ROOT = Path(__file__).resolve().parents[1]


def test_each_checkouts_server_is_measured_every_round(
    default_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--bundle", str(default_bundle), "--quick", "--rounds", "2"]
    assert main([*args, "--checkout", str(ROOT), "--checkout", str(ROOT)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("PredictNext p50 / (bare step after a 1 ms idle gap + echo)")
    assert len(lines) == 3
    for line in lines[1:]:
        match = re.match(
            rf"{re.escape(str(ROOT))}: ratio median ([\d.]+) \(rounds ([\d., ]+)\), "
            r"p50 median ([\d.]+) ms",
            line,
        )
        assert match, line
        assert float(match.group(1)) > 0 and float(match.group(3)) > 0
        assert len(match.group(2).split(", ")) == 2  # each round listed


def test_a_directory_that_is_not_a_checkout_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--checkout", str(tmp_path)])
    assert exit_.value.code == 2
    assert "not a checkout of this project" in capsys.readouterr().err
