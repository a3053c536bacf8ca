"""User-space instructions per connection and per request, counted by valgrind's callgrind.

Timings on a shared 2-core machine swing ±15 % run to run; instruction counts of the same code
and load repeat to within ~1 %, whatever else the machine does. This is the tool for an A/B of
a change to the per-connection or per-request path (kernel work is not counted: syscalls cost
the same for every proxy, see `strace -c`).

Each subject runs under `valgrind --tool=callgrind` with counting off; after a warm-up (imports,
first-use caches) counting is switched on for exactly the measured load, then dumped:

- `churn`: `--conns` connections, each connect + PING + reply + close (bench/churn_client.py);
- `rr`: `--requests` PING_INLINE requests over 50 connections (redis-benchmark).

    python bench/instructions.py --proxies py-protocol,connwatch
    python bench/instructions.py --proxies connwatch --connwatch-src /tmp/old/src   # A/B
    python bench/instructions.py --proxies 'connwatch[splice]' \\
        --connwatch-variant 'splice:listeners.0.data_path=splice'

Needs valgrind (Debian package `valgrind`) besides what bench/run.py needs. Slow: ~15 s a
subject at the defaults.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cli import build_targets
from bench.procs import Child, free_port, spawn, stop, wait_listening
from bench.runner import Target, python_script
from bench.upstreams import start_redis

WARMUP_CONNS = 50
_TOTALS = re.compile(rb"^(?:summary|totals): (\d+)", re.MULTILINE)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/instructions.py", description=__doc__.splitlines()[0])
    p.add_argument("--proxies", default="py-protocol,connwatch", help="comma list of peers")
    p.add_argument(
        "--connwatch-variant",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE[;KEY=VALUE]",
        help="define connwatch[NAME], as in bench/run.py (repeatable)",
    )
    p.add_argument(
        "--connwatch-src", type=Path, help="import connwatch from this src/ (A/B of a checkout)"
    )
    p.add_argument("--conns", type=int, default=1000, help="churn: connections counted")
    p.add_argument("--requests", type=int, default=20000, help="rr: requests counted")
    p.add_argument(
        "--json", type=Path, help="also write the counts here (bench/run.py --instructions)"
    )
    return p.parse_args(argv)


def counted(argv: list[str], where: Path) -> list[str]:
    """argv under callgrind, counting off until switched on; children followed (workers)."""
    return [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        "--trace-children=yes",
        f"--callgrind-out-file={where}/callgrind.%p",
        *argv,
    ]


def control(root_pid: int, *args: str) -> None:
    """callgrind_control for every callgrind run of ours (the subject and its workers), by pid:
    without one it would switch every callgrind run on the machine, another user's too, and
    their counts would end up in our dumps."""
    for pid in _process_tree(root_pid):
        subprocess.run(
            ["callgrind_control", *args, str(pid)], capture_output=True, timeout=60, check=False
        )


def _process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (Linux /proc)."""
    found, todo = [], [pid]
    while todo:
        here = todo.pop()
        found.append(here)
        try:
            tasks = os.listdir(f"/proc/{here}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{here}/task/{task}/children") as children:
                    todo.extend(int(child) for child in children.read().split())
            except OSError:
                continue
    return found


_WRAPPED = 2**63  # callgrind's 64-bit event count read back unsigned: it went negative
_ATTEMPTS = 3


def dumped_instructions(where: Path) -> int | None:
    """Instructions in the dumps made by `callgrind_control -d` (files named callgrind.PID.N);
    None when a dump holds a wrapped-around (negative) total — what we saw when another
    callgrind run on the machine was switched by a pid-less `callgrind_control` (now scoped to
    our subject's tree); kept as a guard: measure again."""
    total = 0
    for path in where.glob("callgrind.*.*"):
        found = _TOTALS.search(path.read_bytes())
        if found:
            count = int(found.group(1))
            if count >= _WRAPPED:
                return None
            total += count
    return total


def churn(port: int, conns: int, concurrency: int) -> None:
    argv = python_script("churn_client.py")
    argv += ["--port", str(port), "--concurrency", str(concurrency)]
    argv += ["--max-conns", str(conns), "--duration", "900"]
    subprocess.run(argv, capture_output=True, timeout=960, check=True)


