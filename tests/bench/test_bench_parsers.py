"""The benchmark harness's parsers, fed recorded tool output: no tool runs here."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load(name: str) -> ModuleType:
    # bench/ is not an installed package; its parsers and YAML writer import no other bench code.
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


parsers = _load("parsers")
peers = _load("peers")

# iperf3 3.12 -J, trimmed to what the parser reads (plus a neighbour it must ignore).
IPERF3_P8 = {
    "start": {"version": "iperf 3.12"},
    "intervals": [],
    "end": {
        "streams": [],
        "sum_sent": {
            "start": 0,
            "end": 2.0,
            "seconds": 2.0,
            "bytes": 4_200_000_000,
            "bits_per_second": 16.8e9,
            "retransmits": 0,
            "sender": True,
        },
        "sum_received": {
            "start": 0,
            "end": 2.0,
            "seconds": 2.0,
            "bytes": 4_000_000_000,
            "bits_per_second": 16e9,
            "sender": True,
        },
        "cpu_utilization_percent": {"host_total": 90.0},
    },
}


def test_iperf3_reads_receiver_bytes_and_rate() -> None:
    res = parsers.parse_iperf3_json(json.dumps(IPERF3_P8))
    assert res.bytes == 4_000_000_000
    assert res.seconds == 2.0
    assert res.gb_per_s == pytest.approx(2.0)


def test_iperf3_error_and_garbage_are_parse_errors() -> None:
    refused = {
        "start": {"connected": []},
        "intervals": [],
        "end": {},
        "error": "unable to connect to server: Connection refused",
    }
    with pytest.raises(parsers.ParseError, match="Connection refused"):
        parsers.parse_iperf3_json(json.dumps(refused))
    with pytest.raises(parsers.ParseError):
        parsers.parse_iperf3_json("iperf3: error - unable to connect")
    with pytest.raises(parsers.ParseError):
        parsers.parse_iperf3_json(json.dumps({"end": {}}))


REDIS7_CSV = """\
"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
"PING_INLINE","85836.91","0.319","0.072","0.295","0.535","0.775","1.935"
"SET","89285.71","0.292","0.080","0.295","0.343","0.407","0.767"
"GET","90090.09","0.292","0.088","0.287","0.343","0.415","2.359"
"""


def test_redis_benchmark_csv_v7_rows_carry_latency() -> None:
    rows = parsers.parse_redis_benchmark_csv(REDIS7_CSV)
    assert list(rows) == ["PING_INLINE", "SET", "GET"]
    ping = rows["PING_INLINE"]
    assert ping.rps == pytest.approx(85836.91)
    assert ping.p50_ms == pytest.approx(0.295)
    assert ping.p99_ms == pytest.approx(0.775)


def test_redis_benchmark_csv_old_format_parses_past_noise_and_errors_raise() -> None:
    # redis-benchmark 6.0 and older: no header, two columns; stray lines are not CSV rows.
    text = 'Warning: could not fetch server CONFIG\n"PING_INLINE","41152.26"\n"SET","40983.61"\n'
    rows = parsers.parse_redis_benchmark_csv(text)
    assert rows["SET"].rps == pytest.approx(40983.61)
    assert rows["SET"].p99_ms is None
    with pytest.raises(parsers.ParseError):
        parsers.parse_redis_benchmark_csv("ERROR: connection refused\n")


def test_redis_benchmark_quiet_skips_progress() -> None:
    text = (
        "PING_INLINE: rps=0.0 (overall: 0.0) avg_msec=-nan (overall: -nan)\r"
        "PING_INLINE: 91324.20 requests per second, p50=0.287 msec\n"
        "SET: 88000.00 requests per second\n"
    )
    rows = parsers.parse_redis_benchmark_quiet(text)
    assert rows["PING_INLINE"].rps == pytest.approx(91324.20)
    assert rows["PING_INLINE"].p50_ms == pytest.approx(0.287)
    assert rows["SET"].p50_ms is None


def test_proc_stat_parses_past_an_awkward_command_name() -> None:
    fields = ["S", "41"] + ["0"] * 9 + ["120", "30", "7", "3"] + ["0"] * 30
    st = parsers.parse_proc_stat(f"4242 (nginx: worker) (x)) {' '.join(fields)}\n")
    assert (st.pid, st.ppid, st.cpu_ticks) == (4242, 41, 160)


PROC_NET_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:858F 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0
   1: 0100007F:18EB 0100007F:A8D2 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0
   2: 0100007F:18EB 0100007F:A8D3 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0
   3: 0100007F:A8D2 0100007F:18EB 06 00000000:00000000 03:0000109E 00000000     0        0 0 3 0
"""


def test_proc_net_tcp_yields_listening_ports_and_established_count() -> None:
    assert parsers.listening_ports(PROC_NET_TCP) == {0x858F}
    assert parsers.established_to(PROC_NET_TCP, 0x18EB) == 2


def test_redis_info_and_client_json_line_parse_and_garbage_raises() -> None:
    info = parsers.parse_redis_info("# Clients\r\nconnected_clients:8001\r\nblocked_clients:0\r\n")
    assert info["connected_clients"] == "8001"
    out = 'progress\n{"open": 4000, "failed": 0}\n'
    assert parsers.parse_json_line(out) == {"open": 4000, "failed": 0}
    with pytest.raises(parsers.ParseError):
        parsers.parse_json_line("Traceback ...\n")


def test_prom_sum_over_labels_only_for_that_metric() -> None:
    text = (
        "# TYPE connwatch_heartbeats_total counter\n"
        'connwatch_heartbeats_total{listener="a",result="ok"} 120.0\n'
        'connwatch_heartbeats_total{listener="a",result="failed"} 3.0 # {trace_id="x"} 1\n'
        'connwatch_heartbeats_created{listener="a"} 1.7e9\n'
        "connwatch_build_info 1\n"
    )
    assert parsers.prom_sum(text, "connwatch_heartbeats_total") == pytest.approx(123.0)
    assert parsers.prom_sum(text, "connwatch_build_info") == pytest.approx(1.0)
    assert parsers.prom_sum(text, "connwatch_missing") is None


def test_generated_connwatch_yaml_parses_back() -> None:
    opts = peers.ConnwatchOptions(2, {"listeners.0.heartbeat.interval": "1s"})
    cfg = peers.connwatch_config(7000, 6379, 9464, opts)
    loaded = yaml.safe_load(peers.to_yaml(cfg))
    assert loaded == cfg
    assert loaded["listeners"][0]["heartbeat"]["interval"] == "1s"
    assert loaded["workers"] == 2


def test_variant_spec_parses_into_a_name_and_typed_overrides() -> None:
    name, overrides = peers.parse_variant("splice:listeners.0.data_path=splice;workers=2")
    assert name == "splice"
    assert overrides == {"listeners.0.data_path": "splice", "workers": 2}


def test_callgrind_dumps_sum_and_a_wrapped_negative_count_asks_for_a_rerun(tmp_path: Path) -> None:
    from bench.instructions import dumped_instructions

    (tmp_path / "callgrind.10.1").write_bytes(b"events: Ir\nsummary: 1000\n")
    (tmp_path / "callgrind.11.1").write_bytes(b"events: Ir\ntotals: 234\n")
    (tmp_path / "callgrind.10").write_bytes(b"summary: 99999\n")  # the exit dump: not counted
    assert dumped_instructions(tmp_path) == 1234
    (tmp_path / "callgrind.12.1").write_bytes(b"summary: %d\n" % (2**64 - 5))
    assert dumped_instructions(tmp_path) is None
