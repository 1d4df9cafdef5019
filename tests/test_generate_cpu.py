"""The server-CPU-per-token tool against real servers on a tiny bundle: every trial reports
bare's and each server's CPU a token, split by thread, and a bad flag is named. Figures are
checked for being there and positive, never for their size."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from benchmarks.generate_cpu import main


def test_each_configuration_is_measured_against_bare(
    default_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--bundle", str(default_bundle), "--streams", "4", "--trials", "2"]
    assert main([*args, "--duration", "0.3", "--config=", "--config=--stream-tokens=1"]) == 0
    out = capsys.readouterr().out.splitlines()
    trials = [line for line in out if line.startswith("trial ")]
    assert len(trials) == 2
    for line in trials:
        assert re.match(r"trial \d  bare [\d.]+ us  \[0\] [\d.]+ us .*\[1\] [\d.]+ us", line), line
    splits = [line for line in out if "us a token by thread:" in line]
    assert len(splits) == 4 and all("event loop" in line for line in splits)
    medians = [line for line in out if line.startswith("median [")]
    assert [m.split(":")[0] for m in medians] == [
        "median [0] (defaults)",
        "median [1] --stream-tokens=1",
    ]
    for line in medians:
        us = float(re.search(r": ([\d.]+) us a token", line).group(1))  # type: ignore[union-attr]
        assert us > 0


def test_a_bad_server_flag_is_named(
    default_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--bundle", str(default_bundle), "--trials", "1", "--duration", "0.2"]
    assert main([*args, "--config=--stream-ms=-1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("generate_cpu: ") and "--stream-ms" in err
