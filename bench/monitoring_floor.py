"""The least Python can spend per connection on what SPEC requires beyond the Protocol floor.

bench/floors.py's `py-protocol` forwards and nothing else. SPEC, at the shipped defaults (SPEC
section 3, config/connwatch.yaml), asks for more on every connection. bench/floor_items.py
writes each piece of that work once, in its cheapest honest Python form, as it would sit inline
in a callback the floor already runs, and names the SPEC section that requires it; this script
counts each and prints the sum. The socket and transport calls run on real uvloop transports on
loopback (a fresh connection per object where uvloop caches per transport).

Counted by valgrind's callgrind (bench/instructions.py's `counted` and `control`: counting off
through start-up and imports, then `callgrind_control` by pid): the count is zeroed just before
each measured loop and dumped just after it. (Switching instrumentation on and off around every
loop instead left dumps with wrapped negative counts here; zeroing does not.) Every item runs
over N and 2N connection objects, after an uncounted warm-up, and so does an empty loop; an
item's instructions per connection are ((item(2N) - item(N)) - (empty(2N) - empty(N))) / N: the
hand-shake with this process, the loop and the call of the item's function cancel out.

    python bench/monitoring_floor.py                 # a table: each item, its SPEC section, the sum
    python bench/monitoring_floor.py --json out.json --conns 2000

Needs valgrind (Debian package `valgrind`). About 40 s at the default N (1,000).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.floor_items import EMPTY, ITEMS, ON_TRANSPORTS, Listener, empty, make_conns
from bench.instructions import control, counted
from bench.procs import raise_nofile

_WARM_UP = 100  # objects each item runs on first, uncounted (announced as 0 objects)
_SUMMARY = re.compile(rb"^summary: (\d+)", re.MULTILINE)


# -- the measured process (under callgrind) ------------------------------------------------------
def _say(text: str) -> None:
    os.write(1, text.encode() + b"\n")


def _hear(expected: bytes) -> None:
    got = os.read(0, 64).strip()
    if got != expected:
        raise SystemExit(f"monitoring_floor child: expected {expected!r}, got {got!r}")


async def _child(conns: int, log_path: str) -> None:
    """Each item warmed, then run on N and 2N objects, the parent zeroing the count before and
    dumping it after. Items on transports get one fresh loopback connection per object."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0, backlog=4096)
    port = server.sockets[0].getsockname()[1]
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    lsn = Listener(fd)
    _say("start")
    _hear(b"go")
    for name, _section, item, _summed in [(EMPTY, "", empty, False), *ITEMS]:
        # A warm-up first (first-use caches), announced as 0 objects: not kept.
        for n, announced in ((_WARM_UP, 0), (conns, conns), (2 * conns, 2 * conns)):
            objects = make_conns(n)
            if item in ON_TRANSPORTS:
                for c in objects:
                    c.transport, _ = await loop.create_connection(
                        asyncio.Protocol, "127.0.0.1", port
                    )
            gc.collect()  # each loop starts from the same heap: no collection left over
            _say(f"ready {announced} {name}")
            _hear(b"go")
            item(lsn, objects)
            _say("done")
            _hear(b"go")
            for c in objects:
                if c.transport is not None:
                    c.transport.close()
            await asyncio.sleep(0.05)  # the closes complete
    _say("end")
    server.close()
    os.close(fd)


def child_main(conns: int, log_path: str) -> int:
    import uvloop

    uvloop.run(_child(conns, log_path))
    return 0