def rr(port: int, requests: int) -> None:
    argv = ["redis-benchmark", "-p", str(port), "-c", "50", "-n", str(requests)]
    done = subprocess.run([*argv, "-t", "ping_inline", "-q"], capture_output=True, timeout=960)
    if done.returncode != 0:  # say why: redis-benchmark's own words, not just its exit status
        said = (done.stderr or done.stdout[-300:]).decode(errors="replace").strip()
        raise SystemExit(f"redis-benchmark exited {done.returncode}: {said}")


def measure(target: Target, args: argparse.Namespace, root: Path) -> list[int]:
    """Instructions for the churn load, then for the rr load, each on a fresh subject."""
    binary = target.peer.find()
    if binary is None:
        raise SystemExit(f"{target.name}: not installed")
    env = dict(os.environ)
    if target.peer.connwatch and args.connwatch_src is not None:
        env["PYTHONPATH"] = str(args.connwatch_src.resolve())
    counts = []
    for load in ("churn", "rr"):
        for _attempt in range(_ATTEMPTS):
            count = _measure_once(target, binary, args, root, env, load)
            if count is not None:
                counts.append(count)
                break
            print(
                f"  {target.name} {load}: callgrind wrote a wrapped count, again", file=sys.stderr
            )
        else:
            raise SystemExit(f"{target.name} {load}: no valid count in {_ATTEMPTS} runs")
    return counts


def _measure_once(
    target: Target,
    binary: str,
    args: argparse.Namespace,
    root: Path,
    env: dict[str, str],
    load: str,
) -> int | None:
    """One fresh subject counted under one load; None when callgrind's dump is unusable."""
    name, peer = target.name, target.peer
    where = Path(tempfile.mkdtemp(prefix=f"{peer.name}-{load}-", dir=root))  # one per subject
    redis, redis_port = start_redis(where)
    subject: Child | None = None
    try:
        port = free_port()
        launch = peer.write(binary, where, port, redis_port, target.opts)
        subject = spawn(name, counted(launch.argv, where), where, env=env)
        why = wait_listening(subject, launch.ready_ports, 120.0, launch.ready_line)
        if why:
            raise SystemExit(f"{name}: failed to start under valgrind: {why}")
        churn(port, WARMUP_CONNS, 10)  # imports and first-use caches are not counted
        control(subject.pid, "-i", "on")
        started = time.monotonic()
        if load == "churn":
            churn(port, args.conns, 10)
        else:
            rr(port, args.requests)
        control(subject.pid, "-d")
        control(subject.pid, "-i", "off")
        print(f"  {name} {load}: {time.monotonic() - started:.0f} s", file=sys.stderr)
        return dumped_instructions(where)
    finally:
        if subject is not None:
            stop(subject, grace=20.0)
        stop(redis)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in ("valgrind", "callgrind_control", "redis-server", "redis-benchmark"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found on PATH")
    # The subjects as bench/run.py names them (peers, connwatch[VARIANT]).
    targets = build_targets(
        argparse.Namespace(
            proxies=args.proxies,
            connwatch_variant=args.connwatch_variant,
            connwatch_set=[],
            connwatch_workers=1,
        )
    )
    print("| subject | k instructions / connection (churn) | k instructions / request (rr) |")
    print("| --- | --- | --- |")
    doc = json_meta(args)
    with tempfile.TemporaryDirectory(prefix="connwatch-instr-") as tmp:
        for target in targets:
            per_conn, per_req = measure(target, args, Path(tmp))
            conn, req = per_conn / args.conns, per_req / args.requests
            print(f"| {target.name} | {conn / 1e3:.1f} | {req / 1e3:.2f} |", flush=True)
            doc["subjects"][target.name] = {
                "label": target.label,
                "instructions_per_conn": conn,
                "instructions_per_request": req,
            }
            if args.json:  # after each subject, so an interrupted run keeps its part
                args.json.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


def json_meta(args: argparse.Namespace) -> dict[str, Any]:
    """The document's head; its options name the variants as bench/run.py's meta does, so
    bench/docread.py finds the splice subject the same way in both."""
    options = {
        "proxies": args.proxies,
        "connwatch_variant": args.connwatch_variant,
        "connwatch_set": [],
        "connwatch_workers": 1,
        "connwatch_src": str(args.connwatch_src) if args.connwatch_src else None,
        "conns": args.conns,
        "requests": args.requests,
    }
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    return {"meta": {"started": started, "argv": sys.argv, "options": options}, "subjects": {}}


if __name__ == "__main__":
    sys.exit(main())
