"""Processes the harness starts: spawn, find their tree, read CPU and RSS, stop by PID.

Every process is started in its own session, so its process group is ours alone; stopping
signals that group and nothing else.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.parsers import ParseError, listening_ports, parse_proc_stat

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


def raise_nofile() -> None:
    """preexec_fn: soft open-files limit up to the hard one (20,000 here, not raisable)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port() -> int:
    """A port free right now on 127.0.0.1; callers retry on a bind conflict (it can race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Child:
    """A process we started, with its output files."""

    name: str
    popen: subprocess.Popen[bytes]
    workdir: Path
    stdout_path: Path
    stderr_path: Path
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 6) -> str:
        """Last lines of stderr then stdout, for a 'failed to start' message."""
        out: list[str] = []
        for path in (self.stdout_path, self.stderr_path):  # stderr last: it says why
            with contextlib.suppress(OSError):
                out += path.read_text(errors="replace").strip().splitlines()[-lines:]
        return " | ".join(ln.strip() for ln in out if ln.strip())[-600:]


def spawn(
    name: str,
    argv: Sequence[str],
    workdir: Path,
    *,
    env: dict[str, str] | None = None,
    stdin: int | None = subprocess.DEVNULL,
) -> Child:
    """Start argv in a new session with the open-files limit raised; output goes to files."""
    workdir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = workdir / f"{name}.stdout", workdir / f"{name}.stderr"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        popen = subprocess.Popen(
            list(argv),
            stdin=stdin,
            stdout=out,
            stderr=err,
            cwd=workdir,
            env=env,
            start_new_session=True,
            preexec_fn=raise_nofile,  # single-threaded harness; needed for rlimit
        )
    return Child(name, popen, workdir, out_path, err_path)


def stop(child: Child, grace: float = 5.0) -> None:
    """SIGTERM our child's own process group, then SIGKILL it after `grace` seconds."""
    if child.popen.poll() is not None:
        _kill_group(child.pid, signal.SIGKILL)  # leftovers of a group whose leader exited
        return
    _kill_group(child.pid, signal.SIGTERM)
    try:
        child.popen.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        _kill_group(child.pid, signal.SIGKILL)
        child.popen.wait(timeout=grace)
    _kill_group(child.pid, signal.SIGKILL)


def _kill_group(pgid: int, sig: signal.Signals) -> None:
    # The group id is the PID of the session leader we spawned, so this reaches only its tree.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _all_stats() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, cpu ticks) for every process we can read."""
    stats: dict[int, tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = parse_proc_stat(Path(f"/proc/{entry}/stat").read_text())
        except (OSError, ParseError, ValueError):
            continue  # exited while we looked
        stats[st.pid] = (st.ppid, st.cpu_ticks)
    return stats


def tree(root: int, stats: dict[int, tuple[int, int]] | None = None) -> list[int]:
    """root and all its descendants (workers, forked children)."""
    stats = _all_stats() if stats is None else stats
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            found.append(pid)
            todo += children.get(pid, [])
    return found


def cpu_seconds(root: int) -> float:
    """CPU seconds (user+system, incl. reaped children) of root's whole tree, so far.

    Deltas of this over a run count a child that exited mid-run once: its time moves into
    the parent's cutime/cstime when reaped.
    """
    stats = _all_stats()
    return sum(stats[p][1] for p in tree(root, stats)) / CLK_TCK


def rss_kib(root: int) -> int:
    """Resident memory of root's tree in KiB (shared pages counted in each process)."""
    total = 0
    for pid in tree(root):
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KIB
    return total


def process_count(root: int) -> int:
    return len(tree(root))


def listening(port: int) -> bool:
    """Whether something listens on `port` (any address), without connecting to it."""
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            ports |= listening_ports(Path(table).read_text())
    return port in ports


def wait_listening(
    child: Child, ports: Sequence[int], timeout: float, ready_line: str | None = None
) -> str | None:
    """None once every port listens (and stdout shows `ready_line`, if given); else why not
    (the process died, or timed out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive():
            return f"exited with code {child.popen.returncode}: {child.tail()}"
        if all(listening(p) for p in ports) and _shows(child, ready_line):
            return None
        time.sleep(0.05)
    return f"not ready on {list(ports)} after {timeout:.0f}s: {child.tail()}"


def _shows(child: Child, line: str | None) -> bool:
    if line is None:
        return True
    with contextlib.suppress(OSError):
        return line in child.stdout_path.read_text(errors="replace")
    return False
