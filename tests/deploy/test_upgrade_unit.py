"""deploy/systemd/connwatch@.service: the blue/green template for seamless upgrades (SPEC
section 11, docs/operations.md#seamless-upgrade)."""

from __future__ import annotations

import configparser
import shlex
import shutil
from pathlib import Path

from tests.deploy.test_deploy import (
    CLOSE_AFTER_DRAIN_S,
    CONFIG_PATH,
    DEPLOY,
    SPEC_DEFAULT_DRAIN_S,
    parse_duration,
    require_tool,
    run_tool,
)

TEMPLATE = DEPLOY / "systemd" / "connwatch@.service"


def template() -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(TEMPLATE.read_text())
    return parser


def test_template_takes_over_when_started_beside_a_running_instance() -> None:
    service = template()["Service"]
    command = shlex.split(service["ExecStart"])
    assert command[0].endswith("/connwatch")
    assert command[1:] == ["run", "-c", CONFIG_PATH, "--takeover-if-running"]
    assert service["KillSignal"] == "SIGTERM"
    assert parse_duration(service["TimeoutStopSec"]) > SPEC_DEFAULT_DRAIN_S + CLOSE_AFTER_DRAIN_S
    # Both instances reach the 0600 upgrade socket: one fixed user, a runtime directory that
    # outlives the instance that created it.
    assert service["User"] == "connwatch"
    assert "DynamicUser" not in service
    assert service["RuntimeDirectory"] == "connwatch"
    assert service["RuntimeDirectoryPreserve"] == "yes"
    assert "/run/connwatch/upgrade.sock" in TEMPLATE.read_text()


def test_systemd_analyze_verifies_an_instance(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze")
    binary = shlex.split(template()["Service"]["ExecStart"])[0]
    unit = tmp_path / "connwatch@blue.service"
    unit.write_text(TEMPLATE.read_text().replace(binary, shutil.which("true") or "/bin/true"))
    result = run_tool(analyze, "verify", str(unit))
    complaints = [line for line in result.stderr.splitlines() if str(unit) in line]
    assert result.returncode == 0, result.stderr
    assert not complaints, "\n".join(complaints)
