"""`python bench/run.py [scenario ...] [options]`: run scenarios, print tables, write JSON."""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import chart, docread
from bench.peers import (
    CONNWATCH_VARIANTS,
    DEFAULT_PEERS,
    PEERS,
    ConnwatchOptions,
    find_envoy,
    parse_value,
    parse_variant,
)
from bench.report import Results, Table, render
from bench.runner import Context, Target
from bench.scenarios_idle import (
    IDLE_TABLES,
    SCRAPE_TABLES,
    heartbeat_tables,
    run_heartbeat,
    run_idle,
    run_scrape,
)
from bench.scenarios_load import BULK_TABLES, CHURN_TABLES, RR_TABLES, run_bulk, run_churn, run_rr
from bench.scenarios_pool import POOL_TABLES, run_pool
from bench.targets import render as render_targets

Runner = Callable[[Context], Results]
TablesFor = Callable[[Context], list[Table]]

SCENARIOS: dict[str, tuple[Runner, TablesFor]] = {
    "bulk": (run_bulk, lambda _c: BULK_TABLES),
    "rr": (run_rr, lambda _c: RR_TABLES),
    "churn": (run_churn, lambda _c: CHURN_TABLES),
    "idle": (run_idle, lambda _c: IDLE_TABLES),
    "heartbeat": (run_heartbeat, heartbeat_tables),
    "scrape": (run_scrape, lambda _c: SCRAPE_TABLES),
    "pool": (run_pool, lambda _c: POOL_TABLES),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/run.py",
        description="Side-by-side benchmark of connwatch against HAProxy, nginx, Envoy, socat "
        "and pproxy on loopback. See bench/README.md.",
    )
    p.add_argument(
        "scenarios",
        nargs="*",
        metavar="scenario",
        help=f"any of {', '.join(SCENARIOS)} (default: all)",
    )
    p.add_argument(
        "--proxies",
        default=",".join(DEFAULT_PEERS),
        help=f"comma list of {', '.join(PEERS)} and connwatch[VARIANT] (default: %(default)s)",
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=5.0, help="seconds per load run")
    p.add_argument("--json", type=Path, help="write all samples and summaries here")
    p.add_argument(
        "--chart", type=Path, help="write a PNG chart of the ratios here (needs matplotlib)"
    )
    p.add_argument(
        "--instructions",
        type=Path,
        help="merge this bench/instructions.py --json output into the targets table and chart",
    )
    p.add_argument("--connwatch-workers", type=int, default=1)
    p.add_argument(
        "--connwatch-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override in connwatch's YAML by dotted path, e.g. "
        "listeners.0.buffer_size=64KiB (repeatable)",
    )
    p.add_argument(
        "--connwatch-variant",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE[;KEY=VALUE]",
        help="add peer connwatch[NAME] with these overrides (repeatable)",
    )
    p.add_argument("--idle-conns", type=int, default=8000)
    p.add_argument(
        "--window", type=float, default=20.0, help="heartbeat: CPU measuring window in seconds"
    )
    p.add_argument("--scrape-repeats", type=int, default=7)
    p.add_argument("--churn-max", type=int, default=25000, help="churn: most connections per run")
    p.add_argument("--keep", action="store_true", help="keep the temp dir with configs/logs")
    args = p.parse_args(argv)
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario(s) {unknown}; choose from {list(SCENARIOS)}")
    if args.rounds < 1 or args.duration <= 0 or args.idle_conns < 1:
        p.error("--rounds, --duration and --idle-conns must be positive")
    if args.chart and importlib.util.find_spec("matplotlib") is None:  # before any load runs
        p.error("--chart needs matplotlib: pip install -e '.[bench]'")
    if args.instructions and not args.instructions.is_file():
        p.error(f"--instructions: no file {args.instructions}")
    return args


