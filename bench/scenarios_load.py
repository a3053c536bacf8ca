"""Scenarios with traffic: bulk (iperf3), rr (redis-benchmark), churn (asyncio client).

Each round runs direct and every target in a rotating order, each with a fresh upstream and
a fresh proxy; proxy CPU is read from /proc around the load for the whole process tree.
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Callable
from pathlib import Path

from bench.parsers import (
    ParseError,
    RedisBenchRow,
    parse_iperf3_json,
    parse_json_line,
    parse_redis_benchmark_csv,
    parse_redis_benchmark_quiet,
)
from bench.procs import Child, cpu_seconds, stop
from bench.report import Column, Results, Sample, Table
from bench.runner import (
    DIRECT,
    Context,
    SampleError,
    Target,
    python_script,
    record,
    rotation,
    run_tool,
    start_target,
)
from bench.upstreams import start_iperf3, start_redis

# (port, proxy pid or None for direct) -> (sample, problems)
SampleFn = Callable[[int, int | None], tuple[Sample, list[str]]]
UpstreamFn = Callable[[Path], tuple[Child, int]]


def run_rounds(ctx: Context, results: Results, upstream: UpstreamFn, sample: SampleFn) -> None:
    """direct + every target per round, rotating order; fresh upstream and proxy per sample."""
    results.subject(DIRECT, "direct (no proxy)")
    by_name = {t.name: t for t in ctx.targets}
    for t in ctx.targets:
        results.subject(t.name, t.label)
    for r in range(ctx.rounds):
        ctx.log(f"[{results.scenario}] round {r + 1}/{ctx.rounds}")
        for name in rotation([DIRECT, *by_name], r):
            where = ctx.subdir(results.scenario, f"round{r + 1}", name)
            measure = functools.partial(_one, ctx, by_name.get(name), where, upstream, sample)
            record(ctx, results, name, measure)


def _one(
    ctx: Context, target: Target | None, where: Path, upstream: UpstreamFn, sample: SampleFn
) -> tuple[Sample, list[str]]:
    up_child, up_port = upstream(where)
    try:
        if target is None:
            return sample(up_port, None)
        running = start_target(ctx, target, up_port, where)
        try:
            return sample(running.port, running.pid)
        finally:
            stop(running.child)
    finally:
        stop(up_child)


def _cpu(pid: int | None) -> float:
    return cpu_seconds(pid) if pid is not None else 0.0


# --- bulk -------------------------------------------------------------------------------


def run_bulk(ctx: Context) -> Results:
    results = Results("bulk")
    iperf3 = shutil.which("iperf3")
    if iperf3 is None:
        results.notes.append("iperf3 not installed")
        return results
    seconds = max(1, round(ctx.duration))

    def sample(port: int, pid: int | None) -> tuple[Sample, list[str]]:
        out: Sample = {}
        problems: list[str] = []
        for streams in (1, 8):
            argv = [
                iperf3,
                "-c",
                "127.0.0.1",
                "-p",
                str(port),
                "-t",
                str(seconds),
                "-P",
                str(streams),
                "-J",
                "--connect-timeout",
                "3000",
            ]
            cpu0 = _cpu(pid)
            try:
                res = parse_iperf3_json(run_tool(argv, timeout=seconds + 30))
            except (SampleError, ParseError) as exc:
                problems.append(f"{streams} stream(s): {exc}")
                continue
            cpu = _cpu(pid) - cpu0
            out[f"gbps_{streams}"] = res.gb_per_s
            if pid is not None and res.bytes > 0:
                out[f"cpu_s_per_gb_{streams}"] = cpu / (res.bytes / 1e9)
        return out, problems

    results.notes.append(f"iperf3 -t {seconds}; GB = 1e9 bytes the receiver got")
    run_rounds(ctx, results, start_iperf3, sample)
    return results


BULK_TABLES = [
    Table("1 stream", [Column("gbps_1", "GB/s"), Column("cpu_s_per_gb_1", "CPU s/GB")], "gbps_1"),
    Table(
        "8 streams (-P 8)",
        [Column("gbps_8", "GB/s"), Column("cpu_s_per_gb_8", "CPU s/GB")],
        "gbps_8",
    ),
]


# --- rr ---------------------------------------------------------------------------------

RR_VARIANTS = [("c50", 50, 1), ("c500", 500, 1), ("c50_P16", 50, 16), ("c500_P16", 500, 16)]
RR_TESTS = ["PING_INLINE", "SET", "GET"]


def rr_requests(duration: float, pipeline: int) -> int:
    """Requests per test: about `duration` seconds of work at direct speed, bounded."""
    per_second = 30_000 if pipeline == 1 else 500_000
    return max(10_000, min(int(per_second * duration), 5_000_000))


def parse_redis_benchmark(text: str) -> dict[str, RedisBenchRow]:
    try:
        return parse_redis_benchmark_csv(text)
    except ParseError:
        return parse_redis_benchmark_quiet(text)


def run_rr(ctx: Context) -> Results:
    results = Results("rr")
    tool = shutil.which("redis-benchmark")
    if tool is None:
        results.notes.append("redis-benchmark not installed")
        return results

    def sample(port: int, pid: int | None) -> tuple[Sample, list[str]]:
        out: Sample = {}
        problems: list[str] = []
        for variant, clients, pipeline in RR_VARIANTS:
            n = rr_requests(ctx.duration, pipeline)
            argv = [
                tool,
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-c",
                str(clients),
                "-n",
                str(n),
                "-P",
                str(pipeline),
                "-t",
                ",".join(t.lower() for t in RR_TESTS),
                "--csv",
            ]
            cpu0 = _cpu(pid)
            try:
                rows = parse_redis_benchmark(run_tool(argv, timeout=60 + 30 * ctx.duration))
            except (SampleError, ParseError) as exc:
                problems.append(f"{variant}: {exc}")
                continue
            cpu = _cpu(pid) - cpu0
            for test, row in rows.items():
                out[f"{variant}.{test}.rps"] = row.rps
                if row.p50_ms is not None:
                    out[f"{variant}.{test}.p50_ms"] = row.p50_ms
                if row.p99_ms is not None:
                    out[f"{variant}.{test}.p99_ms"] = row.p99_ms
            if pid is not None:
                out[f"{variant}.cpu_us_per_req"] = cpu / (n * len(rows)) * 1e6
        return out, problems

    results.notes.append(
        "redis-benchmark -t ping_inline,set,get --csv; CPU µs per request is over all three tests"
    )
    run_rounds(ctx, results, start_redis, sample)
    return results


def _rr_table(variant: str, title: str) -> Table:
    cols = [Column(f"{variant}.{t}.rps", f"{t} req/s", 0) for t in RR_TESTS]
    cols += [
        Column(f"{variant}.PING_INLINE.p50_ms", "PING p50 ms"),
        Column(f"{variant}.PING_INLINE.p99_ms", "PING p99 ms"),
        Column(f"{variant}.cpu_us_per_req", "CPU µs/req", 1),
    ]
    return Table(title, cols, f"{variant}.PING_INLINE.rps")


RR_TABLES = [
    _rr_table("c50", "50 clients"),
    _rr_table("c500", "500 clients"),
    _rr_table("c50_P16", "50 clients, -P 16"),
    _rr_table("c500_P16", "500 clients, -P 16"),
]


# --- churn ------------------------------------------------------------------------------


def run_churn(ctx: Context) -> Results:
    results = Results("churn")

    def sample(port: int, pid: int | None) -> tuple[Sample, list[str]]:
        argv = [
            *python_script("churn_client.py"),
            "--port",
            str(port),
            "--concurrency",
            "50",
            "--max-conns",
            str(ctx.churn_max),
            "--duration",
            str(ctx.duration),
        ]
        cpu0 = _cpu(pid)
        doc = parse_json_line(run_tool(argv, timeout=ctx.duration + 60))
        cpu = _cpu(pid) - cpu0
        if not doc["conns"]:
            raise SampleError(
                f"no connection completed: {doc['errors']} errors {doc['error_kinds']}"
            )
        out: Sample = {k: float(doc[k]) for k in ("conn_per_s", "p50_ms", "p99_ms", "errors")}
        if pid is not None:
            out["cpu_us_per_conn"] = cpu / doc["conns"] * 1e6
        problems = [f"{doc['errors']} errors: {doc['error_kinds']}"] if doc["errors"] else []
        return out, problems

    results.notes.append(
        f"50 clients, connect + PING + close, at most {ctx.churn_max} "
        f"connections or {ctx.duration:g}s"
    )
    run_rounds(ctx, results, start_redis, sample)
    return results


CHURN_TABLES = [
    Table(
        "connect + PING + close, 50 clients",
        [
            Column("conn_per_s", "conn/s", 0),
            Column("p50_ms", "p50 ms"),
            Column("p99_ms", "p99 ms"),
            Column("cpu_us_per_conn", "proxy CPU µs/conn", 0),
            Column("errors", "errors", 0),
        ],
        "conn_per_s",
    ),
]
