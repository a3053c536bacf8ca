"""`connwatch top` shows a seamless upgrade under way (the /healthz `upgrade` field)."""

from __future__ import annotations

from rich.console import Console

from connwatch.commands.top.model import Snapshot, Totals
from connwatch.commands.top.view import View


def _render(snapshot: Snapshot) -> str:
    console = Console(width=120, record=True, color_system=None)
    console.print(View(source="test", keys=False).render(snapshot, height=30))
    return console.export_text()


def test_header_shows_an_upgrade_in_progress() -> None:
    upgrade = {"state": "draining_predecessor", "peer_pid": 4242}
    text = _render(Snapshot(0.0, [], Totals(), [], True, upgrade=upgrade))
    assert "upgrade      draining predecessor (pid 4242)" in text


def test_header_has_no_upgrade_line_otherwise() -> None:
    assert "upgrade" not in _render(Snapshot(0.0, [], Totals(), [], True))
