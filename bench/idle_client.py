"""Hold N idle connections: open each, do one PING/+PONG (proving the path to the upstream
works), then keep it open and silent until stdin closes or --hold seconds pass.

Prints one JSON line once all are open (or failed): {"open", "failed", "elapsed_s",
"error_kinds"}. The harness starts two of these so that no process needs more than ~4,000
sockets of the 20,000 open-files limit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import socket
import sys
import time

REQUEST = b"PING\r\n"


async def open_one(port: int, ping: bool, timeout: float) -> socket.socket:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), timeout)
        if ping:
            await asyncio.wait_for(loop.sock_sendall(sock, REQUEST), timeout)
            reply = await asyncio.wait_for(loop.sock_recv(sock, 64), timeout)
            if not reply.startswith(b"+"):
                raise ConnectionError(f"unexpected reply {reply[:20]!r}")
    except BaseException:
        sock.close()
        raise
    return sock


async def open_all(args: argparse.Namespace) -> tuple[list[socket.socket], dict[str, int]]:
    gate = asyncio.Semaphore(args.concurrency)
    socks: list[socket.socket] = []
    errors: dict[str, int] = {}

    async def guarded() -> None:
        async with gate:
            try:
                socks.append(await open_one(args.port, not args.no_ping, args.timeout))
            except (OSError, TimeoutError) as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1

    await asyncio.gather(*(guarded() for _ in range(args.count)))
    return socks, errors


async def wait_stdin_eof(hold: float) -> None:
    """Return when the harness closes our stdin (or after `hold` seconds at most)."""
    loop = asyncio.get_running_loop()
    closed = asyncio.Event()

    class EofProtocol(asyncio.Protocol):
        def eof_received(self) -> bool | None:
            closed.set()
            return None

        def connection_lost(self, exc: Exception | None) -> None:
            closed.set()

    transport, _ = await loop.connect_read_pipe(EofProtocol, sys.stdin)
    try:
        await asyncio.wait_for(closed.wait(), hold)
    except TimeoutError:
        pass
    finally:
        transport.close()


async def run(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    socks, errors = await open_all(args)
    report = {
        "open": len(socks),
        "failed": sum(errors.values()),
        "elapsed_s": time.perf_counter() - started,
        "error_kinds": errors,
    }
    print(json.dumps(report), flush=True)
    await wait_stdin_eof(args.hold)
    for sock in socks:
        sock.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--hold", type=float, default=600.0)
    parser.add_argument("--no-ping", action="store_true", help="connect only, send nothing")
    args = parser.parse_args(argv)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
