"""Scenarios with many idle connections: idle (memory), heartbeat and scrape (connwatch only).

Each sample starts a fresh redis-server and a fresh proxy, opens N idle connections through
it from two client processes, and checks that redis really holds N before measuring.
"""

from __future__ import annotations

import functools
import json
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.parsers import prom_sum
from bench.procs import cpu_seconds, process_count, rss_kib, stop
from bench.report import Column, Results, Sample, Table
from bench.runner import (
    Context,
    Running,
    SampleError,
    Target,
    hold_idle,
    http_get,
    record,
    rotation,
    start_target,
    wait_upstream,
)
from bench.upstreams import redis_clients, start_redis


@contextmanager
def proxied_idle(ctx: Context, target: Target, where: Path, n: int) -> Iterator[Running]:
    """A fresh proxy with `n` verified idle connections through it, for the block's length."""
    redis, redis_port = start_redis(where)
    try:
        running = start_target(ctx, target, redis_port, where)
        try:
            baseline = redis_clients(redis_port)
            with hold_idle(running.port, n, where) as opened:
                if opened < n:
                    raise SampleError(f"clients opened {opened} of {n}")
                seen = wait_upstream(redis_port, n, baseline)
                if seen < n:
                    raise SampleError(f"upstream saw {seen} of {n} connections")
                yield running
        finally:
            stop(running.child)
    finally:
        stop(redis)


def _warm(running: Running, where: Path) -> None:
    """Open and close a few connections first, so one-time allocations are not per-conn."""
    with hold_idle(running.port, 50, where):
        pass
    time.sleep(0.5)


# --- idle -------------------------------------------------------------------------------


def run_idle(ctx: Context) -> Results:
    results = Results("idle")
    n = ctx.idle_conns
    targets = [t for t in ctx.targets if t.peer.idle_skip is None]
    for t in ctx.targets:
        results.subject(t.name, t.label)
        if t.peer.idle_skip is not None:
            results.fail(t.name, f"skipped: {t.peer.idle_skip}")

    def measure(target: Target, where: Path) -> tuple[Sample, list[str]]:
        redis, redis_port = start_redis(where)
        try:
            running = start_target(ctx, target, redis_port, where)
            try:
                sample = _idle_sample(running, redis_port, n, where)
            finally:
                stop(running.child)
        finally:
            stop(redis)
        workers = target.opts.workers if target.peer.connwatch else 1
        if sample["processes"] < workers:  # the tree would miss memory held elsewhere
            return sample, [f"workers: {workers} configured, {sample['processes']:.0f} process(es)"]
        return sample, []

    _rounds(ctx, results, targets, measure)
    results.notes.append(
        f"{n} connections, each did one PING then idled {IDLE_SETTLE:g} s; "
        "(RSS after - RSS before) / N over the whole process tree"
    )
    return results


# Seconds the connections idle before RSS is read: past connwatch's first heartbeat (5 s in
# bench/peers.py), when each watched connection has its liveness record, as it has for the rest
# of its idle life (read at 1 s, an earlier version measured connections not yet watched).
IDLE_SETTLE = 6.5


def _idle_sample(running: Running, redis_port: int, n: int, where: Path) -> Sample:
    _warm(running, where)
    before = rss_kib(running.pid)
    baseline = redis_clients(redis_port)
    with hold_idle(running.port, n, where) as opened:
        if opened < n:
            raise SampleError(f"clients opened {opened} of {n}")
        seen = wait_upstream(redis_port, n, baseline)
        if seen < n:
            raise SampleError(f"upstream saw {seen} of {n} connections")
        time.sleep(IDLE_SETTLE)
        after = rss_kib(running.pid)
        procs = process_count(running.pid)
    return {
        "kib_per_conn": (after - before) / n,
        "rss_before_mib": before / 1024,
        "rss_after_mib": after / 1024,
        "upstream_seen": float(seen),
        "processes": float(procs),
    }


def _rounds(
    ctx: Context,
    results: Results,
    targets: list[Target],
    measure: Callable[[Target, Path], tuple[Sample, list[str]]],
) -> None:
    by_name = {t.name: t for t in targets}
    for r in range(ctx.rounds):
        ctx.log(f"[{results.scenario}] round {r + 1}/{ctx.rounds}")
        for name in rotation(list(by_name), r):
            where = ctx.subdir(results.scenario, f"round{r + 1}", name)
            record(ctx, results, name, functools.partial(measure, by_name[name], where))


IDLE_TABLES = [
    Table(
        "idle proxied connections, fresh process each sample",
        [
            Column("kib_per_conn", "RSS KiB/conn"),
            Column("rss_before_mib", "RSS before MiB", 1),
            Column("rss_after_mib", "RSS after MiB", 1),
            Column("processes", "processes", 0),
        ],
        "kib_per_conn",
        refs=("haproxy",),
    ),
]


# --- heartbeat (connwatch only) -----------------------------------------------------------

HEARTBEAT_ON = {
    "listeners.0.heartbeat.enabled": True,
    "listeners.0.heartbeat.interval": "1s",
    "listeners.0.heartbeat.max_interval": "1s",
}
HEARTBEAT_OFF = {"listeners.0.heartbeat.enabled": False}


