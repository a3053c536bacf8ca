"""The targets table and the chart, made from a saved run's JSON (no load runs here).

fixtures/run.json holds the medians of the 2026-12-04 run in bench/RESULTS.md, one round each,
in the document bench/run.py --json writes; fixtures/instructions.json the counts of the same
day in the document bench/instructions.py --json writes. Every target was missed that day.
"""

from __future__ import annotations

import copy
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from bench import chart, docread, targets
from bench.targets import X

FIXTURES = Path(__file__).resolve().parent / "fixtures"
REPORT = Path(__file__).resolve().parents[2] / "bench" / "report.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
needs_matplotlib = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None,
    reason="matplotlib missing: pip install -e '.[bench]' (scripts/test.sh installs it)",
)


@pytest.fixture
def doc() -> docread.Doc:
    return docread.load(FIXTURES / "run.json", FIXTURES / "instructions.json")


def by_measure(doc: docread.Doc) -> dict[str, targets.Row]:
    return {row.measure: row for row in targets.rows(doc)}


def set_median(doc: docread.Doc, scenario: str, subject: str, key: str, value: float) -> None:
    doc["scenarios"][scenario]["subjects"][subject]["summary"][key]["median"] = value


def test_every_row_of_the_issue_filled_from_the_run(doc: docread.Doc) -> None:
    rows = by_measure(doc)
    assert len(rows) == 8
    assert all(row.verdict == targets.NOT_MET for row in rows.values())
    now = {measure: row.now for measure, row in rows.items()}
    assert now["user-space instructions per connection (portable)"].startswith(
        f"446.0k (4.82{X} floor 92.5k)"
    )
    assert now["the same on splice"].startswith(f"485.8k (5.25{X}")
    assert now["instructions per request (rr)"].startswith(f"15.97k (1.98{X} floor 8.06k)")
    assert now["churn, `workers: 2`"].startswith(f"0.45{X} HAProxy (3,013 vs 6,663 conn/s)")
    assert f"Envoy 0.65{X}" in now["churn, `workers: 2`"]
    assert now["bulk, 1 stream, shipped defaults"].startswith(
        f"1.51{X} HAProxy (1.19 vs 0.79 GB/s)"
    )
    assert "0.68 CPU-s/GB" in now["bulk, 1 stream, shipped defaults"]
    assert now["idle connection, shipped defaults"].startswith("3.95 KiB; HAProxy 3.30, floor 2.75")
    assert now["rr `-P 16`, 500 clients"].startswith(f"0.91{X}")
    # 9.25 % of a core (heartbeats off: 0.00 %) for 7,998 beats/s: 11.6 µs a beat.
    assert now["heartbeat, per connection-beat"].startswith("11.6 µs")


def test_verdicts_at_and_past_the_limits(doc: docread.Doc) -> None:
    set_median(doc, "idle", "connwatch", "kib_per_conn", 2.5)  # at the limit: met
    set_median(doc, "churn", "connwatch[w2]", "conn_per_s", 4500)  # 0.675x, ahead of Envoy's 4,331
    set_median(doc, "heartbeat", "connwatch:hb1s", "cpu_pct", 5.0)
    set_median(doc, "heartbeat", "connwatch:hb_off", "cpu_pct", 1.5)  # 3.5 % for 7,998 beats/s
    set_median(doc, "rr", "connwatch", "c500_P16.PING_INLINE.rps", 471143)  # = HAProxy's
    rows = by_measure(doc)
    assert rows["idle connection, shipped defaults"].verdict == targets.MET
    assert rows["churn, `workers: 2`"].verdict == targets.MET
    assert rows["heartbeat, per connection-beat"].verdict == targets.MET
    assert rows["heartbeat, per connection-beat"].now.startswith("4.4 µs")
    assert rows["rr `-P 16`, 500 clients"].verdict == targets.MET

    set_median(doc, "idle", "connwatch", "kib_per_conn", 2.51)
    set_median(doc, "churn", "connwatch[w2]", "conn_per_s", 4200)  # 0.63x but behind Envoy
    rows = by_measure(doc)
    assert rows["idle connection, shipped defaults"].verdict == targets.NOT_MET
    assert rows["churn, `workers: 2`"].verdict == targets.NOT_MET