# -- the parent: valgrind, switching, reading the dumps -------------------------------------------
def measure(conns: int) -> dict[str, dict[int, int]]:
    """Instructions of each item's loop at `conns` and 2 x `conns` objects, by item name."""
    segments: dict[str, dict[int, int]] = {}
    with tempfile.TemporaryDirectory(prefix="monitoring-floor-") as tmp:
        where = Path(tmp)
        argv = [sys.executable, str(Path(__file__).resolve()), "--child", "--conns", str(conns)]
        argv += ["--log", str(where / "lines.log")]
        proc = subprocess.Popen(  # 2N loopback connections open at once: the limit raised
            counted(argv, where),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            preexec_fn=raise_nofile,
        )
        assert proc.stdin is not None
        assert proc.stdout is not None
        try:  # the parent's side of the hand-shake: `start`, then `ready`/`done` per loop
            for raw in proc.stdout:
                words = raw.decode().strip().split(" ", 2)
                if words[0] == "start":  # once: switching on and off per segment left counts
                    control(proc.pid, "-i", "on")  # wrapped negative; zeroing does not
                elif words[0] == "ready":
                    n, name = int(words[1]), words[2]
                    control(proc.pid, "-z")
                elif words[0] == "done":
                    control(proc.pid, "-d")
                    if n:  # 0: a warm-up
                        segments.setdefault(name, {})[n] = _last_dump(where)
                elif words[0] == "end":
                    break
                else:
                    raise SystemExit(f"monitoring_floor: unexpected {raw!r}")
                proc.stdin.write(b"go\n")
                proc.stdin.flush()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        proc.stdin.close()
        if proc.wait(timeout=120) != 0:
            raise SystemExit(f"the measured process exited {proc.returncode}")
    return segments


def _last_dump(where: Path) -> int:
    """The count in the newest dump (`callgrind.PID.PART`): what ran since the last zeroing."""
    newest = max(where.glob("callgrind.*.*"), key=lambda path: int(path.suffix[1:]))
    count = dumped_instructions_of(newest)
    if count is None:
        raise SystemExit(f"{newest.name}: no usable count (wrapped); run again")
    return count


def dumped_instructions_of(path: Path) -> int | None:
    """The `summary:` of one dump file; None when it wrapped below zero."""
    found = _SUMMARY.search(path.read_bytes())
    if found is None or int(found.group(1)) >= 2**63:
        return None
    return int(found.group(1))


def per_connection(segments: dict[str, dict[int, int]], conns: int) -> dict[str, float]:
    """((item(2N) - item(N)) - (empty(2N) - empty(N))) / N for every item."""
    base = segments[EMPTY][2 * conns] - segments[EMPTY][conns]
    return {
        name: (counts[2 * conns] - counts[conns] - base) / conns
        for name, counts in segments.items()
        if name != EMPTY
    }


def report(costs: dict[str, float], floor_k: float, connwatch_k: float) -> dict[str, Any]:
    """Print the table; return the JSON document's body."""
    print("| item | SPEC | instructions / connection |")
    print("| --- | --- | --- |")
    total = 0.0
    for name, section, _item, summed in ITEMS:
        cost = costs[name]
        total += cost if summed else 0.0
        print(f"| {name} | {section} | {cost:,.0f} |")
    print(f"| **sum of the required items** | | **{total:,.0f}** |")
    least = floor_k * 1e3 + total
    print(
        f"\nProtocol floor {floor_k:.1f}k + {total / 1e3:.1f}k = {least / 1e3:.1f}k per connection "
        f"({least / (floor_k * 1e3):.2f}x the floor); connwatch {connwatch_k:.1f}k "
        f"({connwatch_k * 1e3 - least:,.0f} above this least)."
    )
    return {
        "items": [
            {"name": n, "spec": s, "instructions_per_conn": costs[n], "summed": summed}
            for n, s, _i, summed in ITEMS
        ],
        "sum": total,
        "floor_k": floor_k,
        "connwatch_k": connwatch_k,
        "least_k": least / 1e3,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/monitoring_floor.py", description=__doc__.splitlines()[0]
    )
    p.add_argument("--conns", type=int, default=1000, help="N: each item runs on N and 2N")
    p.add_argument("--floor-k", type=float, default=92.4, help="Protocol floor, k instructions")
    p.add_argument("--connwatch-k", type=float, default=184.0, help="connwatch, k instructions")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--log", default=os.devnull, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args.conns, args.log)
    segments = measure(args.conns)
    doc = report(per_connection(segments, args.conns), args.floor_k, args.connwatch_k)
    if args.json:
        doc["segments"] = {
            name: {str(n): c for n, c in by.items()} for name, by in segments.items()
        }
        doc["conns"] = args.conns
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
