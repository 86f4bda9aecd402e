"""deploy/prometheus/sockd-rules.yaml: checked by promtool, and its unit tests (which fire and clear
every alert) passed."""

from __future__ import annotations

import subprocess

import yaml

from support import ROOT, require

RULES = ROOT / "deploy" / "prometheus" / "sockd-rules.yaml"
TESTS = RULES.with_name("sockd-rules.test.yaml")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    command = [require("promtool"), *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=RULES.parent, timeout=120, check=False)


def test_promtool_checks_the_rules() -> None:
    result = promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 10 rules found" in result.stdout


def seconds(duration: str) -> int:
    """A promtool duration of one unit (5m, 7d) in seconds."""
    return int(duration[:-1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[duration[-1]]


def test_promtool_runs_the_rules_unit_tests_which_fire_and_clear_every_alert() -> None:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    alerts = {rule["alert"] for group in groups for rule in group["rules"] if "alert" in rule}
    # Each alert is expected firing at some time of a test, and expected gone later in that test.
    cleared = set()
    for case in yaml.safe_load(TESTS.read_text())["tests"]:
        checks = sorted(case.get("alert_rule_test", []), key=lambda check: seconds(check["eval_time"]))
        for index, check in enumerate(checks):
            later = checks[index + 1 :]
            if check["exp_alerts"] and any(c["alertname"] == check["alertname"] and not c["exp_alerts"] for c in later):
                cleared.add(check["alertname"])
    assert cleared == alerts
    result = promtool("test", "rules", TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
