"""What every scenario shares: the run context, starting a peer fresh, running a load tool,
holding idle connections, and the rotation of subjects within a round."""

from __future__ import annotations

import contextlib
import http.client
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.parsers import ParseError, parse_json_line
from bench.peers import ConnwatchOptions, Peer
from bench.procs import Child, free_port, raise_nofile, spawn, stop, wait_listening
from bench.report import Results, Sample
from bench.upstreams import StartError, redis_clients

BENCH_DIR = Path(__file__).resolve().parent
DIRECT = "direct"


class SampleError(RuntimeError):
    """One measurement failed; the round goes on with the next subject."""


@dataclass(frozen=True)
class Target:
    """A subject under test: a peer plus, for connwatch, its options."""

    name: str
    label: str
    peer: Peer
    opts: ConnwatchOptions = field(default_factory=ConnwatchOptions)

    def with_overrides(self, name: str, label: str, extra: dict[str, Any]) -> Target:
        merged = {**self.opts.overrides, **extra}
        return Target(name, label, self.peer, ConnwatchOptions(self.opts.workers, merged))


@dataclass
class Running:
    target: Target
    child: Child
    port: int
    admin_port: int | None

    @property
    def pid(self) -> int:
        return self.child.pid


@dataclass
class Context:
    workdir: Path
    targets: list[Target]
    rounds: int
    duration: float
    idle_conns: int
    window: float
    scrape_repeats: int
    churn_max: int
    log: Callable[[str], None] = field(default=lambda msg: print(msg, file=sys.stderr))
    _seq: int = 0

    def subdir(self, *parts: str) -> Path:
        self._seq += 1
        path = self.workdir.joinpath(*parts, f"{self._seq:03d}")
        path.mkdir(parents=True, exist_ok=True)
        return path


def start_target(ctx: Context, target: Target, upstream: int, where: Path) -> Running:
    """Start a fresh instance of the target in front of `upstream`; retry on a port race."""
    binary = target.peer.find()
    if binary is None:
        raise StartError("not installed")
    why = ""
    for attempt in range(3):
        port = free_port()
        launch = target.peer.write(binary, where, port, upstream, target.opts)
        child = spawn(f"{target.peer.name}-{attempt}", launch.argv, where)
        timeout = target.peer.startup_timeout
        why = wait_listening(child, launch.ready_ports, timeout, launch.ready_line) or ""
        if not why:
            time.sleep(0.2)  # a port we saw listening could be someone else's: still alive?
            if child.alive():
                # The PID is what a profiler attaches to (py-spy record --pid, see README).
                ctx.log(f"  {target.name}: pid {child.pid} on 127.0.0.1:{port}, files in {where}")
                return Running(target, child, port, launch.admin_port)
            why = f"exited with code {child.popen.returncode}: {child.tail()}"
        stop(child)
        if "in use" not in why.lower():
            break
    raise StartError(f"failed to start: {why}")


def run_tool(argv: Sequence[str], timeout: float) -> str:
    """Run a load tool to completion (bounded by `timeout`) and return its stdout."""
    try:
        done = subprocess.run(
            list(argv),
            capture_output=True,
            timeout=timeout,
            preexec_fn=raise_nofile,  # single-threaded harness
            start_new_session=True,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise SampleError(f"{Path(argv[0]).name} timed out after {timeout:.0f}s") from exc
    out = done.stdout.decode(errors="replace")
    if done.returncode != 0 and not out.strip():
        err = done.stderr.decode(errors="replace").strip().splitlines()[-3:]
        raise SampleError(f"{Path(argv[0]).name} exit {done.returncode}: {' | '.join(err)}")
    return out


def rotation(names: list[str], round_index: int) -> list[str]:
    """Each round starts one later, so no subject always runs first or last (drift, heat)."""
    k = round_index % len(names) if names else 0
    return names[k:] + names[:k]


def python_script(name: str) -> list[str]:
    return [sys.executable, str(BENCH_DIR / name)]


@contextlib.contextmanager
def hold_idle(port: int, count: int, where: Path, timeout: float = 120.0) -> Iterator[int]:
    """Open `count` idle connections to port from two client processes; yield how many opened.

    Two processes keep each under the 20,000 open-files limit at 8,000+ connections.
    """
    halves = [count - count // 2, count // 2] if count > 1 else [count]
    clients: list[Child] = []
    try:
        for i, n in enumerate(h for h in halves if h > 0):
            argv = [
                *python_script("idle_client.py"),
                "--port",
                str(port),
                "--count",
                str(n),
                "--hold",
                str(timeout + 600),
            ]
            clients.append(spawn(f"idle-client-{i}", argv, where, stdin=subprocess.PIPE))
        yield sum(_await_report(c, timeout)["open"] for c in clients)
    finally:
        for c in clients:
            if c.popen.stdin is not None:
                with contextlib.suppress(OSError):
                    c.popen.stdin.close()  # the client closes its sockets and exits
        for c in clients:
            with contextlib.suppress(subprocess.TimeoutExpired):
                c.popen.wait(timeout=30)
            stop(c)


def _await_report(client: Child, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ParseError, OSError):
            return parse_json_line(client.stdout_path.read_text())
        if not client.alive():
            raise SampleError(f"idle client exited: {client.tail()}")
        time.sleep(0.1)
    raise SampleError(f"idle client did not report within {timeout:.0f}s")


def wait_upstream(redis_port: int, expected: int, baseline: int, timeout: float = 30.0) -> int:
    """Poll redis until it holds `expected` more clients than `baseline`; return how many."""
    deadline = time.monotonic() + timeout
    seen = 0
    while time.monotonic() < deadline:
        seen = redis_clients(redis_port) - baseline
        if seen >= expected:
            return seen
        time.sleep(0.25)
    return seen


def http_get(port: int, path: str, timeout: float = 30.0) -> tuple[int, bytes, float]:
    """(status, body, seconds) of a GET to the admin endpoint on loopback."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        started = time.perf_counter()
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, body, time.perf_counter() - started
    finally:
        conn.close()


def record(
    ctx: Context,
    results: Results,
    name: str,
    measure: Callable[[], tuple[Sample, list[str]]],
) -> None:
    """Run one measurement; a failure is noted against the subject and the round goes on."""
    try:
        sample, problems = measure()
    except (StartError, SampleError, ParseError, OSError) as exc:
        results.fail(name, str(exc))
        ctx.log(f"  {name}: FAILED {exc}")
        return
    for why in problems:
        results.fail(name, why)
        ctx.log(f"  {name}: partial: {why}")
    if sample:
        results.add(name, sample)
        keys = sorted(sample)
        if len(keys) > 8:  # rr has dozens: show the throughput and CPU ones
            keys = [k for k in keys if k.endswith("PING_INLINE.rps") or "cpu" in k]
        shown = ", ".join(f"{k}={sample[k]:.3g}" for k in keys)
        ctx.log(f"  {name}: {shown}")
