"""`upstream_pool` (SPEC sections 3 and 9): defaults as written in SPEC, and every bad input is a
check-config exit 2 that names the field and its line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from connwatch.config import load_settings

HEAD = """\
listeners:
  - name: app
    listen: "127.0.0.1:7000"
    upstreams: ["127.0.0.1:6379"]
"""

SPEC_BLOCK = """\
    upstream_pool:
      enabled: false
      min_idle: 2
      max_idle: 32
      grow: true
      max_idle_age: 60s
      scan_interval: 5s
      scan_max_interval: 30s
      validate: peek
      probe: {send: "PING\\r\\n", expect: "+PONG"}
"""


def check_config(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "connwatch.yaml"
    path.write_text(text)
    return subprocess.run(
        [sys.executable, "-m", "connwatch", "check-config", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_spec_defaults_are_the_defaults(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(HEAD + SPEC_BLOCK)
    (tmp_path / "b.yaml").write_text(HEAD)
    a = load_settings(tmp_path / "a.yaml", env={})
    assert a == load_settings(tmp_path / "b.yaml", env={})
    pool = a.listeners[0].upstream_pool
    assert pool.validation == "peek"
    assert pool.probe.send_bytes == b"PING\r\n"


def test_check_config_shows_the_section_with_defaults(tmp_path: Path) -> None:
    result = check_config(tmp_path, HEAD)
    assert result.returncode == 0, result.stderr
    assert "upstream_pool:" in result.stdout
    assert "validate: peek" in result.stdout


@pytest.mark.parametrize(
    ("block", "line", "field", "words"),
    [
        (
            "    proxy_protocol: {send: v2}\n    upstream_pool: {enabled: true}\n",
            5,
            "listeners[0].proxy_protocol.send",
            "upstream_pool.enabled",
        ),
        (
            "    upstream_pool:\n      min_idle: 8\n      max_idle: 4\n",
            7,
            "listeners[0].upstream_pool.max_idle",
            "at least min_idle (8)",
        ),
        (
            "    upstream_pool:\n      scan_interval: 0s\n",
            6,
            "listeners[0].upstream_pool.scan_interval",
            "more than 0s",
        ),
        (
            "    upstream_pool:\n      max_idle_age: -5s\n",
            6,
            "listeners[0].upstream_pool.max_idle_age",
            "",
        ),
        (
            "    upstream_pool:\n      scan_interval: 10s\n      scan_max_interval: 5s\n",
            7,
            "listeners[0].upstream_pool.scan_max_interval",
            "at least scan_interval",
        ),
        (
            "    upstream_pool:\n      validate: ping\n",
            6,
            "listeners[0].upstream_pool.validate",
            "'peek', 'probe' or 'none'",
        ),
        (
            "    upstream_pool:\n      min_idle: -1\n",
            6,
            "listeners[0].upstream_pool.min_idle",
            "",
        ),
    ],
)
def test_bad_pool_config_is_exit_2_naming_field_and_line(
    tmp_path: Path, block: str, line: int, field: str, words: str
) -> None:
    result = check_config(tmp_path, HEAD + block)
    assert result.returncode == 2, result.stdout
    assert f"connwatch.yaml:{line}: {field}" in result.stderr, result.stderr
    assert words in result.stderr
