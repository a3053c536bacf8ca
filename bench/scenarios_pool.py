"""The `pool` scenario: connwatch with and without its warm upstream pool (SPEC section 9).

Per round and subject (direct, each connwatch target as given, and the same with
`upstream_pool.enabled`), two upstreams, each fresh with a fresh proxy:
- a greeting upstream (bench/greeting_upstream.py) that sends its banner 50 ms after accept:
  connect-to-greeting p50/p99 over 200 clients arriving 20 ms apart, then churn conn/s with 50
  clients (connect, read the greeting, close);
- redis-server: connect + PING + reply p50/p99 over 200 clients 20 ms apart, then churn conn/s.
"""

from __future__ import annotations

from pathlib import Path

from bench.parsers import parse_json_line
from bench.procs import Child, free_port, stop
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
from bench.upstreams import start_listening, start_redis

GREETING_DELAY = 0.05  # seconds from accept to the banner
LATENCY_CLIENTS = 200
LATENCY_INTERVAL = 0.02  # seconds between latency clients: 50 new connections a second
POOL = {"listeners.0.upstream_pool.enabled": True}


def pool_targets(ctx: Context) -> list[Target]:
    """Each connwatch target as given, then with the pool on."""
    out = []
    for t in ctx.targets:
        if t.peer.connwatch:
            out.append(t)
            out.append(t.with_overrides(f"{t.name}+pool", f"{t.label} + upstream_pool", POOL))
    return out


def start_greeter(workdir: Path) -> tuple[Child, int]:
    port = free_port()
    argv = [*python_script("greeting_upstream.py"), "--port", str(port)]
    argv += ["--delay", str(GREETING_DELAY)]
    return start_listening("greeter", argv, port, workdir, 10.0), port


def _client(port: int, *, greeting: bool, latency: bool, ctx: Context) -> dict[str, float]:
    argv = [*python_script("churn_client.py"), "--port", str(port)]
    if greeting:
        argv.append("--greeting")
    if latency:
        argv += ["--concurrency", "1", "--max-conns", str(LATENCY_CLIENTS)]
        argv += ["--interval", str(LATENCY_INTERVAL), "--duration", "60"]
        timeout = 120.0
    else:
        argv += ["--concurrency", "50", "--max-conns", str(ctx.churn_max)]
        argv += ["--duration", str(ctx.duration)]
        timeout = ctx.duration + 60
    doc = parse_json_line(run_tool(argv, timeout=timeout))
    if not doc["conns"]:
        raise SampleError(f"no connection completed: {doc['errors']} errors {doc['error_kinds']}")
    return {k: float(doc[k]) for k in ("conn_per_s", "p50_ms", "p99_ms", "errors")}


def _measure(ctx: Context, target: Target | None, where: Path) -> tuple[Sample, list[str]]:
    out: Sample = {}
    problems: list[str] = []
    for prefix, upstream, greeting in (
        ("greet", start_greeter, True),
        ("redis", start_redis, False),
    ):
        up_child, up_port = upstream(where)
        try:
            running = None if target is None else start_target(ctx, target, up_port, where)
            try:
                port = up_port if running is None else running.port
                lat = _client(port, greeting=greeting, latency=True, ctx=ctx)
                churn = _client(port, greeting=greeting, latency=False, ctx=ctx)
            finally:
                if running is not None:
                    stop(running.child)
        finally:
            stop(up_child)
        out[f"{prefix}_p50_ms"] = lat["p50_ms"]
        out[f"{prefix}_p99_ms"] = lat["p99_ms"]
        out[f"{prefix}_churn"] = churn["conn_per_s"]
        out[f"{prefix}_churn_p50_ms"] = churn["p50_ms"]
        errors = lat["errors"] + churn["errors"]
        out[f"{prefix}_errors"] = errors
        if errors:
            problems.append(f"{prefix}: {errors:g} errors")
    return out, problems


def run_pool(ctx: Context) -> Results:
    results = Results("pool")
    results.subject(DIRECT, "direct (no proxy)")
    targets = {t.name: t for t in pool_targets(ctx)}
    for t in targets.values():
        results.subject(t.name, t.label)
    for r in range(ctx.rounds):
        ctx.log(f"[pool] round {r + 1}/{ctx.rounds}")
        for name in rotation([DIRECT, *targets], r):
            where = ctx.subdir("pool", f"round{r + 1}", name)
            target = targets.get(name)
            record(ctx, results, name, lambda t=target, w=where: _measure(ctx, t, w))
    results.notes.append(
        f"latency: {LATENCY_CLIENTS} clients {LATENCY_INTERVAL * 1000:g} ms apart; churn: 50 "
        f"clients, at most {ctx.churn_max} connections or {ctx.duration:g}s; the greeter "
        f"answers {GREETING_DELAY * 1000:g} ms after accept; pool at its defaults "
        "(min_idle 2, max_idle 32, grow)"
    )
    return results


POOL_TABLES = [
    Table(
        "greeting upstream (banner 50 ms after accept): connect to first byte",
        [
            Column("greet_p50_ms", "p50 ms"),
            Column("greet_p99_ms", "p99 ms"),
            Column("greet_churn", "churn conn/s", 0),
            Column("greet_churn_p50_ms", "churn p50 ms"),
            Column("greet_errors", "errors", 0),
        ],
        "greet_p50_ms",
        ("direct", "connwatch"),
    ),
    Table(
        "redis: connect + PING + reply",
        [
            Column("redis_p50_ms", "p50 ms"),
            Column("redis_p99_ms", "p99 ms"),
            Column("redis_churn", "churn conn/s", 0),
            Column("redis_churn_p50_ms", "churn p50 ms"),
            Column("redis_errors", "errors", 0),
        ],
        "redis_p50_ms",
        ("direct", "connwatch"),
    ),
]
