"""The upstreams view of `connwatch top` (SPEC section 4 `/upstreams`): parsed, drawn, toggled
with `u`, and `--once --upstreams` against a real daemon that has ejected a target."""

from __future__ import annotations

import asyncio
import datetime
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from connwatch.commands.top.model import Snapshot, Totals
from connwatch.commands.top.upstreams_table import target_rows
from connwatch.commands.top.view import View
from tests.support import DaemonProcess, EchoUpstream, daemon_config, free_port, listener_config

SOON = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=30)).isoformat()
BODY = {
    "listeners": {
        "app": {
            "upstreams": {
                "10.0.0.1:6379": {
                    "status": "DOWN",
                    "cause": "passive",
                    "ejected_until": SOON.replace("+00:00", "Z"),
                    "weight": 0.0,
                    "active": 0,
                    "pool": None,
                },
                "10.0.0.2:6379": {
                    "status": "UP",
                    "cause": "active_check",
                    "ejected_until": None,
                    "weight": 0.42,
                    "active": 7,
                    "pool": {"idle": 3, "hits": 10, "misses": 2, "evictions": {"peer_closed": 4}},
                },
            }
        },
        "other": {"upstreams": {"10.0.0.3:80": {"status": "UNKNOWN", "cause": "config"}}},
    }
}


def _render(view: View, snapshot: Snapshot) -> str:
    console = Console(width=160, record=True, force_terminal=False)
    console.print(view.render(snapshot, unicode=False))
    return console.export_text()


def test_rows_from_the_upstreams_body() -> None:
    rows = target_rows(BODY)
    assert [(r.listener, r.address, r.status, r.cause) for r in rows] == [
        ("app", "10.0.0.1:6379", "DOWN", "passive"),
        ("app", "10.0.0.2:6379", "UP", "active_check"),
        ("other", "10.0.0.3:80", "UNKNOWN", "config"),
    ]
    assert [r.listener for r in target_rows(BODY, "other")] == ["other"]
    assert rows[1].weight == 0.42
    assert rows[1].active == 7


def test_u_switches_to_the_upstreams_view_and_back() -> None:
    snapshot = Snapshot(0.0, [], Totals(), [], True, targets=target_rows(BODY))
    view = View(source="test")
    assert "no open connections" in _render(view, snapshot)
    assert view.press("u") == "sort"
    text = _render(view, snapshot)
    assert "CAUSE" in text
    assert "WEIGHT" in text
    line = next(line for line in text.splitlines() if "10.0.0.1:6379" in line)
    assert "DOWN" in line
    assert "passive" in line
    assert "0.00" in line
    assert "s" in line.split("passive")[1]  # the ejection's time left
    line = next(line for line in text.splitlines() if "10.0.0.2:6379" in line)
    assert "0.42" in line
    assert "idle 3 hit 10 miss 2 evict 4" in line
    view.press("u")
    assert "CAUSE" not in _render(view, snapshot)


def _top(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "connwatch", "top", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


async def test_top_once_upstreams_against_a_daemon(tmp_path: Path) -> None:
    refused = f"127.0.0.1:{free_port()}"  # nothing listens: every connect fails
    async with EchoUpstream() as up:
        listener = listener_config(
            "app",
            [refused, up.address],
            balance="first",
            outlier_detection={
                "enabled": True,
                "consecutive_failures": 2,
                "base_ejection_time": "60s",
                "max_ejection_time": "300s",
            },
        )
        async with DaemonProcess(tmp_path, daemon_config(listener)) as daemon:
            for _ in range(4):
                reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port("app"))
                writer.write(b"x")
                await reader.readexactly(1)  # served by the second target
                writer.close()
            await daemon.wait_for("upstream_ejected", upstream=refused)
            admin = f"http://127.0.0.1:{daemon.admin_port}"
            result = await asyncio.to_thread(_top, "--admin", admin, "--once", "--upstreams")
            assert result.returncode == 0, result.stderr
            rows = [line for line in result.stdout.splitlines() if line.strip().startswith("app ")]
            line = next(line for line in rows if refused in line)
            assert "DOWN" in line
            assert "passive" in line
            line = next(line for line in rows if up.address in line)
            assert "UNKNOWN" in line
            assert "1.00" in line
