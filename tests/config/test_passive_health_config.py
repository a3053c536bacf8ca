"""`outlier_detection` and `slow_start` (SPEC sections 3 and 10): defaults, and bad input is
`check-config` exit 2 naming the file, the field path and the line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from connwatch.config import load_settings

BASE = """\
listeners:
  - name: app
    listen: "127.0.0.1:7000"
    upstreams: ["127.0.0.1:6379"]
"""


def check_config(tmp_path: Path, extra: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "connwatch.yaml"
    path.write_text(BASE + extra)
    return subprocess.run(
        [sys.executable, "-m", "connwatch", "check-config", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_defaults_are_the_spec_ones(tmp_path: Path) -> None:
    listener = load_settings(None, base=yaml.safe_load(BASE), env={}).listeners[0]
    od = listener.outlier_detection
    assert od.enabled is False
    assert od.consecutive_failures == 5
    assert od.early_window == 1.0
    assert od.base_ejection_time == 30.0
    assert od.max_ejection_time == 300.0
    assert od.max_ejection_percent == 50
    assert listener.slow_start == 0.0
    shown = check_config(tmp_path, "")
    assert shown.returncode == 0, shown.stderr
    assert "outlier_detection:" in shown.stdout
    assert "max_ejection_percent: 50" in shown.stdout
    assert "slow_start: 0s" in shown.stdout


@pytest.mark.parametrize(
    ("extra", "line", "field", "says"),
    [
        (
            "    outlier_detection: {max_ejection_percent: 101}\n",
            5,
            "listeners[0].outlier_detection.max_ejection_percent",
            "at most 100",
        ),
        (
            "    outlier_detection: {max_ejection_percent: -1}\n",
            5,
            "listeners[0].outlier_detection.max_ejection_percent",
            "at least 0",
        ),
        (
            "    outlier_detection:\n      consecutive_failures: 0\n",
            6,
            "listeners[0].outlier_detection.consecutive_failures",
            "at least 1",
        ),
        (
            "    outlier_detection:\n      base_ejection_time: 0s\n",
            6,
            "listeners[0].outlier_detection.base_ejection_time",
            "more than 0s",
        ),
        (
            "    outlier_detection:\n      early_window: -1s\n",
            6,
            "listeners[0].outlier_detection.early_window",
            "negative",
        ),
        (
            "    outlier_detection:\n      max_ejection_time: 0s\n",
            6,
            "listeners[0].outlier_detection.max_ejection_time",
            "more than 0s",
        ),
        (
            "    outlier_detection:\n      base_ejection_time: 10m\n      max_ejection_time: 5m\n",
            7,
            "listeners[0].outlier_detection.max_ejection_time",
            "at least base_ejection_time",
        ),
        ("    slow_start: -5s\n", 5, "listeners[0].slow_start", "negative"),
    ],
)
def test_bad_values_name_the_field_and_line(
    tmp_path: Path, extra: str, line: int, field: str, says: str
) -> None:
    result = check_config(tmp_path, extra)
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [text for text in result.stderr.splitlines() if field in text]
    assert errors, result.stderr
    assert says in errors[0]
    assert f"connwatch.yaml:{line}: {field}" in errors[0]
