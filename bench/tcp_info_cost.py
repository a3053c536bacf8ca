"""Cost of one TCP_INFO read, in µs per call, on a live loopback connection.

    python bench/tcp_info_cost.py [--calls 100000] [--repeats 5] [--max-seconds 30]

Measures a bare getsockopt, `read_tcp_info()` (full frozen record) and `read_tcp_core()`
(watchdog tuple) through each socket kind the watchdog sees: a plain `socket.socket`, asyncio's
`TransportSocket` and uvloop's pseudo-socket. Reports the best of `--repeats` runs (the least
disturbed by other work on a shared machine). Every run is bounded by `--calls` and the whole
benchmark by `--max-seconds`.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from connwatch._types import SocketLike
from connwatch.liveness.tcp_info import TCP_INFO_SIZE, read_tcp_core, read_tcp_info


def _uvloop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:  # the benchmark still runs without it
        return None
    return uvloop.new_event_loop


class _Deadline(Exception):
    pass


def _time_calls(fn: Callable[[], object], calls: int, deadline: float) -> float:
    """µs per call over `calls` calls, in batches so the deadline is checked as we go."""
    batch = min(calls, 1000)
    done = 0
    start = time.perf_counter()
    while done < calls:
        for _ in range(batch):
            fn()
        done += batch
        if time.monotonic() > deadline:
            raise _Deadline
    return (time.perf_counter() - start) / done * 1e6


def _rows(sock: SocketLike) -> dict[str, Callable[[], object]]:
    tcp, info = socket.IPPROTO_TCP, socket.TCP_INFO
    return {
        "getsockopt(TCP_INFO)": lambda: sock.getsockopt(tcp, info, TCP_INFO_SIZE),
        "read_tcp_info": lambda: read_tcp_info(sock),
        "read_tcp_core": lambda: read_tcp_core(sock),
    }


@contextmanager
def _plain_pair() -> Iterator[SocketLike]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
        with client, server:
            client.sendall(b"x" * 1000)  # some history, so the counters are not all zero
            server.recv(1000)
            yield client


@contextmanager
def _transport_socket(loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> Iterator[Any]:
    """The object `transport.get_extra_info("socket")` gives in that loop, while connected."""
    with asyncio.Runner(loop_factory=loop_factory) as runner:

        async def connect() -> tuple[asyncio.AbstractServer, asyncio.BaseTransport]:
            loop = asyncio.get_running_loop()
            server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            transport, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
            return server, transport

        async def close(server: asyncio.AbstractServer, transport: asyncio.BaseTransport) -> None:
            transport.close()
            server.close()
            await server.wait_closed()

        server, transport = runner.run(connect())
        try:
            yield transport.get_extra_info("socket")
        finally:
            runner.run(close(server, transport))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-seconds", type=float, default=30.0)
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.max_seconds

    kinds: list[tuple[str, Callable[[], Any]]] = [
        ("socket.socket", _plain_pair),
        ("asyncio TransportSocket", lambda: _transport_socket(asyncio.new_event_loop)),
    ]
    uvloop_factory = _uvloop_factory()
    if uvloop_factory is not None:
        kinds.append(("uvloop PseudoSocket", lambda: _transport_socket(uvloop_factory)))

    print(f"µs per call, best of {args.repeats} x {args.calls:,} calls, Python {sys.version[:6]}")
    try:
        for kind, opener in kinds:
            with opener() as sock:
                assert read_tcp_info(sock) is not None, f"no TCP_INFO from {kind}"
                for name, fn in _rows(sock).items():
                    best = min(_time_calls(fn, args.calls, deadline) for _ in range(args.repeats))
                    print(f"  {kind:<24} {name:<22} {best:6.2f}")
    except _Deadline:
        print(f"stopped at --max-seconds {args.max_seconds}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
