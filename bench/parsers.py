"""Pure parsers for the tools' outputs and for /proc: no I/O here, so tests feed them text.

Kept free of imports from the rest of bench/ so that tests can load this file on its own.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from typing import Any

# Linux /proc/net/tcp state code for LISTEN.
_TCP_LISTEN = "0A"
_TCP_ESTABLISHED = "01"


class ParseError(ValueError):
    """A tool printed something we cannot read: the sample is dropped, never guessed."""


@dataclass(frozen=True)
class IperfResult:
    bytes: int
    seconds: float

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


def parse_iperf3_json(text: str) -> IperfResult:
    """Bytes the receiver got and over how long, from `iperf3 -c ... -J` (any -P)."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ParseError(f"iperf3 output is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise ParseError("iperf3 output is not a JSON object")
    if doc.get("error"):
        raise ParseError(f"iperf3 error: {doc['error']}")
    end = doc.get("end") or {}
    # The receiver's view counts only bytes that made it through the proxy.
    summary = end.get("sum_received") or end.get("sum")
    if not isinstance(summary, dict) or "bytes" not in summary:
        raise ParseError("iperf3 JSON has no end.sum_received")
    return IperfResult(bytes=int(summary["bytes"]), seconds=float(summary["seconds"]))


@dataclass(frozen=True)
class RedisBenchRow:
    test: str
    rps: float
    p50_ms: float | None
    p99_ms: float | None


_CSV_HEADER_RE = re.compile(r'^"?test"?\s*,', re.IGNORECASE)


def parse_redis_benchmark_csv(text: str) -> dict[str, RedisBenchRow]:
    """Rows of `redis-benchmark --csv`, keyed by test name.

    redis-benchmark 7 prints a header and p50/p99 columns; 6.0 and older print only
    `"TEST","rps"` with no header, so latency is then None.
    """
    rows: dict[str, RedisBenchRow] = {}
    lines = [ln for ln in text.splitlines() if ln.strip() and ln.lstrip().startswith('"')]
    header: list[str] | None = None
    for record in csv.reader(io.StringIO("\n".join(lines))):
        if not record:
            continue
        if _CSV_HEADER_RE.match(",".join(record)):
            header = [h.strip().lower() for h in record]
            continue
        row = _csv_row(header, record)
        rows[row.test] = row
    if not rows:
        raise ParseError("redis-benchmark printed no CSV rows")
    return rows


def _csv_row(header: list[str] | None, record: list[str]) -> RedisBenchRow:
    if header is None:
        if len(record) < 2:
            raise ParseError(f"short redis-benchmark CSV row: {record!r}")
        return RedisBenchRow(record[0], _float(record[1]), None, None)
    fields = dict(zip(header, record, strict=False))
    return RedisBenchRow(
        test=fields.get("test", record[0]),
        rps=_float(fields.get("rps", "")),
        p50_ms=_opt_float(fields.get("p50_latency_ms")),
        p99_ms=_opt_float(fields.get("p99_latency_ms")),
    )


# `-q` style: "PING_INLINE: 91324.20 requests per second, p50=0.287 msec" (7.x) or without p50.
_QUIET_RE = re.compile(
    r"(?P<test>[A-Z_]+(?: \([^)]*\))?):\s+(?P<rps>[\d.]+) requests per second"
    r"(?:, p50=(?P<p50>[\d.]+) msec)?"
)


def parse_redis_benchmark_quiet(text: str) -> dict[str, RedisBenchRow]:
    """Fallback for `-q` output; the progress lines ending in `\\r` are skipped."""
    rows: dict[str, RedisBenchRow] = {}
    for chunk in re.split(r"[\r\n]+", text):
        m = _QUIET_RE.search(chunk)
        if m and "overall" not in chunk:
            p50 = m.group("p50")
            rows[m.group("test")] = RedisBenchRow(
                m.group("test"), float(m.group("rps")), float(p50) if p50 else None, None
            )
    if not rows:
        raise ParseError("redis-benchmark printed no result lines")
    return rows


def _float(value: str) -> float:
    try:
        return float(value)
    except ValueError as exc:
        raise ParseError(f"not a number: {value!r}") from exc


def _opt_float(value: str | None) -> float | None:
    return None if value in (None, "") else _float(value)


@dataclass(frozen=True)
class ProcStat:
    pid: int
    ppid: int
    # utime + stime + cutime + cstime, in clock ticks. The children's part matters for socat,
    # whose per-connection children exit and are reaped by the parent during a run.
    cpu_ticks: int


def parse_proc_stat(text: str) -> ProcStat:
    """One /proc/PID/stat line; the command name may hold spaces and parentheses."""
    close = text.rfind(")")
    if close < 0:
        raise ParseError("no ')' in /proc/PID/stat")
    pid = int(text[: text.index("(")].strip())
    rest = text[close + 2 :].split()
    # Fields after the name, 0-based: 0 state, 1 ppid, ... 11 utime, 12 stime, 13 cutime, 14 cstime.
    if len(rest) < 15:
        raise ParseError("short /proc/PID/stat")
    ticks = sum(int(rest[i]) for i in (11, 12, 13, 14))
    return ProcStat(pid=pid, ppid=int(rest[1]), cpu_ticks=ticks)


def _tcp_rows(text: str) -> list[tuple[int, int, str]]:
    """(local port, remote port, state) for each socket in /proc/net/tcp or tcp6."""
    out: list[tuple[int, int, str]] = []
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) < 4:
            continue
        local, remote, state = parts[1], parts[2], parts[3]
        out.append((int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16), state))
    return out


def listening_ports(text: str) -> set[int]:
    """Ports in LISTEN state in a /proc/net/tcp{,6} table."""
    return {lport for lport, _, state in _tcp_rows(text) if state == _TCP_LISTEN}


def established_to(text: str, port: int) -> int:
    """Established sockets whose local port is `port` (the server side of accepted conns)."""
    return sum(1 for lport, _, st in _tcp_rows(text) if lport == port and st == _TCP_ESTABLISHED)


def parse_redis_info(text: str) -> dict[str, str]:
    """`INFO` reply body: `key:value` lines, sections and blanks skipped."""
    info: dict[str, str] = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and ":" in line:
            key, _, value = line.partition(":")
            info[key.strip()] = value.strip()
    return info


def parse_json_line(text: str) -> dict[str, Any]:
    """The last JSON object line a bench client printed (earlier lines may be progress)."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                doc = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(doc, dict):
                return doc
    raise ParseError("no JSON object line in client output")


def prom_sum(text: str, metric: str) -> float | None:
    """Sum of one metric's samples over all label sets in Prometheus text; None if absent."""
    total, found = 0.0, False
    for line in text.splitlines():
        if not line.startswith(metric):
            continue
        name_end = len(metric)
        if len(line) <= name_end or line[name_end] not in "{ ":
            continue  # another metric sharing the prefix, e.g. ..._created
        body = line.split(" # ", 1)[0]  # drop an OpenMetrics exemplar
        rest = body.rsplit("}", 1)[1] if body[name_end] == "{" else body[name_end:]
        try:
            total += float(rest.split()[0])
        except (IndexError, ValueError):
            continue
        found = True
    return total if found else None
