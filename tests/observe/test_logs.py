"""Log lines as operators read them (SPEC section 6): JSON shape, progress, flood protection."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from connwatch._types import CloseReason
from tests.support import DaemonProcess, EchoUpstream, daemon_config, eventually, listener_config

RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


async def _echo(port: int, payload: bytes = b"hi") -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    assert await asyncio.wait_for(reader.readexactly(len(payload)), 5) == payload
    writer.close()


async def test_every_line_is_json_with_timestamp_level_event(tmp_path: Path) -> None:
    async with EchoUpstream() as up:
        cfg = daemon_config(listener_config("app", [up.address]))
        async with DaemonProcess(tmp_path, cfg) as daemon:
            await _echo(daemon.port("app"))
            closed = await daemon.wait_for("connection_closed")
        await daemon.wait_for("shutdown_complete")
    assert not daemon.find("_unparsed")
    for line in daemon.lines:
        assert RFC3339_UTC.match(line["timestamp"]), line
        assert line["level"] in {"debug", "info", "warning", "error"}
        assert isinstance(line["event"], str)
    opened = daemon.find("connection_opened")[0]
    assert opened["conn_id"] == closed["conn_id"]
    for key in (
        "listener",
        "client",
        "upstream",
        "duration_s",
        "reason",
        "bytes_client_to_upstream",
        "bytes_upstream_to_client",
    ):
        assert key in closed


async def test_long_lived_connection_logs_progress_lines_at_the_interval(tmp_path: Path) -> None:
    async with EchoUpstream() as up:
        cfg = daemon_config(listener_config("app", [up.address]))
        cfg["log"]["progress_interval"] = "300ms"
        async with DaemonProcess(tmp_path, cfg) as daemon:
            reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port("app"))
            writer.write(b"12345")
            await reader.readexactly(5)
            opened = await daemon.wait_for("connection_opened")
            progress = await daemon.wait_for("connection_progress", count=2, timeout=5)
            assert progress["conn_id"] == opened["conn_id"]
            assert progress["bytes_client_to_upstream"] == 5
            assert progress["age_s"] >= 0.3
            writer.close()


async def test_connection_events_limit_sums_up_the_rest(tmp_path: Path) -> None:
    async with EchoUpstream() as up:
        cfg = daemon_config(listener_config("app", [up.address]))
        cfg["log"]["connection_events_limit"] = 10
        async with DaemonProcess(tmp_path, cfg) as daemon:
            port = daemon.port("app")
            await asyncio.gather(*(_echo(port) for _ in range(60)))
            summary = await daemon.wait_for("connection_events_suppressed", timeout=5)
            m = await daemon.metrics()
            assert m['connwatch_connections_accepted_total{listener="app"}'] == 60

            def opened_and_closed() -> tuple[int, int]:
                """Connections the log accounts for: own lines plus the summaries' counts."""
                summaries = daemon.find("connection_events_suppressed")
                opened = len(daemon.find("connection_opened")) + sum(
                    s.get("opened", 0) for s in summaries
                )
                closed = len(daemon.find("connection_closed")) + sum(
                    s.get("closed", 0) for s in summaries
                )
                return opened, closed

            # a second summary may be due for the rest; wait for it (polling: no event to await)
            await eventually(lambda: opened_and_closed() == (60, 60), timeout=5)
            opened, closed = opened_and_closed()
            assert summary["limit_per_s"] == 10
            assert len(daemon.find("connection_opened")) < 60
            assert (opened, closed) == (60, 60)


_WRITER = """
import sys
from connwatch.observe.logs import configure_logging, get_logger
configure_logging("info", "json")
log = get_logger("t")
for i in range(int(sys.argv[1])):
    log.info("connection_closed", conn_id=f"{sys.argv[2]}-{i}", pad="x" * 300)
"""


def test_processes_sharing_stdout_never_split_a_line() -> None:
    """Workers share the daemon's stdout, unbuffered in the Docker image: lines stay whole."""
    count = 3000
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    read_end, write_end = os.pipe()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(count), name], stdout=write_end, env=env
        )
        for name in ("a", "b", "c")
    ]
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        lines = pipe.read().splitlines()
    for proc in procs:
        assert proc.wait(timeout=60) == 0
    ids = [json.loads(line)["conn_id"] for line in lines]  # a split line would not parse
    assert len(ids) == len(set(ids)) == 3 * count


def _rendered(level: str, fmt: str, emit: str) -> list[str]:
    """Lines one logger writes after `configure_logging(level, fmt)` (the stream is a file)."""
    import io

    from connwatch.observe.logs import (
        configure_logging,
        get_logger,
        info_lines,
        line_writer,
        stamped_writer,
    )

    stream = io.StringIO()
    configure_logging(level, fmt, stream)
    try:
        fields = {"conn_id": "0-1", "client": 'odd "name" é', "upstream": None, "duration_s": 0.5}
        fields["reason"] = CloseReason.CLIENT_CLOSED  # given as the enum: rendered as its value
        if emit == "writer":  # what the connection lines call: (event, fields dict)
            line_writer("t")("connection_closed", {**fields, "bytes_client_to_upstream": 7})
        elif emit == "stamped":  # the opened/closed lines: the whole dict, timestamp filled in
            tail = {"event": "connection_closed", "level": "info", "timestamp": ""}
            stamped_writer("t")({**fields, "bytes_client_to_upstream": 7, **tail})
        else:
            logger = info_lines("t") if emit == "fast" else get_logger("t")
            logger.info("connection_closed", **fields, bytes_client_to_upstream=7)
    finally:
        configure_logging("warning", "json")  # what the test process runs with
    return stream.getvalue().splitlines()


