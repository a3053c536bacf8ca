"""The command line as a user types it: check-config, run without a file, --version."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import connwatch


def connwatch_cmd(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "connwatch", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
    )


GOOD = """\
listeners:
  - name: app
    listen: "127.0.0.1:7000"
    upstreams: ["127.0.0.1:6379"]
"""

BAD_FILES = {
    "unknown key": (GOOD + "    colour: blue\n", ["listeners[0].colour", ":5"]),
    "negative duration": (GOOD + "    idle_timeout: -5s\n", ["listeners[0].idle_timeout", "-5s"]),
    "bad address": (
        GOOD.replace("127.0.0.1:6379", "localhost"),
        ["listeners[0].upstreams[0]", "localhost"],
    ),
    "duplicate name": (
        GOOD + "  - name: app\n    listen: ':7001'\n    upstreams: ['127.0.0.1:1']\n",
        ["app", "listeners[1].name"],
    ),
    "yaml syntax": (GOOD + "    balance: [round_robin\n", ["bad.yaml:6:", "YAML syntax error"]),
    "client limits": (
        GOOD
        + "    client_limits:\n      max_connections: -1\n      connection_rate: -2\n"
        + "      ipv4_prefix: 33\n      ipv6_prefix: 129\n",
        [
            "bad.yaml:6: listeners[0].client_limits.max_connections = -1: must be at least 0",
            "bad.yaml:7: listeners[0].client_limits.connection_rate = -2",
            "bad.yaml:8: listeners[0].client_limits.ipv4_prefix = 33: must be at most 32",
            "bad.yaml:9: listeners[0].client_limits.ipv6_prefix = 129: must be at most 128",
        ],
    ),
    "negative client prefix": (
        GOOD + "    client_limits: {ipv4_prefix: -1}\n",
        ["listeners[0].client_limits.ipv4_prefix = -1: must be at least 0"],
    ),
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_check_config_rejects_bad_files_naming_the_field(kind: str, tmp_path: Path) -> None:
    text, needles = BAD_FILES[kind]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = connwatch_cmd("check-config", "-c", str(path))
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    assert str(path) in result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


def test_check_config_prints_effective_config_with_env_overrides(tmp_path: Path) -> None:
    path = tmp_path / "good.yaml"
    path.write_text(GOOD)
    env = {
        "CONNWATCH_ADMIN__LISTEN": "0.0.0.0:9555",
        "CONNWATCH_LOG__LEVEL": "debug",
        "CONNWATCH_LISTENERS__0__HEARTBEAT__INTERVAL": "1s",
        "CONNWATCH_ADMIN__TOKEN": "s3cret-token",
    }
    result = connwatch_cmd("check-config", "-c", str(path), env=env)
    assert result.returncode == 0, result.stderr
    effective = yaml.safe_load(result.stdout)
    assert effective["admin"]["listen"] == "0.0.0.0:9555"
    assert effective["log"]["level"] == "debug"
    assert effective["listeners"][0]["heartbeat"]["interval"] == "1s"
    assert effective["listeners"][0]["idle_timeout"] == "0s"  # defaults filled in
    assert effective["listeners"][0]["buffer_size"] == "256KiB"
    assert "s3cret-token" not in result.stdout


def test_check_config_without_c_reads_the_file_in_connwatch_config(tmp_path: Path) -> None:
    path = tmp_path / "good.yaml"
    path.write_text(GOOD)
    result = connwatch_cmd("check-config", env={"CONNWATCH_CONFIG": str(path)})
    assert result.returncode == 0, result.stderr
    assert "app" in result.stdout


def test_env_override_to_a_bad_value_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "good.yaml"
    path.write_text(GOOD)
    result = connwatch_cmd("check-config", "-c", str(path), env={"CONNWATCH_LOG__LEVEL": "loud"})
    assert result.returncode == 2
    assert "log.level" in result.stderr


def test_usage_errors_exit_2() -> None:
    assert connwatch_cmd("run", "--listen", "127.0.0.1:0").returncode == 2
    assert connwatch_cmd("frobnicate").returncode == 2
    assert connwatch_cmd().returncode == 2


def test_version_prints_the_package_version() -> None:
    result = connwatch_cmd("--version")
    assert result.returncode == 0
    assert connwatch.__version__ in result.stdout
