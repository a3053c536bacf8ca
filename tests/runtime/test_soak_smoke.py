"""bench/soak.py for ~20 s: the harness runs, every connection kind completes byte-exact, and the
daemon ends with the fds it started with. (The growth verdict needs minutes: not judged here.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_short_soak_moves_every_byte_without_errors_or_leaks(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--minutes", "0.33", "--sample-interval", "2",
         "--warmup", "4", "--churn", "4", "--long-lived", "4", "--stalls", "2",
         "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=100, check=False,
    )  # fmt: skip
    assert done.returncode in (0, 1), done.stderr[-2000:]
    assert "rss_kib" in done.stdout
    assert "VERDICT:" in done.stdout
    report = json.loads(out.read_text())
    tally, end = report["tally"], report["end"]
    assert tally["mismatches"] == 0, done.stdout[-3000:]
    assert tally["errors"] == {}, done.stdout[-3000:]
    kinds = tally["completed"]
    assert kinds.get("churn", 0) > 50
    assert kinds.get("upstream_first", 0) > 10
    assert kinds.get("stall", 0) >= 1
    assert kinds.get("long_lived", 0) == 4
    assert end["bytes_c2u"] == tally["sent"]
    assert end["bytes_u2c"] == tally["received"]
    assert end["active_after"] == 0
    assert end["fds_after"] <= end["fds_before"] + 2
    assert len(report["samples"]) >= 5
    assert report["log_levels"].get("error", 0) == 0
