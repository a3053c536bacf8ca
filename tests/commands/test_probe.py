"""`connwatch probe`: exit codes and output for each check type, option validation."""

from __future__ import annotations

import argparse
import asyncio
import re
from collections.abc import Iterator

import pytest

from connwatch.commands.probe import add_probe_parser, cmd_probe, probe_config
from connwatch.exceptions import ConfigError
from connwatch.heartbeat import start_responder
from connwatch.wire.heartbeat_frame import FRAME_SIZE, Frame, decode, pong_for
from tests.health.test_health import (
    LOOPBACK,
    Handler,
    bad_checksum_pong,
    http_handler,
    reply_handler,
    serving,
    silent,
)
from tests.support import run_probe

RESULT = re.compile(r"^(healthy|unhealthy) (\d+\.\d{3})ms (.+)$")


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="connwatch")
    add_probe_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["probe", *argv])


async def probe(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """Run cmd_probe in a thread (it runs its own event loop) while our servers serve here."""
    code = await asyncio.to_thread(cmd_probe, parse(*argv))
    out = capsys.readouterr().out.strip()
    match = RESULT.match(out)
    assert match is not None, out
    assert (match.group(1) == "healthy") is (code == 0)
    return code, match.group(3)


@pytest.fixture
def refused() -> Iterator[str]:
    import socket

    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))  # bound, not listening: connections are refused
        yield f"{LOOPBACK}:{sock.getsockname()[1]}"


async def test_tcp_probe_is_healthy_when_connected_and_unhealthy_when_refused(
    capsys: pytest.CaptureFixture[str], refused: str
) -> None:
    async with serving(silent) as address:
        assert await probe(capsys, str(address)) == (0, "connected")
        assert await probe(capsys, refused, "--port", str(address.port)) == (0, "connected")
    assert await probe(capsys, refused, "--type", "tcp") == (1, "Connection refused")


async def test_http_probe_is_healthy_only_within_the_expected_status(
    capsys: pytest.CaptureFixture[str],
) -> None:
    async with serving(http_handler(503)) as address:
        code, detail = await probe(capsys, str(address), "--type", "http", "--path", "/ready")
        assert (code, detail) == (1, "HTTP 503 Whatever; expected 200-399")
        args = ("--type", "http", "--expected-status", "200-299,503", "--host", "x.example")
        assert await probe(capsys, str(address), *args) == (0, "HTTP 503 Whatever")


async def test_send_expect_probe_is_healthy_only_when_the_reply_matches(
    capsys: pytest.CaptureFixture[str],
) -> None:
    async with serving(reply_handler(b"+PONG\r\n")) as address:
        args = (str(address), "--type", "send-expect", "--send", "PING\\r\\n")
        assert (await probe(capsys, *args, "--expect", "+PONG"))[0] == 0
        assert (await probe(capsys, *args, "--expect", "re:^\\+P.NG"))[0] == 0
        code, detail = await probe(capsys, *args, "--expect=-ERR")  # = : it starts with "-"
        assert code == 1
        assert "expected '-ERR'" in detail


async def test_heartbeat_probe_is_healthy_on_a_pong_and_unhealthy_on_a_bad_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = await start_responder(LOOPBACK, 0)
    try:
        port = server.sockets[0].getsockname()[1]
        code, detail = await probe(capsys, f"{LOOPBACK}:{port}", "--type", "heartbeat")
        assert code == 0
        assert detail.startswith("PONG in ")
    finally:
        server.close()
        await server.wait_closed()

    async def wrong_timestamp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        frame = decode(await reader.readexactly(FRAME_SIZE))
        writer.write(pong_for(Frame(frame.type, frame.timestamp_ms + 1)))
        await writer.drain()

    async with serving(wrong_timestamp) as address:
        code, detail = await probe(capsys, str(address), "--type", "heartbeat")
    assert code == 1
    assert detail.startswith("bad heartbeat frame")


