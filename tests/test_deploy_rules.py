"""promtool's unit tests of the alerting rules: synthetic series that fire each alert, and close
ones that must not (tests/data/deploy/rules-test.yaml).

deploy/prometheus/rules.yaml is a PrometheusRule; promtool reads plain rule files, so its
spec.groups are written to rules.yml beside a copy of the test file. promtool comes from
Debian's prometheus package (.ci/run installs it); without it the run is skipped and only the
coverage of the test file is checked.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_deploy import ROOT, _rules, _write_rule_file

RULES_TEST = ROOT / "tests" / "data" / "deploy" / "rules-test.yaml"


def _cases() -> list[dict[str, Any]]:
    test = yaml.safe_load(RULES_TEST.read_text(encoding="utf-8"))
    assert test["rule_files"] == ["rules.yml"]
    return [case for group in test["tests"] for case in group.get("alert_rule_test", [])]


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    alerts = {r["alert"] for r in _rules() if "alert" in r}
    fired = {c["alertname"] for c in _cases() if c["exp_alerts"]}
    quiet = {c["alertname"] for c in _cases() if not c["exp_alerts"]}
    assert fired == alerts, f"no firing case for {sorted(alerts - fired)}"
    assert quiet == alerts, f"no quiet case for {sorted(alerts - quiet)}"
    for case in _cases():
        for alert in case["exp_alerts"]:
            annotations = alert.get("exp_annotations", {})
            assert {"summary", "description"} <= annotations.keys(), case["alertname"]


def _promtool_test(directory: Path) -> subprocess.CompletedProcess[str]:
    _write_rule_file(directory)
    shutil.copy(RULES_TEST, directory / RULES_TEST.name)
    return subprocess.run(
        ["promtool", "test", "rules", RULES_TEST.name],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_unit_tests_of_the_alerts_pass(tmp_path: Path) -> None:
    result = _promtool_test(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