def heartbeat_targets(ctx: Context) -> list[tuple[Target, Target]]:
    """(heartbeat 1s, heartbeat off) pairs for every connwatch target."""
    pairs = []
    for t in ctx.targets:
        if t.peer.connwatch:
            on = t.with_overrides(f"{t.name}:hb1s", f"{t.label} (heartbeat 1s)", HEARTBEAT_ON)
            off = t.with_overrides(f"{t.name}:hb_off", f"{t.label} (heartbeat off)", HEARTBEAT_OFF)
            pairs.append((on, off))
    return pairs


def run_heartbeat(ctx: Context) -> Results:
    results = Results("heartbeat")
    pairs = heartbeat_targets(ctx)
    targets = [t for pair in pairs for t in pair]
    for t in targets:
        results.subject(t.name, t.label)
    warmup = min(5.0, ctx.window / 2)

    def measure(target: Target, where: Path) -> tuple[Sample, list[str]]:
        with proxied_idle(ctx, target, where, ctx.idle_conns) as running:
            time.sleep(warmup)
            beats0 = _heartbeats(running)
            cpu0, t0 = cpu_seconds(running.pid), time.monotonic()
            time.sleep(ctx.window)
            cpu1, t1 = cpu_seconds(running.pid), time.monotonic()
            beats1 = _heartbeats(running)
        sample: Sample = {"cpu_pct": (cpu1 - cpu0) / (t1 - t0) * 100}
        problems: list[str] = []
        if beats0 is not None and beats1 is not None:
            sample["beats_per_s"] = (beats1 - beats0) / (t1 - t0)
        heartbeat_on = target.opts.overrides.get("listeners.0.heartbeat.enabled", True)
        if heartbeat_on and not sample.get("beats_per_s"):
            problems.append("heartbeat on, but connwatch_heartbeats_total did not grow")
        return sample, problems

    _rounds(ctx, results, targets, measure)
    results.notes.append(
        f"{ctx.idle_conns} idle connections; CPU % of one core over "
        f"{ctx.window:g}s after {warmup:g}s warm-up"
    )
    return results


def _heartbeats(running: Running) -> float | None:
    """connwatch_heartbeats_total summed over labels, from /metrics (None if unreadable)."""
    if running.admin_port is None:
        return None
    try:
        status, body, _ = http_get(running.admin_port, "/metrics")
    except OSError:
        return None
    return (
        prom_sum(body.decode(errors="replace"), "connwatch_heartbeats_total")
        if status == 200
        else None
    )


def heartbeat_tables(ctx: Context) -> list[Table]:
    tables = []
    for on, off in heartbeat_targets(ctx):
        tables.append(
            Table(
                f"{on.peer.name}: heartbeat cost",
                [
                    Column("cpu_pct", "CPU % of one core"),
                    Column("beats_per_s", "heartbeats/s", 0),
                ],
                "cpu_pct",
                refs=(off.name,),
            )
        )
    return tables or [Table("heartbeat cost", [Column("cpu_pct", "CPU % of one core")])]


# --- scrape (connwatch only) ---------------------------------------------------------------

SCRAPES = [
    ("metrics", "/metrics"),
    ("conns100", "/connections?limit=100"),
    ("conns_all", "/connections"),
]


def run_scrape(ctx: Context) -> Results:
    results = Results("scrape")
    targets = [t for t in ctx.targets if t.peer.connwatch]
    for t in targets:
        results.subject(t.name, t.label)

    def measure(target: Target, where: Path) -> tuple[Sample, list[str]]:
        with proxied_idle(ctx, target, where, ctx.idle_conns) as running:
            return _scrape_sample(running, ctx.scrape_repeats, ctx.idle_conns)

    _rounds(ctx, results, targets, measure)
    results.notes.append(
        f"{ctx.idle_conns} open connections; median of "
        f"{ctx.scrape_repeats} sequential GETs per endpoint"
    )
    return results


def _scrape_sample(running: Running, repeats: int, expected: int) -> tuple[Sample, list[str]]:
    if running.admin_port is None:
        raise SampleError("no admin endpoint")
    out: Sample = {}
    problems: list[str] = []
    for key, path in SCRAPES:
        times: list[float] = []
        body = b""
        for _ in range(repeats):
            status, body, seconds = http_get(running.admin_port, path)
            if status != 200:
                raise SampleError(f"GET {path} -> {status}")
            times.append(seconds)
        out[f"{key}_ms"] = statistics.median(times) * 1000
        out[f"{key}_kib"] = len(body) / 1024
        if key == "conns_all":
            entries = _entries(body)
            out["conns_all_entries"] = float(entries)
            if entries < expected:
                problems.append(f"/connections listed {entries} of {expected}")
    return out, problems


def _entries(body: bytes) -> int:
    try:
        doc = json.loads(body)
    except ValueError:
        return -1
    if isinstance(doc, dict):  # tolerate a wrapper object around the list
        doc = next((v for v in doc.values() if isinstance(v, list)), [])
    return len(doc) if isinstance(doc, list) else -1


SCRAPE_TABLES = [
    Table(
        "admin endpoint latency with idle connections open",
        [
            Column("metrics_ms", "/metrics ms"),
            Column("conns100_ms", "/connections?limit=100 ms"),
            Column("conns_all_ms", "/connections ms"),
            Column("conns_all_entries", "entries", 0),
            Column("conns_all_kib", "/connections KiB", 0),
        ],
        None,
    ),
]
