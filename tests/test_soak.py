"""The soak tool against a real server on a tiny bundle: every RPC kind at once, with
cancellations and missed deadlines, leaves the server at rest (no stream, nothing queued)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.soak import main


def test_a_mixed_load_leaves_the_server_at_rest(
    default_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--bundle", str(default_bundle), "--seconds", "3", "--workers", "8"]) == 0
    out = capsys.readouterr().out
    assert "at rest" in out and "unexpected" not in out
    for kind in ("cancel", "deadline", "embed", "generate", "predict", "score", "typing"):
        assert f"  {kind} " in out


def test_unknown_kinds_are_named(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--kinds", "generate,sing"])
    assert "unknown ['sing']" in capsys.readouterr().err
