"""Connection churn load: C concurrent clients each loop connect + "PING\\r\\n" + reply + close.

Bounded by a total count and a wall-clock limit, whichever comes first. `--greeting`: send
nothing, the upstream speaks first (the time is connect to the greeting); `--interval`: each
client waits this long between connections (with `--concurrency 1`, a latency run at a steady
arrival rate rather than a load test). Prints one JSON line:
{"conns", "errors", "elapsed_s", "conn_per_s", "p50_ms", "p99_ms", "loop"}.
Standalone (stdlib, uvloop if importable) so the harness runs it as its own process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Callable
from typing import Any

REQUEST = b"PING\r\n"
REPLY_END = b"\r\n"


class Churn:
    def __init__(
        self,
        port: int,
        max_conns: int,
        duration: float,
        *,
        greeting: bool = False,
        interval: float = 0.0,
    ) -> None:
        self.port = port
        self.greeting = greeting
        self.interval = interval
        self.remaining = max_conns
        self.deadline = time.monotonic() + duration
        self.latencies: list[float] = []
        self.errors = 0
        self.error_kinds: dict[str, int] = {}

    async def worker(self) -> None:
        while self.remaining > 0 and time.monotonic() < self.deadline:
            self.remaining -= 1  # single-threaded loop: no lock needed
            started = time.perf_counter()
            try:
                await asyncio.wait_for(self.one(), timeout=5.0)
            except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
                self.errors += 1
                kind = type(exc).__name__
                self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1
                continue
            self.latencies.append(time.perf_counter() - started)
            if self.interval:
                await asyncio.sleep(self.interval)

    async def one(self) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            if not self.greeting:
                writer.write(REQUEST)
            line = await reader.readuntil(REPLY_END)
            if not self.greeting and not line.startswith(b"+"):
                raise OSError(f"unexpected reply {line[:20]!r}")
        finally:
            writer.close()
            # A reset after our close is still a completed exchange.
            with contextlib.suppress(OSError):
                await writer.wait_closed()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    churn = Churn(
        args.port, args.max_conns, args.duration, greeting=args.greeting, interval=args.interval
    )
    started = time.perf_counter()
    await asyncio.gather(*(churn.worker() for _ in range(args.concurrency)))
    elapsed = time.perf_counter() - started
    done = len(churn.latencies)
    return {
        "conns": done,
        "errors": churn.errors,
        "error_kinds": churn.error_kinds,
        "elapsed_s": elapsed,
        "conn_per_s": done / elapsed if elapsed > 0 else 0.0,
        "p50_ms": percentile(churn.latencies, 0.50) * 1000,
        "p99_ms": percentile(churn.latencies, 0.99) * 1000,
    }


def loop_runner() -> tuple[str, Callable[..., Any]]:
    try:
        import uvloop
    except ImportError:
        return "asyncio", asyncio.run
    return "uvloop", uvloop.run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--max-conns", type=int, default=20000)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--greeting", action="store_true", help="read the upstream's first line")
    parser.add_argument("--interval", type=float, default=0.0, help="seconds between connections")
    args = parser.parse_args(argv)
    name, runner = loop_runner()
    result = runner(run(args))
    result["loop"] = name
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
