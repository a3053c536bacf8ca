"""Active health checks: each check type (checks.py) against real loopback servers, the rise/fall
state machine and adaptive interval with a fake clock, and the monitor (health.py) end to end."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from connwatch._types import Address, HealthState
from connwatch.config import HealthCheckConfig
from connwatch.health.checks import CheckResult, run_check
from connwatch.health.monitor import HealthMonitor, TargetHealth, Transition
from connwatch.heartbeat import PongResponder, start_responder
from connwatch.proxy.upstream import Target
from connwatch.wire.heartbeat_frame import FRAME_SIZE, decode, pong_for
from tests.support import eventually

LOOPBACK = "127.0.0.1"
pytestmark = pytest.mark.both_loops  # sockets, TLS and timeouts behave alike on both loops
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def check_config(**fields: Any) -> HealthCheckConfig:
    return HealthCheckConfig.model_validate({"timeout": "1s", **fields})


# -- servers ------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serving(
    handler: Handler,
    *,
    port: int = 0,
    unix: str | None = None,
    tls: ssl.SSLContext | None = None,
) -> AsyncIterator[Address]:
    """A stream server on a loopback port (0: ephemeral) or a Unix socket; yields its address.

    On exit it also ends the connections it accepted (Python 3.11's `wait_closed` does not),
    so no transport outlives the test's loop."""
    handlers: set[asyncio.Task[Any]] = set()
    writers: set[asyncio.StreamWriter] = set()

    async def guarded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        writers.add(writer)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass  # the checker may hang up first: that is its right
        finally:
            writer.close()
            writers.discard(writer)
            handlers.discard(task)

    if unix is not None:
        server = await asyncio.start_unix_server(guarded, unix, ssl=tls)
        address = Address(path=unix)
    else:
        server = await asyncio.start_server(guarded, LOOPBACK, port, ssl=tls)
        address = Address(LOOPBACK, server.sockets[0].getsockname()[1])
    try:
        yield address
    finally:
        server.close()
        for writer in list(writers):
            writer.close()
        if handlers:
            await asyncio.wait(list(handlers), timeout=5)
        async with asyncio.timeout(5):
            await server.wait_closed()


def http_handler(status: Callable[[], int] | int, requests: list[bytes] | None = None) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if requests is not None:
            requests.append(head)
        code = status() if callable(status) else status
        writer.write(
            f"HTTP/1.1 {code} Whatever\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok".encode()
        )
        await writer.drain()

    return handle


def reply_handler(reply: bytes, *, then_close: bool = True) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)
        writer.write(reply)
        await writer.drain()
        if not then_close:
            await reader.read(1024)  # hold the connection until the checker hangs up

    return handle


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while await reader.read(1024):  # never answers; waits for the checker to hang up
        pass