def build_targets(args: argparse.Namespace) -> list[Target]:
    base = dict(item.split("=", 1) for item in args.connwatch_set)
    opts = ConnwatchOptions(
        args.connwatch_workers, {k.strip(): parse_value(v.strip()) for k, v in base.items()}
    )
    variants = dict(CONNWATCH_VARIANTS)
    variants.update(parse_variant(v) for v in args.connwatch_variant)
    names = [n.strip() for n in args.proxies.split(",") if n.strip()]
    names += [f"connwatch[{v}]" for v in variants if f"connwatch[{v}]" not in names]
    targets = []
    for name in names:
        base_name, _, variant = name.partition("[")
        variant = variant.rstrip("]")
        peer = PEERS.get(base_name)
        if peer is None:
            raise SystemExit(f"unknown proxy {name!r}; choose from {list(PEERS)}")
        target = Target(name, peer.label, peer, opts if peer.connwatch else ConnwatchOptions())
        if variant:
            if not peer.connwatch or variant not in variants:
                raise SystemExit(f"unknown variant {name!r} (define it with --connwatch-variant)")
            target = target.with_overrides(name, f"{peer.label} [{variant}]", variants[variant])
        if peer.connwatch and args.connwatch_workers > 1:
            target = Target(
                target.name,
                f"{target.label}, {args.connwatch_workers} workers",
                target.peer,
                target.opts,
            )
        targets.append(target)
    return targets


def _version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({type(exc).__name__})"
    text = (done.stdout + done.stderr).decode(errors="replace").strip().splitlines()
    return text[0].strip() if text else f"exit {done.returncode}"


def versions() -> dict[str, str]:
    """One line per tool, for the JSON's meta; a missing tool says so."""
    found: dict[str, str] = {}
    probes: dict[str, list[str]] = {
        "haproxy": ["haproxy", "-v"],
        "nginx": ["nginx", "-v"],
        "socat": ["socat", "-V"],
        "pproxy": ["pproxy", "--version"],
        "iperf3": ["iperf3", "--version"],
        "redis-server": ["redis-server", "--version"],
        "redis-benchmark": ["redis-benchmark", "--version"],
    }
    for name, argv in probes.items():
        path = shutil.which(argv[0])
        found[name] = _version([path, *argv[1:]]) if path else "not installed"
    envoy = find_envoy()
    found["envoy"] = _version([envoy, "--version"]) if envoy else "not installed"
    found["connwatch"] = _version([sys.executable, "-m", "connwatch", "--version"])
    if found["socat"].startswith("socat by"):  # first line is the authors; the version is next
        found["socat"] = _version_line(["socat", "-V"], "socat version")
    return found


def _version_line(argv: list[str], prefix: str) -> str:
    done = subprocess.run(argv, capture_output=True, timeout=20, check=False)
    for line in done.stdout.decode(errors="replace").splitlines():
        if line.startswith(prefix):
            return line.strip()
    return "unknown"


def meta(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "argv": sys.argv,
        "python": sys.version.split()[0],
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
        "versions": versions(),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    targets = build_targets(args)
    workdir = Path(tempfile.mkdtemp(prefix="connwatch-bench-"))
    ctx = Context(
        workdir,
        targets,
        args.rounds,
        args.duration,
        args.idle_conns,
        args.window,
        args.scrape_repeats,
        args.churn_max,
    )
    if args.json:  # before any load runs: a missing folder must not cost a finished scenario
        args.json.parent.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"meta": meta(args), "scenarios": {}}
    if args.instructions:
        docread.merge_instructions(doc, json.loads(args.instructions.read_text()))
    refs = ["direct", "haproxy"]
    try:
        for name in args.scenarios or list(SCENARIOS):
            run, tables_for = SCENARIOS[name]
            results = run(ctx)
            tables = tables_for(ctx)
            for table in tables:
                print(render(results, table), end="\n\n", flush=True)
            for note in results.notes:
                print(f"- {note}", flush=True)
            print(flush=True)
            scenario_refs = refs + [r for t in tables for r in t.refs if r not in refs]
            doc["scenarios"][name] = results.to_json(scenario_refs)
            if args.json:  # written after each scenario, so an interrupted run keeps its part
                args.json.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        print(render_targets(doc), end="\n\n", flush=True)
        if args.chart:
            drawn = chart.draw(doc, args.chart)
            print(f"chart: {args.chart} ({drawn} panels)" if drawn else "chart: nothing to draw")
    finally:
        if args.keep:
            print(f"configs and logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0
