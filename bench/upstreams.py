"""The upstreams behind the proxies: redis-server and an iperf3 server, on loopback ports."""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path

from bench.parsers import parse_redis_info
from bench.procs import Child, free_port, spawn, stop, wait_listening


class StartError(RuntimeError):
    """A process did not come up; the message says why (its exit code and last lines)."""


def start_listening(
    name: str, argv_for: list[str], port: int, workdir: Path, timeout: float
) -> Child:
    child = spawn(name, argv_for, workdir)
    why = wait_listening(child, [port], timeout)
    if why is not None:
        stop(child)
        raise StartError(f"{name} {why}")
    return child


def start_redis(workdir: Path, attempts: int = 3) -> tuple[Child, int]:
    """redis-server with no persistence and room for 10,000 clients."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise StartError("redis-server not found on PATH")
    last = ""
    for _ in range(attempts):
        port = free_port()
        argv = [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--maxclients",
            "10000",
            "--protected-mode",
            "no",
            "--daemonize",
            "no",
            "--tcp-backlog",
            "4096",
            "--dir",
            str(workdir),
        ]
        try:
            return start_listening("redis", argv, port, workdir, 10.0), port
        except StartError as exc:  # most likely the free port was taken meanwhile
            last = str(exc)
    raise StartError(last)


def start_iperf3(workdir: Path, attempts: int = 3) -> tuple[Child, int]:
    binary = shutil.which("iperf3")
    if binary is None:
        raise StartError("iperf3 not found on PATH")
    last = ""
    for _ in range(attempts):
        port = free_port()
        argv = [binary, "-s", "-B", "127.0.0.1", "-p", str(port)]
        try:
            return start_listening("iperf3-server", argv, port, workdir, 10.0), port
        except StartError as exc:
            last = str(exc)
    raise StartError(last)


def redis_info(port: int, section: str = "clients", timeout: float = 5.0) -> dict[str, str]:
    """INFO <section> over a fresh loopback connection (inline command, bulk reply)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(f"INFO {section}\r\n".encode())
        buf = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
            head, sep, _ = buf.partition(b"\r\n")
            if sep and head.startswith(b"$") and len(buf) >= len(head) + 2 + int(head[1:]):
                break
        _, _, body = buf.partition(b"\r\n")
        return parse_redis_info(body.decode(errors="replace"))


def redis_clients(port: int) -> int:
    """Clients connected to redis, not counting the connection asking."""
    return int(redis_info(port).get("connected_clients", "1")) - 1