async def bad_checksum_pong(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    frame = decode(await reader.readexactly(FRAME_SIZE))
    pong = bytearray(pong_for(frame))
    pong[-1] ^= 0xFF
    writer.write(bytes(pong))
    await writer.drain()


@pytest.fixture
def refused() -> Iterator[Address]:
    """A port that is bound but not listening: connecting is refused, and nobody can take it."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        yield Address(LOOPBACK, sock.getsockname()[1])


@pytest.fixture
def sock_dir() -> Iterator[str]:
    # Short: a Unix socket path is limited to ~107 bytes, pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="cw-", dir="/tmp") as path:
        yield path


@pytest.fixture(scope="module")
def server_tls(tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is needed to make a self-signed certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=test"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


# -- one check ----------------------------------------------------------------------------------


async def test_tcp_healthy_and_refused(refused: Address) -> None:
    async with serving(silent) as address:
        result = await run_check(address, check_config(type="tcp"))
    assert result.ok, result
    assert result.detail == "connected"
    assert 0 < result.latency_s < 1
    result = await run_check(refused, check_config(type="tcp"))
    assert not result.ok
    assert result.detail == "Connection refused"


async def test_port_option_replaces_the_targets_port(refused: Address) -> None:
    async with serving(silent) as address:
        result = await run_check(refused, check_config(type="tcp", port=address.port))
        assert result.ok, result
        result = await run_check(address, check_config(type="tcp", port=refused.port))
        assert not result.ok


async def test_http_status_decides() -> None:
    status = 200
    requests: list[bytes] = []
    async with serving(http_handler(lambda: status, requests)) as address:
        cfg = check_config(type="http", http={"path": "/ready?full=1"})
        result = await run_check(address, cfg)
        assert result.ok, result
        assert result.detail == "HTTP 200 Whatever"
        status = 500
        result = await run_check(address, cfg)
        assert not result.ok
        assert result.detail == "HTTP 500 Whatever; expected 200-399"
    head = requests[0].decode()
    assert head.startswith("GET /ready?full=1 HTTP/1.1\r\n")
    assert f"\r\nHost: {address}\r\n" in head


@pytest.mark.parametrize(
    ("expected", "code", "ok"),
    [
        ("200-399,404", 404, True),
        ("200-399,404", 399, True),
        ("200-399,404", 400, False),
        ("204", 200, False),
        ("500-599", 503, True),
    ],
)
async def test_http_status_ranges(expected: str, code: int, ok: bool) -> None:
    async with serving(http_handler(code)) as address:
        cfg = check_config(type="http", http={"expected_status": expected})
        assert (await run_check(address, cfg)).ok is ok


async def test_http_host_header_and_non_http_reply() -> None:
    requests: list[bytes] = []
    async with serving(http_handler(200, requests)) as address:
        cfg = check_config(type="http", http={"host": "app.internal", "path": "/"})
        assert (await run_check(address, cfg)).ok
    assert b"\r\nHost: app.internal\r\n" in requests[0]
    async with serving(reply_handler(b"+PONG\r\n")) as address:
        result = await run_check(address, check_config(type="http"))
    assert not result.ok
    assert result.detail.startswith("not an HTTP response")


async def test_https_without_certificate_verification(server_tls: ssl.SSLContext) -> None:
    async with serving(http_handler(204), tls=server_tls) as address:
        result = await run_check(address, check_config(type="http", http={"scheme": "https"}))
        assert result.ok, result
        assert result.detail == "HTTP 204 Whatever"
        # Plain HTTP against a TLS port is not healthy.
        assert not (await run_check(address, check_config(type="http"))).ok


async def test_http_times_out_on_a_silent_server() -> None:
    async with serving(silent) as address:
        cfg = check_config(type="http", timeout="200ms")
        started = time.monotonic()
        result = await run_check(address, cfg)
    assert not result.ok
    assert result.detail == "timed out after 0.2s while waiting for the status line"
    assert time.monotonic() - started < 1.5


async def test_send_expect_prefix_regex_and_binary() -> None:
    async with serving(reply_handler(b"+PONG\r\n")) as address:
        assert (await run_check(address, check_config(type="send_expect"))).ok
        wrong = check_config(type="send_expect", send_expect={"expect": "-ERR"})
        result = await run_check(address, wrong)
        assert not result.ok
        assert "peer closed after 7 bytes b'+PONG\\r\\n'" in result.detail
        regex = check_config(type="send_expect", send_expect={"expect": "re:P[O]NG\\r\\n$"})
        assert (await run_check(address, regex)).ok
    async with serving(reply_handler(b"\x00\x01OK\xff", then_close=False)) as address:
        binary = {"send": "\\x00\\x10hello\\0", "expect": "\\x00\\x01OK"}
        assert (await run_check(address, check_config(type="send_expect", send_expect=binary))).ok


async def test_send_expect_sends_exactly_the_bytes() -> None:
    received = asyncio.get_running_loop().create_future()

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.set_result(await reader.readexactly(5))
        writer.write(b"ok")
        await writer.drain()

    async with serving(record) as address:
        cfg = check_config(
            type="send_expect", send_expect={"send": "A\\r\\n\\x00\\t", "expect": "ok"}
        )
        assert (await run_check(address, cfg)).ok
    assert received.result() == b"A\r\n\x00\t"


async def test_send_expect_timeout_says_what_arrived() -> None:
    async with serving(reply_handler(b"+PON", then_close=False)) as address:
        cfg = check_config(type="send_expect", timeout="200ms")
        result = await run_check(address, cfg)
    assert not result.ok
    assert result.detail == (
        "timed out after 0.2s while waiting for the expected reply, got 4 bytes b'+PON'"
    )


async def test_heartbeat_check_and_bad_frame_counts_a_protocol_error() -> None:
    errors: list[str] = []
    server = await start_responder(LOOPBACK, 0)
    try:
        address = Address(LOOPBACK, server.sockets[0].getsockname()[1])
        result = await run_check(
            address, check_config(type="heartbeat"), on_protocol_error=errors.append
        )
        assert result.ok, result
        assert result.detail.startswith("PONG in ")
    finally:
        server.close()
        await server.wait_closed()
    assert errors == []
    async with serving(bad_checksum_pong) as address:
        result = await run_check(
            address, check_config(type="heartbeat"), on_protocol_error=errors.append
        )
    assert not result.ok
    assert result.detail.startswith("bad heartbeat frame")
    assert errors == ["heartbeat_frame"]


async def test_heartbeat_check_never_raises_from_a_faulty_callback() -> None:
    def explode(kind: str) -> None:
        raise RuntimeError(kind)

    async with serving(bad_checksum_pong) as address:
        result = await run_check(address, check_config(type="heartbeat"), on_protocol_error=explode)
    assert not result.ok


@pytest.mark.parametrize("kind", ["tcp", "http", "send_expect", "heartbeat"])
async def test_checks_over_a_unix_socket(kind: str, sock_dir: str) -> None:
    handlers: dict[str, Handler] = {
        "tcp": silent,
        "http": http_handler(200),
        "send_expect": reply_handler(b"+PONG\r\n"),
    }
    path = str(Path(sock_dir) / "up.sock")
    if kind == "heartbeat":
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(PongResponder, path)
        try:
            result = await run_check(Address(path=path), check_config(type=kind, port=9))
        finally:
            server.close()
            await server.wait_closed()
    else:
        async with serving(handlers[kind], unix=path) as address:
            result = await run_check(address, check_config(type=kind, port=9))
    assert result.ok, result
    assert not (await run_check(Address(path=path + ".gone"), check_config(type=kind))).ok


# -- the state machine (pure, no clock) ---------------------------------------------------------


def machine(**kw: Any) -> TargetHealth:
    args: dict[str, Any] = {"rise": 2, "fall": 3, "interval": 1.0, "max_interval": 5.0, **kw}
    return TargetHealth(**args)


def test_rise_and_fall_from_unknown() -> None:
    m = machine()
    assert m.record(True) is None
    assert m.record(True) == Transition(HealthState.UNKNOWN, HealthState.UP)
    m = machine()
    assert m.record(False) is None
    assert m.record(False) is None
    assert m.record(False) == Transition(HealthState.UNKNOWN, HealthState.DOWN)
    assert m.failures == 3


def test_rise_and_fall_need_consecutive_results() -> None:
    m = machine(state=HealthState.UP)
    outcomes = [False, False, True, False, False, True]
    assert [m.record(ok) for ok in outcomes] == [None] * 6
    assert m.state is HealthState.UP
    assert [m.record(ok) for ok in [False, False, False]][-1] == Transition(
        HealthState.UP, HealthState.DOWN
    )
    assert m.record(True) is None  # rise=2: one success is not enough
    assert m.record(False) is None
    assert m.record(True) is None
    assert m.record(True) == Transition(HealthState.DOWN, HealthState.UP)


def test_rise_one_fall_one() -> None:
    m = machine(rise=1, fall=1)
    assert m.record(False) == Transition(HealthState.UNKNOWN, HealthState.DOWN)
    assert m.record(True) == Transition(HealthState.DOWN, HealthState.UP)


def test_adaptive_interval_grows_to_max_and_resets() -> None:
    m = machine(state=HealthState.UP)
    waits = []
    for _ in range(7):
        m.record(True)
        waits.append(m.interval)
    assert waits == [1.5, 2.25, 3.375, 5.0, 5.0, 5.0, 5.0]
    m.record(False)  # a failure, even without a state change, resets it
    assert m.interval == 1.0
    m.record(True)
    assert m.interval == 1.5


def test_adaptive_interval_resets_on_state_change() -> None:
    m = machine(rise=2)
    m.record(True)
    assert m.interval == 1.5  # passing, no change yet
    m.record(True)  # UNKNOWN -> UP
    assert m.interval == 1.0


def test_fixed_interval_when_max_equals_interval() -> None:
    m = machine(max_interval=1.0, state=HealthState.UP)
    for _ in range(5):
        m.record(True)
        assert m.interval == 1.0


def test_jitter_is_ten_percent_either_way() -> None:
    m = machine()
    assert m.next_wait(0.0) == pytest.approx(0.9)
    assert m.next_wait(0.5) == pytest.approx(1.0)
    assert m.next_wait(0.999999) == pytest.approx(1.1)


# -- the monitor --------------------------------------------------------------------------------


@pytest.fixture
def clean_structlog() -> Iterator[None]:
    """Default structlog config (no level filter from other tests), restored afterwards."""
    saved = structlog.get_config()
    structlog.reset_defaults()
    yield
    structlog.configure(**saved)


class Changes:
    """on_state_change that records transitions and lets a test await the next one."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, HealthState, HealthState]] = []
        self.queue: asyncio.Queue[HealthState] = asyncio.Queue()

    def __call__(self, listener: str, target: Target, old: HealthState, new: HealthState) -> None:
        self.seen.append((listener, target.label, old, new))
        self.queue.put_nowait(new)

    async def next(self, timeout: float = 5) -> HealthState:
        async with asyncio.timeout(timeout):
            return await self.queue.get()


async def test_monitor_marks_down_and_up_in_time() -> None:
    interval, timeout, rise, fall = 0.1, 0.5, 2, 3
    cfg = check_config(
        interval=interval, max_interval=interval, timeout=timeout, rise=rise, fall=fall
    )
    changes = Changes()
    monitor = HealthMonitor(on_state_change=changes)
    try:
        async with serving(silent) as address:
            target = Target(address)
            monitor.start("app", cfg, [target])
            assert target.state is HealthState.UNKNOWN
            assert await changes.next() is HealthState.UP
            assert target.latency_ms is not None
            assert target.last_check is not None
        went_down = time.monotonic()
        assert await changes.next() is HealthState.DOWN
        assert time.monotonic() - went_down < fall * interval + timeout + 1
        assert target.state is HealthState.DOWN
        assert target.consecutive_failures >= fall
        assert target.latency_ms is None
        async with serving(silent, port=address.port):
            came_back = time.monotonic()
            assert await changes.next() is HealthState.UP
            assert time.monotonic() - came_back < rise * interval + 1
            assert target.consecutive_failures == 0
            await monitor.close()
    finally:
        await monitor.close()
    assert [(old, new) for _, _, old, new in changes.seen] == [
        (HealthState.UNKNOWN, HealthState.UP),
        (HealthState.UP, HealthState.DOWN),
        (HealthState.DOWN, HealthState.UP),
    ]
    assert target.checks["success"] >= 2 * rise
    assert target.checks["failure"] >= fall
    assert target.check_duration.snapshot().count == sum(target.checks.values())


async def test_state_change_logged_only_on_change(clean_structlog: None) -> None:
    cfg = check_config(interval="20ms", max_interval="20ms", rise=1)
    monitor = HealthMonitor()
    async with serving(silent) as address:
        target = Target(address)
        with capture_logs() as logs:
            monitor.start("app", cfg, [target])
            await eventually(lambda: target.checks["success"] >= 6)
            await monitor.close()
    changed = [e for e in logs if e["event"] == "upstream_state_changed"]
    assert len(changed) == 1
    assert changed[0]["listener"] == "app"
    assert changed[0]["upstream"] == str(address)
    assert (changed[0]["old"], changed[0]["new"]) == ("UNKNOWN", "UP")
    assert changed[0]["log_level"] == "info"


async def test_down_is_logged_as_warning(clean_structlog: None, refused: Address) -> None:
    cfg = check_config(interval="20ms", fall=2)
    changes = Changes()
    monitor = HealthMonitor(on_state_change=changes)
    target = Target(refused)
    with capture_logs() as logs:
        monitor.start("app", cfg, [target])
        assert await changes.next() is HealthState.DOWN
        await monitor.close()
    changed = [e for e in logs if e["event"] == "upstream_state_changed"]
    assert [(e["old"], e["new"], e["log_level"]) for e in changed] == [
        ("UNKNOWN", "DOWN", "warning")
    ]
    assert changed[0]["detail"] == "Connection refused"


class Script:
    """A scripted check and a fake sleep: the monitor's schedule, without real time passing."""

    def __init__(self, outcomes: list[bool]) -> None:
        self.outcomes = outcomes
        self.events: list[str] = []
        self.waits: list[float] = []
        self.done = asyncio.Event()

    async def check(self, address: Address, cfg: HealthCheckConfig, **_: Any) -> CheckResult:
        ok = self.outcomes[len(self.events)] if self.outcomes else True
        self.events.append("check")
        return CheckResult(ok, 0.001, "scripted")

    async def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        if len(self.waits) >= len(self.outcomes):
            self.done.set()
            await asyncio.Event().wait()  # park here until cancelled
        await asyncio.sleep(0)


async def test_monitor_schedule_adapts_with_jitter() -> None:
    outcomes = [True, True, True, True, True, True, False, True]
    script = Script(outcomes)
    monitor = HealthMonitor(
        check=script.check, sleep=script.sleep, monotonic=lambda: 100.0, unit_random=lambda: 1.0
    )
    target = Target(Address(LOOPBACK, 9))
    monitor.start("app", check_config(interval="1s", max_interval="4s", rise=2), [target])
    async with asyncio.timeout(5):
        await script.done.wait()
    await monitor.close()
    # The first check runs at once; waits carry +10% jitter (unit_random 1.0).
    assert script.events[0] == "check"
    assert len(script.events) == len(outcomes)
    base = [1.5, 1.0, 1.5, 2.25, 3.375, 4.0, 1.0, 1.5]  # UP at the 2nd; failure at the 7th
    assert script.waits == pytest.approx([w * 1.1 for w in base])
    assert target.state is HealthState.UP
    assert target.checks == {"success": 7, "failure": 1}


async def test_disabled_checks_leave_targets_unknown() -> None:
    script = Script([])
    monitor = HealthMonitor(check=script.check, sleep=script.sleep)
    target = Target(Address(LOOPBACK, 9))
    monitor.start("app", check_config(enabled=False), [target])
    assert not monitor.running("app")
    await asyncio.sleep(0)
    assert script.events == []
    assert target.state is HealthState.UNKNOWN
    # Turning checks off on reload forgets a stale DOWN (it would keep the target unusable).
    target.state = HealthState.DOWN
    monitor.start("app", check_config(enabled=False), [target])
    assert target.state is HealthState.UNKNOWN
    await monitor.close()


async def test_restart_replaces_tasks_and_keeps_state() -> None:
    checks = asyncio.Queue[str]()

    async def check(address: Address, cfg: HealthCheckConfig, **_: Any) -> CheckResult:
        checks.put_nowait(cfg.type)
        return CheckResult(True, 0.001, "ok")

    monitor = HealthMonitor(check=check)
    target = Target(Address(LOOPBACK, 9))
    target.state = HealthState.UP
    monitor.start("app", check_config(type="tcp", interval="10s", max_interval="10s"), [target])
    assert await asyncio.wait_for(checks.get(), 5) == "tcp"
    monitor.start("app", check_config(type="http", interval="10s", max_interval="10s"), [target])
    assert await asyncio.wait_for(checks.get(), 5) == "http"
    assert target.state is HealthState.UP  # a reload does not send targets back to UNKNOWN
    monitor.stop("app")
    assert not monitor.running("app")
    monitor.stop("app")  # stopping twice is harmless
    await monitor.close()
    assert checks.empty()


async def test_close_cancels_checks_in_flight() -> None:
    started = asyncio.Event()

    async def hang(address: Address, cfg: HealthCheckConfig, **_: Any) -> CheckResult:
        started.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    monitor = HealthMonitor(check=hang)
    monitor.start(
        "a", check_config(), [Target(Address(LOOPBACK, 9)), Target(Address(LOOPBACK, 10))]
    )
    monitor.start("b", check_config(), [Target(Address(LOOPBACK, 11))])
    await asyncio.wait_for(started.wait(), 5)
    await asyncio.wait_for(monitor.close(), 5)
    assert not monitor.running("a")
    assert not monitor.running("b")
    await monitor.close()  # idempotent


async def test_faulty_state_callback_does_not_stop_checks(refused: Address) -> None:
    calls = 0

    def explode(listener: str, target: Target, old: HealthState, new: HealthState) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("observer bug")

    monitor = HealthMonitor(on_state_change=explode)
    target = Target(refused)
    monitor.start("app", check_config(interval="10ms", max_interval="10ms", fall=1), [target])
    await eventually(lambda: target.checks["failure"] >= 3)
    await monitor.close()
    assert calls == 1
    assert target.state is HealthState.DOWN


async def test_protocol_errors_reach_the_monitor_callback() -> None:
    errors: list[str] = []
    monitor = HealthMonitor(on_protocol_error=errors.append)
    async with serving(bad_checksum_pong) as address:
        target = Target(address)
        cfg = check_config(type="heartbeat", interval="10ms", max_interval="10ms", fall=2)
        monitor.start("app", cfg, [target])
        await eventually(lambda: target.state is HealthState.DOWN)
        await monitor.close()
    assert errors
    assert set(errors) == {"heartbeat_frame"}
    assert len(errors) == target.checks["failure"]


def test_health_re_exports_the_check_layer() -> None:
    import connwatch.health.checks
    import connwatch.health.monitor

    assert connwatch.health.monitor.run_check is connwatch.health.checks.run_check
    assert connwatch.health.monitor.CheckResult is connwatch.health.checks.CheckResult
    assert connwatch.health.monitor.MAX_REPLY == connwatch.health.checks.MAX_REPLY