def test_connection_lines_render_as_the_structlog_chain_does() -> None:
    """The connection lines skip structlog's chain; an operator's parser sees no difference."""
    fast, chain = _rendered("info", "json", "fast"), _rendered("info", "json", "chain")
    writer = _rendered("info", "json", "writer")
    stamped = _rendered("info", "json", "stamped")
    assert len(fast) == len(chain) == len(writer) == len(stamped) == 1
    timestamp = re.compile(r'"timestamp": ?"[^"]+"')
    assert timestamp.sub("T", fast[0]) == timestamp.sub("T", chain[0])
    assert timestamp.sub("T", writer[0]) == timestamp.sub("T", chain[0])
    assert timestamp.sub("T", stamped[0]) == timestamp.sub("T", chain[0])
    assert RFC3339_UTC.match(json.loads(writer[0])["timestamp"])
    assert RFC3339_UTC.match(json.loads(stamped[0])["timestamp"])
    assert RFC3339_UTC.match(json.loads(fast[0])["timestamp"])
    assert list(json.loads(fast[0]))[-3:] == ["event", "level", "timestamp"]
    assert json.loads(stamped[0])["reason"] == "client_closed"
    # Lines below the configured level stay off; the console format keeps structlog's renderer.
    assert _rendered("warning", "json", "fast") == []
    assert _rendered("warning", "json", "writer") == []
    assert _rendered("warning", "json", "stamped") == []
    for emit in ("fast", "writer", "stamped"):
        console = _rendered("info", "console", emit)
        assert len(console) == 1
        assert "connection_closed" in console[0]
        assert "reason=client_closed" in console[0]
        assert "{" not in console[0]


def test_connection_lines_stay_whole_on_a_full_nonblocking_pipe() -> None:
    """The connection lines' own write (inline, for speed) falls back to waiting for room when
    the descriptor is non-blocking and full, and to writing the rest of a line cut short."""
    import threading

    from connwatch.observe.logs import JsonInfoLines, LineLogger

    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    count, pad = 200, "x" * 6000  # longer than PIPE_BUF: the kernel may take part of a line
    received = bytearray()

    def drain() -> None:
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            while chunk := pipe.read(1000):
                received.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    with os.fdopen(write_end, "w") as stream:
        lines = JsonInfoLines(LineLogger(stream))
        for i in range(count):
            lines.info("connection_closed", conn_id=f"0-{i}", pad=pad)
    reader.join(timeout=30)
    assert not reader.is_alive()
    ids = [json.loads(line)["conn_id"] for line in bytes(received).splitlines()]
    assert ids == [f"0-{i}" for i in range(count)]


def test_stamped_lines_tell_the_time_of_writing() -> None:
    """The timestamp cut from time_ns()'s digits is the wall clock, to the microsecond."""
    import io
    from datetime import UTC, datetime

    from connwatch.observe.logs import JsonInfoLines, LineLogger

    stream = io.StringIO()
    lines = JsonInfoLines(LineLogger(stream))
    for _ in range(3):  # the second turns over at most once: both paths are taken or checked
        before = datetime.now(UTC)
        lines.stamped({"event": "e", "level": "info", "timestamp": ""})
        after = datetime.now(UTC)
        stamp = json.loads(stream.getvalue().splitlines()[-1])["timestamp"]
        assert RFC3339_UTC.match(stamp)
        at = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
        assert before <= at <= after


def test_closed_line_duration_rounds_as_round_six_digits() -> None:
    """`duration_s` of the closed line (no round(x, 6) call, for speed) is round(duration, 6)."""
    import random
    from types import SimpleNamespace

    from connwatch.observe.connection_lines import ConnectionEvents

    rng = random.Random(15)
    durations = [rng.uniform(0, 10) for _ in range(20_000)]
    durations += [rng.expovariate(1000.0) for _ in range(20_000)]  # mostly sub-millisecond
    durations += [k / 1e6 for k in range(0, 5_000)] + [0.0, 86_400.123456, 3.5e-7]
    events = ConnectionEvents()
    written: list[dict[str, object]] = []
    events.write = written.append  # the rendering is checked above; here the value
    conn = SimpleNamespace(id="0-1", listener="app", client="c", target=None)
    for d in durations:
        events.closed(conn, "client_closed", d, 0, 0)  # type: ignore[arg-type]
    assert [line["duration_s"] for line in written] == [round(d, 6) for d in durations]