async def test_probe_past_its_timeout_is_unhealthy_naming_the_wait(
    capsys: pytest.CaptureFixture[str],
) -> None:
    async with serving(silent) as address:
        args = (str(address), "--type", "http", "--timeout", "150ms")
        code, detail = await probe(capsys, *args)
    assert code == 1
    assert detail == "timed out after 0.15s while waiting for the status line"


def test_probe_options_build_the_health_check_config() -> None:
    address, cfg = probe_config(
        parse("[::1]:8443", "--type", "http", "--scheme", "https", "--port", "9000")
    )
    assert str(address) == "[::1]:8443"
    assert (cfg.type, cfg.port, cfg.http.scheme, cfg.timeout) == ("http", 9000, "https", 2.0)
    _, cfg = probe_config(parse("unix:/run/x.sock", "--type", "send-expect", "--send", "\\x00"))
    assert cfg.type == "send_expect"
    assert cfg.send_expect.send_bytes == b"\x00"


def test_bad_options_name_the_option() -> None:
    args = parse(
        "nohost", "--timeout", "soon", "--expected-status", "700", "--send", "\\q", "--port", "0"
    )
    with pytest.raises(ConfigError) as caught:
        probe_config(args)
    issues = caught.value.issues
    assert any(i.startswith("ADDR = 'nohost': expected HOST:PORT") for i in issues), issues
    assert any(i.startswith("--timeout = 'soon': ") for i in issues), issues
    assert any(i.startswith("--expected-status = '700': codes run") for i in issues), issues
    assert any(i.startswith("--send = '\\q': unknown escape") for i in issues), issues
    assert any(i.startswith("--port = 0: must be at least 1") for i in issues), issues


def test_unknown_type_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as caught:
        parse("127.0.0.1:1", "--type", "udp")
    assert caught.value.code == 2


async def test_probe_command_exits_0_healthy_1_unhealthy_2_bad_option(refused: str) -> None:
    async with serving(http_handler(200)) as address:
        result = await run_probe(str(address), "--type", "http")
        assert result.returncode == 0
        assert RESULT.match(result.stdout.strip()), result.stdout
    result = await run_probe(refused)
    assert result.returncode == 1
    assert result.stdout.startswith("unhealthy ")
    result = await run_probe(refused, "--timeout", "never")
    assert result.returncode == 2
    assert "--timeout = 'never'" in result.stderr


async def heartbeat_responder(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    frame = decode(await reader.readexactly(FRAME_SIZE))
    writer.write(pong_for(frame))
    await writer.drain()


# type -> (options, a server that passes, a server that fails and the detail it gives)
CASES: dict[str, tuple[tuple[str, ...], Handler, Handler, str]] = {
    "tcp": ((), silent, silent, "Connection refused"),  # failing: nothing listens
    "http": (("--path", "/ready"), http_handler(204), http_handler(500), "HTTP 500 Whatever"),
    "send-expect": (
        ("--send", "PING\\r\\n", "--expect", "+PONG"),
        reply_handler(b"+PONG\r\n"),
        reply_handler(b"-ERR\r\n"),
        "peer closed after 6 bytes",
    ),
    "heartbeat": ((), heartbeat_responder, bad_checksum_pong, "bad heartbeat frame"),
}


@pytest.mark.parametrize("kind", sorted(CASES))
async def test_probe_command_exits_0_and_1_for_each_check_type(kind: str, refused: str) -> None:
    options, healthy, unhealthy, detail = CASES[kind]
    args = ("--type", kind, "--timeout", "1s", *options)
    async with serving(healthy) as address:
        result = await run_probe(str(address), *args)
    assert (result.returncode, result.stderr) == (0, ""), result.stdout
    assert result.stdout.startswith("healthy "), result.stdout
    if kind == "tcp":
        result = await run_probe(refused, *args)
    else:
        async with serving(unhealthy) as address:
            result = await run_probe(str(address), *args)
    assert (result.returncode, result.stderr) == (1, ""), result.stdout
    match = RESULT.match(result.stdout.strip())
    assert match is not None, result.stdout
    assert match.group(1) == "unhealthy"
    assert match.group(3).startswith(detail), result.stdout
