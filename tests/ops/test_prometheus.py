"""config/prometheus/: the scrape config and alert rules are valid for Prometheus, each
alert fires when it should (promtool's unit tests), and they query only what rigd exports.

promtool comes with Debian's `prometheus` package, which scripts/test.sh installs when it
is missing."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from controller.adapters.metrics import exported_names

ROOT = Path(__file__).resolve().parent.parent.parent
PROM = ROOT / "config" / "prometheus"
ALERTS = {
    "RigdDown",
    "RigdControlLoopStalled",
    "RigdImportOverCap",
    "RigdCannotShed",
    "RigdMeterStale",
    "RigdGridOrderNotCompliant",
    "RigdMqttDisconnected",
}


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip(
            "promtool is not installed: scripts/test.sh installs it (Debian's prometheus "
            "package), then these checks run"
        )
    return subprocess.run(
        [tool, *args], cwd=PROM, capture_output=True, text=True, timeout=60, check=False
    )


def test_scrape_config_is_valid_and_loads_the_rules() -> None:
    r = _promtool("check", "config", "prometheus.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 rule files found" in r.stdout


def test_alert_rules_are_valid() -> None:
    r = _promtool("check", "rules", "rigd-alerts.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{len(ALERTS)} rules found" in r.stdout


def test_each_alert_fires_when_it_should() -> None:
    r = _promtool("test", "rules", "rigd-alerts.test.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    tested = set(re.findall(r"alertname: (\w+)", (PROM / "rigd-alerts.test.yml").read_text()))
    assert tested == ALERTS


def test_rules_query_only_metrics_rigd_exports() -> None:
    text = (PROM / "rigd-alerts.yml").read_text()
    assert set(re.findall(r"alert: (\w+)", text)) == ALERTS
    used = set(re.findall(r"\b(rigd_[a-z_]+)", text))
    assert used and used <= exported_names(), used - exported_names()
