"""docs/metrics.md against a live daemon's /metrics: the same connwatch_* names, types, labels."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.support import (
    EchoUpstream,
    daemon_config,
    eventually,
    http_request,
    listener_config,
    running_daemon,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
# | `connwatch_x_total` | counter | `listener`, `reason` | meaning | example |
_ROW = re.compile(r"^\|\s*`(connwatch_\w+)`\s*\|\s*(\w+)[^|]*\|([^|]*)\|", re.MULTILINE)

Described = dict[str, tuple[str, frozenset[str]]]  # name -> (type, label names)


def documented() -> Described:
    rows = {
        name: (kind, frozenset(re.findall(r"`(\w+)`", labels)))
        for name, kind, labels in _ROW.findall(DOC.read_text())
    }
    assert len(rows) >= 19, f"the metric table of {DOC} did not parse: {sorted(rows)}"
    return rows


def exported(text: str) -> Described:
    """connwatch_* families of an exposition, named as scraped (counters with `_total`)."""
    out: Described = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("connwatch_"):
            continue
        name = family.name + "_total" if family.type == "counter" else family.name
        labels = frozenset(k for s in family.samples for k in s.labels if k != "le")
        out[name] = (family.type, labels)
    return out


def _listener(upstream: str) -> dict[str, object]:
    # Fast beats and checks, so that the histograms fed by them have samples to show.
    return listener_config(
        "app",
        [upstream],
        heartbeat={"enabled": True, "interval": "50ms", "max_interval": "50ms"},
        health_check={"enabled": True, "interval": "50ms", "max_interval": "50ms", "rise": 1},
        upstream_pool={"enabled": True, "min_idle": 1},  # the pool's series exist only with it
    )


async def test_metrics_doc_matches_a_live_daemon() -> None:
    expected = documented()
    async with EchoUpstream() as up, running_daemon(daemon_config(_listener(up.address))) as d:
        reader, writer = await asyncio.open_connection("127.0.0.1", d.listeners["app"].port)
        writer.write(b"hello")
        assert await reader.readexactly(5) == b"hello"

        async def complete() -> Described | None:
            status, body = await http_request("GET", d.admin.port, "/metrics")
            assert status == 200
            live = exported(body.decode())
            # Histograms fed by beats and checks appear at the first of each.
            return live if set(expected) <= set(live) else None

        try:
            live = await eventually(complete, timeout=10, interval=0.05)
        finally:
            writer.close()
    assert sorted(set(live) - set(expected)) == [], "exported but missing from docs/metrics.md"
    for name, (kind, labels) in expected.items():
        assert live[name] == (kind, labels), f"{name}: docs say {kind} {sorted(labels)}"