def test_bulk_needs_rate_envoy_and_cpu(doc: docread.Doc) -> None:
    set_median(doc, "bulk", "connwatch", "gbps_1", 1.50)  # 1.90x HAProxy, ahead of Envoy's 1.28
    set_median(doc, "bulk", "connwatch", "cpu_s_per_gb_1", 0.40)
    assert by_measure(doc)["bulk, 1 stream, shipped defaults"].verdict == targets.MET
    set_median(doc, "bulk", "connwatch", "cpu_s_per_gb_1", 0.41)
    assert by_measure(doc)["bulk, 1 stream, shipped defaults"].verdict == targets.NOT_MET


def test_a_missing_peer_or_count_is_no_data_not_a_verdict(doc: docread.Doc) -> None:
    set_median(doc, "churn", "connwatch[w2]", "conn_per_s", 4500)
    del doc["scenarios"]["churn"]["subjects"]["envoy"]  # "ahead of Envoy" cannot be checked
    del doc["instructions"]
    rows = by_measure(doc)
    assert rows["churn, `workers: 2`"].verdict == targets.NO_DATA
    assert rows["user-space instructions per connection (portable)"].verdict == targets.NO_DATA
    assert "no bench/instructions.py JSON" in targets.render(doc)


def test_subjects_found_by_what_their_variant_sets(doc: docread.Doc) -> None:
    churn = doc["scenarios"]["churn"]["subjects"]
    churn["connwatch[two]"] = churn.pop("connwatch[w2]")
    doc["meta"]["options"]["connwatch_variant"] = ["two:workers=2"]
    assert docread.run_roles(doc).workers2 == "connwatch[two]"
    assert by_measure(doc)["churn, `workers: 2`"].now.startswith(f"0.45{X}")
    # Plain connwatch with --connwatch-set is not the shipped defaults.
    doc["meta"]["options"]["connwatch_set"] = ["listeners.0.buffer_size=1MiB"]
    assert by_measure(doc)["idle connection, shipped defaults"].verdict == targets.NO_DATA


def test_render_is_a_markdown_table_of_every_row(doc: docread.Doc) -> None:
    lines = targets.render(doc).splitlines()
    table = [line for line in lines if line.startswith("|")]
    assert table[0] == "| measure | now | target | |"
    assert len(table) == 2 + 8
    assert all(line.count(" | ") == 3 for line in table[2:])


def test_panels_are_ratios_to_haproxy_with_the_targets_where_they_fall(
    doc: docread.Doc,
) -> None:
    panels = {p.title: p for p in chart.panels(copy.deepcopy(doc))}
    assert len(panels) == 11  # 8 of bench/run.py, heartbeat, 2 of instructions
    bulk = panels["bulk, 1 stream: GB/s (higher is better)"]
    bars = {b.label: b for b in bulk.bars}
    assert "direct (no proxy)" not in bars
    assert bars["HAProxy (defaults)"].value == pytest.approx(1.0)
    assert bars["connwatch"].value == pytest.approx(1.19 / 0.79)
    assert bars["Python Protocol floor"].kind == "floor"
    assert [line.x for line in bulk.lines] == [targets.BULK_1]
    assert [b.label for b in bulk.bars if b.judged] == ["connwatch"]  # the shipped defaults
    churn = panels["churn: conn/s (higher is better)"]
    assert [b.label for b in churn.bars if b.judged] == ["connwatch [w2]"]
    idle = panels["idle: RSS KiB per connection (lower is better)"]
    assert idle.lines[0].x == pytest.approx(2.5 / 3.30)  # 2.5 KiB against HAProxy's 3.30
    heartbeat = panels["heartbeat: CPU µs per connection-beat (lower is better)"]
    assert heartbeat.bars[0].value == pytest.approx(9.25 / 100 / 7998 * 1e6)


@needs_matplotlib
def test_chart_is_a_png(doc: docread.Doc, tmp_path: Path) -> None:
    out = tmp_path / "sub" / "chart.png"
    assert chart.draw(doc, out) == 11
    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 50_000  # eleven panels of bars and labels, not an empty canvas


def test_nothing_to_draw_writes_no_file(tmp_path: Path) -> None:
    out = tmp_path / "chart.png"
    assert chart.draw({"meta": {}, "scenarios": {}}, out) == 0
    assert not out.exists()


@needs_matplotlib
def test_report_script_redraws_from_saved_json(tmp_path: Path) -> None:
    out = tmp_path / "again.png"
    argv = [sys.executable, str(REPORT), str(FIXTURES / "run.json")]
    argv += ["--instructions", str(FIXTURES / "instructions.json"), "--chart", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert f"| churn, `workers: 2` | 0.45{X} HAProxy" in done.stdout
    assert out.read_bytes().startswith(PNG_SIGNATURE)
