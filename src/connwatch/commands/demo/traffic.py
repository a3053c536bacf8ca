"""`connwatch demo`: connwatch at work in one command, no file and no other service (SPEC §2).

One process, one loop: a built-in upstream on loopback (echo, heartbeat PONGs, a flood for a
reader that stops reading), the real `Daemon` in front of it with its admin endpoint, and a
traffic generator whose clients open, use, idle and close connections in every way a real
workload does. The live table is `connwatch top`'s view, drawn from the daemon in-process.

The daemon's logs go to a file in a temporary directory, so they cannot garble the table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import functools
import itertools
import os
import random
import signal
import socket
import struct
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final, cast

from connwatch.commands.top.view import (
    Keys,
    Snapshot,
    Totals,
    View,
    is_unicode,
    upstreams_from_readiness,
)
from connwatch.heartbeat import PongResponder
from connwatch.wire.heartbeat_frame import FRAME_SIZE, MAGIC, FrameError, FrameType, decode, ping

if TYPE_CHECKING:
    from rich.console import Console

    from connwatch.runtime.daemon import Daemon
    from connwatch.snapshots import DaemonStats

__all__ = ["DemoUpstream", "Traffic", "add_demo_parser", "cmd_demo", "daemon_snapshot"]

LOOPBACK: Final = "127.0.0.1"
ADMIN_PORT: Final = 9464
LISTENER: Final = "demo"
FLOOD: Final = b"FLOOD\n"  # first bytes that make the upstream push data without end
BYE: Final = b"BYE\n"  # first bytes that make the upstream close at once
FLOOD_LIMIT: Final = 64 * 1024 * 1024  # bytes one flood sends at most
_MAGIC_BYTES: Final = MAGIC.to_bytes(4, "big")
_CHUNK: Final = b"connwatch demo flood " * 3120  # ~64 KiB
_MODES: Final = ((_MAGIC_BYTES, "frames"), (FLOOD, "flood"), (BYE, "bye"))
_MAX_CHURN: Final = 100_000  # short connections per demo run, at most
_MAX_IN_FLIGHT: Final = 8  # short connections open at once, at most
_SHORT_LIMIT: Final = 8.0  # seconds one short connection may take
_STALLED_RCVBUF: Final = 4096  # the stalled reader's receive buffer: its window closes fast
_LINGER_RESET: Final = struct.pack("ii", 1, 0)
_LOG_LINES: Final = 8  # lines printed above the live table
_FIRST_FRAME: Final = 0.5  # seconds of traffic before the first frame, so that it has rows


# -- the built-in upstream ----------------------------------------------------------------------
def _pick_mode(head: bytes) -> str | None:
    """The mode the first bytes ask for; None while they are still a prefix of a command."""
    undecided = False
    for prefix, mode in _MODES:
        if head.startswith(prefix):
            return mode
        undecided = undecided or prefix.startswith(head)
    return None if undecided else "echo"


class _UpstreamProtocol(asyncio.Protocol):
    """One upstream connection. Its first bytes pick the mode: the heartbeat magic -> answer
    PINGs with PONGs; FLOOD -> push data until the peer stops reading (or FLOOD_LIMIT);
    BYE -> close at once; anything else -> echo."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._head = b""
        self._mode: str | None = None
        self._pong: PongResponder | None = None
        self._paused = False
        self._sent = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it: a cast.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        if transport is None:
            return
        if self._mode is None:
            self._head += data
            self._mode = _pick_mode(self._head)
            if self._mode is None:
                return
            data, self._head = self._head, b""
            if self._mode == "frames":
                self._pong = PongResponder()
                self._pong.connection_made(transport)
            elif self._mode == "flood":
                self._pump()
            elif self._mode == "bye":
                transport.close()
        if self._mode == "echo":
            transport.write(data)
        elif self._pong is not None:
            self._pong.data_received(data)

    def eof_received(self) -> bool | None:
        if self._pong is not None:
            return self._pong.eof_received()
        return None

    def pause_writing(self) -> None:
        self._paused = True
        if self._pong is not None:
            self._pong.pause_writing()
        elif self._transport is not None and self._mode == "echo":
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._paused = False
        if self._pong is not None:
            self._pong.resume_writing()
        elif self._transport is not None and self._mode == "echo":
            self._transport.resume_reading()
        elif self._mode == "flood":
            self._pump()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._pong is not None:
            self._pong.connection_lost(exc)
        self._transport = None

    def _pump(self) -> None:
        """Write until the transport's buffer is full (pause_writing) or the flood is spent."""
        while self._transport is not None and not self._paused and self._sent < FLOOD_LIMIT:
            self._transport.write(_CHUNK)
            self._sent += len(_CHUNK)


