"""bench/monitoring_floor.py: its lines carry what the daemon's carry, and its counts are per
connection (independent of N).

A floor whose lines lacked a field SPEC requires would be too low, and the argument built on it
(what is left above Python's minimum) would not hold.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from bench.floor_items import ITEMS, Listener, close_reason, closed_line, make_conns, opened_line

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "monitoring_floor.py"
# RFC 3339 UTC to the microsecond, as the daemon's other lines (structlog's TimeStamper)
STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
# The keys and their order as observe/connection_lines.py writes them (SPEC section 6)
OPENED = ["conn_id", "listener", "client", "upstream", "event", "level", "timestamp"]
CLOSED = [
    *OPENED[:4],
    "duration_s",
    "bytes_client_to_upstream",
    "bytes_upstream_to_client",
    "reason",
    *OPENED[4:],
]


def test_floor_lines_are_the_daemons_lines(tmp_path: Path) -> None:
    log = tmp_path / "lines.log"
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        lsn, conns = Listener(fd), make_conns(3)
        close_reason(lsn, conns)
        opened_line(lsn, conns)
        closed_line(lsn, conns)
    finally:
        os.close(fd)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [list(line) for line in lines] == [OPENED] * 3 + [CLOSED] * 3
    for line, conn in zip(lines, conns + conns, strict=True):
        assert line["conn_id"] == conn.id
        assert STAMP.match(line["timestamp"]), line["timestamp"]
        assert line["level"] == "info"
    assert {line["reason"] for line in lines[3:]} == {"client_closed"}
    assert lines[3]["bytes_client_to_upstream"] == conns[0].bytes_in


def test_every_item_names_its_spec_section() -> None:
    for name, section, _item, _summed in ITEMS:
        assert section, name
        assert all(part.strip()[0].isdigit() for part in section.split(",")), (name, section)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("valgrind") is None, reason="needs valgrind (Debian package)")
def test_counts_are_per_connection() -> None:
    """The same items counted with N = 100 and N = 200: per connection, the same figures."""

    def figures(conns: int) -> dict[str, float]:
        argv = [sys.executable, str(SCRIPT), "--conns", str(conns), "--json", "/dev/stdout"]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=True)
        doc = json.loads(out.stdout[out.stdout.index("{") :])
        return {item["name"]: item["instructions_per_conn"] for item in doc["items"]}

    small, large = figures(100), figures(200)
    for name, _section, _item, summed in ITEMS:
        if summed:
            assert small[name] > 0, name
            assert abs(small[name] - large[name]) <= max(0.15 * large[name], 150), (
                name,
                small,
                large,
            )
