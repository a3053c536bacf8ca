"""Python's floor: the least a Python proxy can do per byte and per connection on this machine.

Two minimal forwarders with no monitoring at all, measured in the same run as connwatch, so a
gap between connwatch and HAProxy can be split into what Python costs and what monitoring costs
(the speed issue's reference figures in BENCH.md were made with forwarders like these):

- `protocol`: uvloop, one `asyncio.Protocol` per leg, `data_received` → `write`, flow control
  and half-close forwarded.
- `splice`: uvloop, each direction socket → pipe → socket with `os.splice`, the loop's readers
  and writers on the sockets.

Usage: python bench/floors.py {protocol,splice} LISTEN_PORT UPSTREAM_PORT [--workers N]
(workers share the port with SO_REUSEPORT). Not part of connwatch: nothing imports this.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
from typing import Any

HOST = "127.0.0.1"
CHUNK = 64 * 1024  # a pipe's default capacity
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)


class _Leg(asyncio.Protocol):
    """One side of a Protocol-forwarded connection."""

    def __init__(self) -> None:
        self.transport: Any = None
        self.peer: _Leg | None = None
        self.held = b""  # uvloop may deliver a first read after pause_reading()
        self.eof = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.peer is None:
            self.held += data
        else:
            self.peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is not None and not peer.transport.is_closing():
            peer.transport.write_eof()
            if peer.eof:  # both directions ended
                self.transport.close()
        return True

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        peer, self.peer = self.peer, None
        if peer is not None:
            peer.peer = None
            peer.transport.close()


class _ClientLeg(_Leg):
    def __init__(self, upstream: int, tasks: set[asyncio.Task[None]]) -> None:
        super().__init__()
        self.upstream = upstream
        self.tasks = tasks  # strong references: a running task must not be collected

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        transport.pause_reading()
        task = asyncio.get_running_loop().create_task(self._connect())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, up = await loop.create_connection(_Leg, HOST, self.upstream)
        except OSError:
            self.transport.close()
            return
        if self.transport.is_closing():
            up.transport.close()
            return
        up.peer, self.peer = self, up
        if self.held:
            up.transport.write(self.held)
        if self.eof:
            up.transport.write_eof()
        else:
            self.transport.resume_reading()


async def serve_protocol(listen: int, upstream: int) -> None:
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()
    server = await loop.create_server(
        lambda: _ClientLeg(upstream, tasks), HOST, listen, reuse_port=True, backlog=4096
    )
    await server.serve_forever()


class _Pump:
    """One direction of a spliced connection: src socket → pipe → dst socket."""

    def __init__(self, conn: _Spliced, src: socket.socket, dst: socket.socket) -> None:
        self.conn = conn
        self.src, self.dst = src.fileno(), dst.fileno()
        self.dst_sock = dst
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.piped = 0
        self.eof = False
        self.waiting = False  # the writer is registered: dst is full

    def start(self) -> None:
        self.conn.loop.add_reader(self.src, self.readable)

    def readable(self) -> None:
        try:
            n = os.splice(self.src, self.w, CHUNK, flags=_SPLICE_FLAGS)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.conn.close()
            return
        if n == 0:
            self.eof = True
            self.conn.loop.remove_reader(self.src)
        self.piped += n
        self.drain()

    def drain(self) -> None:
        while self.piped:
            try:
                self.piped -= os.splice(self.r, self.dst, self.piped, flags=_SPLICE_FLAGS)
            except (BlockingIOError, InterruptedError):
                if not self.waiting:  # dst is full: stop reading until it takes more
                    self.waiting = True
                    self.conn.loop.remove_reader(self.src)
                    self.conn.loop.add_writer(self.dst, self.drain)
                return
            except OSError:
                self.conn.close()
                return
        if self.waiting:
            self.waiting = False
            self.conn.loop.remove_writer(self.dst)
            if not self.eof:
                self.conn.loop.add_reader(self.src, self.readable)
        if self.eof:
            self.conn.ended(self)

    def close(self) -> None:
        loop = self.conn.loop
        loop.remove_reader(self.src)
        if self.waiting:
            loop.remove_writer(self.dst)
        os.close(self.r)
        os.close(self.w)


class _Spliced:
    """A spliced connection: two pumps, closed when both directions have ended."""

    def __init__(self, loop: asyncio.AbstractEventLoop, a: socket.socket, b: socket.socket) -> None:
        self.loop = loop
        self.socks = (a, b)
        self.pumps = (_Pump(self, a, b), _Pump(self, b, a))
        self.done: set[_Pump] = set()
        self.closed = False
        for pump in self.pumps:
            pump.start()

    def ended(self, pump: _Pump) -> None:
        if pump in self.done or self.closed:
            return
        self.done.add(pump)
        try:
            pump.dst_sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close()
            return
        if len(self.done) == 2:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for pump in self.pumps:
            pump.close()
        for sock in self.socks:
            sock.close()


async def serve_splice(listen: int, upstream: int) -> None:
    loop = asyncio.get_running_loop()
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    lsock.bind((HOST, listen))
    lsock.listen(4096)
    lsock.setblocking(False)
    tasks: set[asyncio.Task[None]] = set()

    def accept() -> None:
        for _ in range(64):
            try:
                client, _ = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            client.setblocking(False)
            task = loop.create_task(_splice_one(loop, client, upstream))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    loop.add_reader(lsock.fileno(), accept)
    await loop.create_future()  # until the process is stopped


async def _splice_one(loop: asyncio.AbstractEventLoop, client: socket.socket, port: int) -> None:
    up = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    try:
        await loop.sock_connect(up, (HOST, port))
    except OSError:
        up.close()
        client.close()
        return
    _Spliced(loop, client, up)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["protocol", "splice"])
    parser.add_argument("listen", type=int)
    parser.add_argument("upstream", type=int)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    children = [
        subprocess.Popen(
            [sys.executable, __file__, args.kind, str(args.listen), str(args.upstream)]
        )
        for _ in range(args.workers - 1)
    ]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    import uvloop

    serve = serve_protocol if args.kind == "protocol" else serve_splice
    try:
        uvloop.run(serve(args.listen, args.upstream))
    finally:
        for child in children:
            child.terminate()
            child.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