class DemoUpstream:
    """The demo's upstream server on 127.0.0.1 (port 0 picks one)."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None

    async def start(self, port: int = 0) -> DemoUpstream:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(_UpstreamProtocol, LOOPBACK, port)
        return self

    @property
    def address(self) -> str:
        assert self.server is not None
        return f"{LOOPBACK}:{self.server.sockets[0].getsockname()[1]}"

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


# -- the traffic generator ----------------------------------------------------------------------
async def _pause(stop: asyncio.Event, seconds: float) -> bool:
    """Wait `seconds` or until `stop`; True when stopping."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()
    return stop.is_set()


async def _close(writer: asyncio.StreamWriter, *, reset: bool = False) -> None:
    if reset:  # SO_LINGER 0: close() sends RST, the proxy sees client_reset
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    writer.close()
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(2):
            await writer.wait_closed()


def _payload(rng: random.Random, size: int) -> bytes:
    return b"data " + rng.randbytes(size)


class Traffic:
    """Clients of the demo proxy at `port`: long-lived chatty ones, a heartbeat speaker, one
    that goes quiet, one stalled reader, and a churn of short ones ending in different ways.
    Everything stops at `stop`; the churn also stops after _MAX_CHURN connections."""

    def __init__(self, port: int, stop: asyncio.Event, seed: int | None = None) -> None:
        self.port = port
        self.stop = stop
        self.rng = random.Random(seed)
        self.errors: Counter[str] = Counter()
        self.opened = 0

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            for size in (512 * 1024, 16 * 1024, 2 * 1024):
                group.create_task(self._forever(functools.partial(self._chatty, size)))
            group.create_task(self._forever(self._heartbeats))
            group.create_task(self._forever(self._quiet))
            group.create_task(self._forever(self._stalled))
            group.create_task(self._churn())

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        self.opened += 1
        return await asyncio.open_connection(LOOPBACK, self.port)

    async def _forever(self, session: Callable[[], Awaitable[None]]) -> None:
        """Run a long-lived session; if it fails, note why and start over until stopped."""
        while not self.stop.is_set():
            await self._guarded(session)
            await _pause(self.stop, 0.5)

    async def _guarded(self, session: Callable[[], Awaitable[None]]) -> None:
        try:
            await session()
        except (OSError, TimeoutError, EOFError, FrameError) as exc:
            self.errors[type(exc).__name__] += 1

    async def _echo(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, size: int
    ) -> None:
        data = _payload(self.rng, size)
        writer.write(data)
        async with asyncio.timeout(_SHORT_LIMIT):
            await reader.readexactly(len(data))

    async def _chatty(self, size: int) -> None:
        reader, writer = await self._open()
        try:
            while not await _pause(self.stop, self.rng.uniform(0.1, 0.6)):
                await self._echo(reader, writer, self.rng.randint(size // 4, size))
        finally:
            await _close(writer)

    async def _heartbeats(self) -> None:
        """A client speaking the heartbeat protocol (SPEC section 7) through the proxy."""
        reader, writer = await self._open()
        try:
            while not await _pause(self.stop, self.rng.uniform(0.3, 1.0)):
                writer.write(ping())
                async with asyncio.timeout(_SHORT_LIMIT):
                    reply = decode(await reader.readexactly(FRAME_SIZE))
                if reply.type is not FrameType.PONG:
                    raise FrameError("type", f"expected PONG, got {reply.type.name}")
        finally:
            await _close(writer)

    async def _quiet(self) -> None:
        """Says hello once, then holds the connection without a byte: it turns `idle`."""
        reader, writer = await self._open()
        try:
            await self._echo(reader, writer, 16)
            await self.stop.wait()
        finally:
            await _close(writer)

    async def _stalled(self) -> None:
        """Asks for a flood and never reads it: the proxy sees a zero window and pauses."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _STALLED_RCVBUF)
            sock.setblocking(False)
            self.opened += 1
            await loop.sock_connect(sock, (LOOPBACK, self.port))
            await loop.sock_sendall(sock, FLOOD)
            await self.stop.wait()
        finally:
            sock.close()  # unread data: the kernel resets, the proxy sees client_reset

    async def _churn(self) -> None:
        kinds = itertools.cycle(("ping", "hold", "echo", "bye", "hold", "reset", "ping", "hold"))
        running: set[asyncio.Task[None]] = set()
        for _ in range(_MAX_CHURN):
            if await _pause(self.stop, self.rng.uniform(0.1, 0.35)):
                break
            if len(running) >= _MAX_IN_FLIGHT:
                continue
            kind = next(kinds)
            session = functools.partial(self._short, kind)
            task = asyncio.get_running_loop().create_task(self._guarded(session))
            running.add(task)
            task.add_done_callback(running.discard)
        if running:
            await asyncio.wait(running)

    async def _short(self, kind: str) -> None:
        async with asyncio.timeout(_SHORT_LIMIT):
            reader, writer = await self._open()
            try:
                if kind == "ping":
                    writer.write(ping())
                    decode(await reader.readexactly(FRAME_SIZE))
                elif kind == "bye":  # the upstream closes first: upstream_closed
                    writer.write(BYE)
                    await reader.read()
                elif kind == "hold":  # a short session the table can show
                    for _ in range(self.rng.randint(2, 8)):
                        await self._echo(reader, writer, self.rng.randint(64, 8192))
                        if await _pause(self.stop, self.rng.uniform(0.2, 0.6)):
                            break
                else:
                    await self._echo(reader, writer, self.rng.randint(64, 4096))
            finally:
                await _close(writer, reset=kind == "reset")


# -- the daemon ---------------------------------------------------------------------------------
def demo_config(upstream: str, admin_port: int) -> dict[str, Any]:
    """The demo's daemon config: short intervals so that states show within seconds."""
    return {
        "admin": {"listen": f"{LOOPBACK}:{admin_port}"},
        "log": {"level": "info", "format": "json"},
        "shutdown": {"drain_timeout": "2s", "quiet_period": "200ms"},
        "listeners": [
            {
                "name": LISTENER,
                "listen": f"{LOOPBACK}:0",
                "upstreams": [upstream],
                "buffer_size": "64KiB",
                "heartbeat": {"interval": "1s", "max_interval": "3s", "stall_timeout": "10s"},
                "health_check": {
                    "type": "tcp",
                    "interval": "1s",
                    "max_interval": "5s",
                    "timeout": "1s",
                    "rise": 1,
                    "fall": 2,
                },
            }
        ],
    }


async def start_daemon(upstream: str) -> Daemon:
    """The daemon with its admin endpoint on 9464, or on a free port when 9464 is taken."""
    from connwatch.config import load_settings
    from connwatch.runtime.daemon import Daemon

    for port in (ADMIN_PORT, 0):
        settings = load_settings(None, base=demo_config(upstream, port), env={})
        daemon = Daemon(settings)
        try:
            await daemon.start()
        except OSError as exc:
            if port == 0 or exc.errno != errno.EADDRINUSE:
                raise
            continue
        return daemon
    raise AssertionError("unreachable")


def totals_from_stats(stats: DaemonStats) -> Totals:
    closed: Counter[str] = Counter()
    nbytes: Counter[str] = Counter()
    liveness: Counter[str] = Counter()
    for name, ls in stats.listeners.items():
        closed.update(ls.closed)
        nbytes.update(ls.bytes)
        if name in stats.liveness:
            liveness.update(stats.liveness[name].states)
    return Totals(
        active=sum(ls.active for ls in stats.listeners.values()),
        accepted=sum(ls.accepted for ls in stats.listeners.values()),
        closed=dict(closed),
        bytes=dict(nbytes),
        liveness=dict(liveness),
    )


async def daemon_snapshot(daemon: Daemon) -> Snapshot:
    """What `connwatch top` would fetch over HTTP, read from the daemon in this process."""
    totals = totals_from_stats(daemon.statistics())
    connections = await daemon.connection_records(None, None, None)
    _, body = await daemon.readiness()
    ready, upstreams = upstreams_from_readiness(body)
    return Snapshot(time.monotonic(), connections, totals, upstreams, ready)


# -- the display --------------------------------------------------------------------------------
class _Display:
    """The live table on a terminal (keys b/a/i/r sort, q quits), else a summary line a second."""

    def __init__(self, daemon: Daemon, view: View, stop: asyncio.Event, out: IO[str]) -> None:
        self.daemon = daemon
        self.view = view
        self.stop = stop
        self.out = out
        self._redraw = asyncio.Event()

    async def run(self, console: Console | None) -> None:
        if console is None:
            await self._plain()
            return
        from rich.live import Live

        loop = asyncio.get_running_loop()
        with (
            Keys() as keys,
            Live(console=console, auto_refresh=False, redirect_stdout=False) as live,
        ):
            self.view.keys = keys.fd is not None
            if keys.fd is not None:
                loop.add_reader(keys.fd, self._on_key, keys)
            try:
                await self._wait(_FIRST_FRAME)
                while not self.stop.is_set():
                    snapshot = await daemon_snapshot(self.daemon)
                    self.view.observe(snapshot)
                    height = max(8, console.height - _LOG_LINES)
                    unicode = is_unicode(console)
                    live.update(self.view.render(snapshot, height=height, unicode=unicode))
                    live.refresh()
                    await self._wait(1.0)
            finally:
                if keys.fd is not None:
                    loop.remove_reader(keys.fd)

    def _on_key(self, keys: Keys) -> None:
        action = self.view.press(keys.read_now())
        if action == "quit":
            self.stop.set()
        elif action == "sort":
            self._redraw.set()

    async def _wait(self, seconds: float) -> None:
        self._redraw.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await _first(self.stop.wait(), self._redraw.wait())

    async def _plain(self) -> None:
        started = time.monotonic()
        await self._wait(_FIRST_FRAME)
        while not self.stop.is_set():
            snapshot = await daemon_snapshot(self.daemon)
            self.view.observe(snapshot)
            elapsed = time.monotonic() - started
            if not _say(self.out, f"[{elapsed:5.1f}s] {self.view.summary(snapshot)}"):
                self.stop.set()  # the reader went away (`connwatch demo | head`): end quietly
            await self._wait(1.0)


def _say(out: IO[str], text: str) -> bool:
    """Print a line; False when the reader has gone (a closed pipe), which is not an error."""
    try:
        print(text, file=out, flush=True)
    except BrokenPipeError:
        # Point the descriptor at /dev/null so that the flush at exit does not fail again.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
        return False
    return True


async def _first(*aws: Awaitable[Any]) -> None:
    """Wait until the first of `aws` is done; cancel the rest."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


# -- the command --------------------------------------------------------------------------------
def _duration_arg(text: str) -> float:
    from connwatch.config.units import parse_duration

    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError("the duration must be more than 0")
    return seconds


def add_demo_parser(subparsers: Any) -> None:
    """Add the `demo` subcommand to an argparse subparsers object."""
    demo = subparsers.add_parser(
        "demo",
        help="run a built-in upstream, connwatch and traffic, and show the live table",
        description="Start a built-in upstream, connwatch in front of it with the admin endpoint "
        "on 127.0.0.1:9464 (another port if taken) and a traffic generator, all on loopback; "
        "print the admin URLs and show the live connection table until Ctrl-C.",
    )
    demo.add_argument(
        "--duration",
        type=_duration_arg,
        metavar="S",
        help="stop after this long (e.g. 30, 30s, 2m); default: until Ctrl-C",
    )


def cmd_demo(args: argparse.Namespace) -> int:
    from connwatch.cli import run_loop
    from connwatch.exceptions import ListenerError

    try:
        run_loop(lambda: _demo(args.duration, sys.stdout))
    except (ListenerError, OSError) as exc:
        print(f"connwatch demo: {exc}", file=sys.stderr)
        return 1
    return 0


async def _demo(duration: float | None, out: IO[str]) -> None:
    from connwatch.observe.logs import configure_logging

    log_dir = Path(tempfile.mkdtemp(prefix="connwatch-demo-"))
    log_path = log_dir / "connwatch.observe.logs"
    with log_path.open("w", encoding="utf-8") as log_file:
        configure_logging("info", "json", stream=log_file)
        try:
            await _serve(duration, out, log_path)
        finally:
            configure_logging("warning", "json", stream=sys.stderr)
    _say(out, f"demo finished; the daemon's log is {log_path}")


async def _serve(duration: float | None, out: IO[str], log_path: Path) -> None:
    upstream = await DemoUpstream().start()
    try:
        daemon = await start_daemon(upstream.address)
        try:
            await _with_daemon(daemon, upstream, duration, out, log_path)
        finally:
            await daemon.shutdown()
    finally:
        upstream.close()


async def _with_daemon(
    daemon: Daemon, upstream: DemoUpstream, duration: float | None, out: IO[str], log_path: Path
) -> None:
    from rich.console import Console

    admin = f"http://{LOOPBACK}:{daemon.admin.port}"
    proxy = f"{LOOPBACK}:{daemon.listeners[LISTENER].port}"
    moved = "" if daemon.admin.port == ADMIN_PORT else f"  ({ADMIN_PORT} is taken)"
    _say(
        out,
        f"connwatch demo: proxy {proxy} -> built-in upstream {upstream.address}, traffic running\n"
        f"  metrics      {admin}/metrics{moved}\n"
        f"  connections  {admin}/connections\n"
        f"  readyz       {admin}/readyz\n"
        f"  log          {log_path}\n"
        f"  also try     connwatch top --admin {admin}   (in another terminal)\n"
        f"{'Ctrl-C' if duration is None else f'{duration:g}s, or Ctrl-C,'} ends the demo.",
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = _on_signals(loop, stop, daemon)
    if duration is not None:
        loop.call_later(duration, stop.set)
    console = Console(file=out, highlight=False) if out.isatty() else None
    view = View(source=admin, sort="bytes")
    traffic = Traffic(daemon.listeners[LISTENER].port, stop)
    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(traffic.run())
            group.create_task(_Display(daemon, view, stop, out).run(console))
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
    _say(out, f"stopping: {traffic.opened} client connections were opened")


def _on_signals(
    loop: asyncio.AbstractEventLoop, stop: asyncio.Event, daemon: Daemon
) -> list[signal.Signals]:
    """Ctrl-C or SIGTERM ends the demo; a second one also aborts open connections at once."""
    from connwatch._types import CloseReason

    def handle() -> None:
        if stop.is_set():
            for conn in list(daemon.tracker.connections()):
                conn.close(CloseReason.SHUTDOWN, abort=True)
        stop.set()

    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, handle)
            installed.append(sig)
    return installed
