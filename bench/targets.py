"""The speed targets of issue 15, checked against one run's JSON: measure, now, target, verdict.

Every target is at connwatch's shipped defaults with every monitoring feature on (as the
harness runs it), except where a row names a setting (`workers: 2`, splice). Ratios are of
medians within the one run; instruction counts come from bench/instructions.py --json.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bench.docread import (
    ENVOY,
    FLOOR,
    HAPROXY,
    Doc,
    Roles,
    instruction_roles,
    instructions,
    median,
    ratio,
    run_roles,
)

MET, NOT_MET, NO_DATA = "met", "not met", "no data"
X = "\N{MULTIPLICATION SIGN}"  # the sign of a ratio, as the issue writes it

# The figures of the targets, also drawn on the chart.
INSTR_CONN_PORTABLE = 2.0  # x the Protocol floor's instructions per connection
INSTR_CONN_SPLICE = 2.3
INSTR_REQUEST = 1.25
CHURN_W2 = 0.60  # x HAProxy conn/s, and ahead of Envoy
BULK_1 = 1.8  # x HAProxy GB/s, and ≥ Envoy
BULK_CPU_S_PER_GB = 0.40
IDLE_KIB = 2.5
RR_P16_500 = 1.0  # x HAProxy PING req/s
HEARTBEAT_US = 5.0  # CPU µs per connection-beat


@dataclass(frozen=True)
class Row:
    measure: str
    now: str
    target: str
    verdict: str


def verdict(*checks: bool | None) -> str:
    """Not met if any check fails; no data if one could not be made; met otherwise."""
    if any(c is False for c in checks):
        return NOT_MET
    if any(c is None for c in checks):
        return NO_DATA
    return MET


def at_most(value: float | None, limit: float) -> bool | None:
    return None if value is None else value <= limit


def at_least(value: float | None, limit: float) -> bool | None:
    return None if value is None else value >= limit


def num(value: float | None, digits: int = 2, suffix: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}{suffix}" if abs(value) >= 1000 else f"{value:.{digits}f}{suffix}"


def figure(value: float) -> str:
    """A target as the issue writes it: 2.0, 2.3, 1.25."""
    return f"{value:.1f}" if round(value, 1) == value else f"{value:.2f}"


def times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}{X}"


# --- instructions (bench/instructions.py) -----------------------------------------------------


def _instr_row(doc: Doc, subject: str | None, which: int, title: str, limit: float) -> Row:
    target = f"≤ {figure(limit)}{X} the Protocol floor"
    floor = instructions(doc, FLOOR)
    mine = instructions(doc, subject) if subject else None
    if floor is None or mine is None:
        return Row(title, "-", target, NO_DATA)
    x = mine[which] / floor[which]
    digits = 1 if which == 0 else 2  # ~100k per connection, ~10k per request
    now = f"{mine[which] / 1e3:.{digits}f}k ({times(x)} floor {floor[which] / 1e3:.{digits}f}k)"
    return Row(title, now, target, verdict(x <= limit))


def instr_per_conn(doc: Doc, _roles: Roles) -> Row:
    subject = instruction_roles(doc).defaults
    title = "user-space instructions per connection (portable)"
    return _instr_row(doc, subject, 0, title, INSTR_CONN_PORTABLE)


def instr_per_conn_splice(doc: Doc, _roles: Roles) -> Row:
    subject = instruction_roles(doc).splice
    return _instr_row(doc, subject, 0, "the same on splice", INSTR_CONN_SPLICE)


def instr_per_request(doc: Doc, _roles: Roles) -> Row:
    subject = instruction_roles(doc).defaults
    return _instr_row(doc, subject, 1, "instructions per request (rr)", INSTR_REQUEST)


# --- bench/run.py scenarios -----------------------------------------------------------------


def others(doc: Doc, scenario: str, key: str, names: dict[str, str], as_ratio: bool) -> str:
    """'; Envoy 0.65x, floor 0.64x' for the peers this run has (ratios to HAProxy, or figures)."""
    parts = []
    for shown, subject in names.items():
        value = (
            ratio(doc, scenario, subject, HAPROXY, key)
            if as_ratio
            else median(doc, scenario, subject, key)
        )
        if value is not None:
            parts.append(f"{shown} {times(value) if as_ratio else num(value)}")
    return "; " + ", ".join(parts) if parts else ""


PEERS_SEEN = {"Envoy": ENVOY, "floor": FLOOR}


def churn_w2(doc: Doc, roles: Roles) -> Row:
    title, target = "churn, `workers: 2`", f"≥ {CHURN_W2:.2f}{X} HAProxy, and ahead of Envoy"
    key, w2 = "conn_per_s", roles.workers2
    if w2 is None:
        return Row(title, "-", target, NO_DATA)
    x = ratio(doc, "churn", w2, HAPROXY, key)
    envoy = median(doc, "churn", ENVOY, key)
    mine = median(doc, "churn", w2, key)
    if x is None:
        return Row(title, "-", target, NO_DATA)
    now = (
        f"{times(x)} HAProxy ({num(mine)} vs {num(median(doc, 'churn', HAPROXY, key))} conn/s)"
        + others(doc, "churn", key, PEERS_SEEN, as_ratio=True)
    )
    ahead = None if envoy is None or mine is None else mine > envoy
    return Row(title, now, target, verdict(at_least(x, CHURN_W2), ahead))


def bulk_1(doc: Doc, roles: Roles) -> Row:
    title = "bulk, 1 stream, shipped defaults"
    target = f"≥ {BULK_1:g}{X} HAProxy and ≥ Envoy, ≤ {BULK_CPU_S_PER_GB:.2f} CPU-s/GB"
    subject = roles.defaults
    if subject is None:
        return Row(title, "-", target, NO_DATA)
    x = ratio(doc, "bulk", subject, HAPROXY, "gbps_1")
    envoy_x = ratio(doc, "bulk", ENVOY, HAPROXY, "gbps_1")
    cpu = median(doc, "bulk", subject, "cpu_s_per_gb_1")
    if x is None:
        return Row(title, "-", target, NO_DATA)
    now = (
        f"{times(x)} HAProxy ({num(median(doc, 'bulk', subject, 'gbps_1'))} vs "
        f"{num(median(doc, 'bulk', HAPROXY, 'gbps_1'))} GB/s), {num(cpu)} CPU-s/GB"
        + others(doc, "bulk", "gbps_1", PEERS_SEEN, as_ratio=True)
    )
    vs_envoy = None if x is None or envoy_x is None else x >= envoy_x
    checks = (at_least(x, BULK_1), vs_envoy, at_most(cpu, BULK_CPU_S_PER_GB))
    return Row(title, now, target, verdict(*checks))


def idle(doc: Doc, roles: Roles) -> Row:
    title, target = "idle connection, shipped defaults", f"≤ {IDLE_KIB:g} KiB"
    kib = median(doc, "idle", roles.defaults, "kib_per_conn") if roles.defaults else None
    if kib is None:
        return Row(title, "-", target, NO_DATA)
    seen = {"HAProxy": HAPROXY, "floor": FLOOR}
    now = f"{num(kib, suffix=' KiB')}" + others(doc, "idle", "kib_per_conn", seen, as_ratio=False)
    return Row(title, now, target, verdict(at_most(kib, IDLE_KIB)))


def rr_p16_500(doc: Doc, roles: Roles) -> Row:
    title, target = "rr `-P 16`, 500 clients", f"≥ {RR_P16_500:.1f}{X} HAProxy"
    key = "c500_P16.PING_INLINE.rps"
    x = ratio(doc, "rr", roles.defaults, HAPROXY, key) if roles.defaults else None
    if x is None or roles.defaults is None:
        return Row(title, "-", target, NO_DATA)
    now = (
        f"{times(x)} HAProxy ({num(median(doc, 'rr', roles.defaults, key))} vs "
        f"{num(median(doc, 'rr', HAPROXY, key))} PING req/s)"
        + others(doc, "rr", key, {"floor": FLOOR}, as_ratio=True)
    )
    return Row(title, now, target, verdict(at_least(x, RR_P16_500)))


def heartbeat_us(doc: Doc, subject: str) -> tuple[float, float, float, float] | None:
    """(µs of CPU per connection-beat, CPU % with heartbeats, without, beats/s) of a subject.

    The cost is heartbeat-on CPU minus heartbeat-off CPU of the same setting when the run has
    both (the watchdog's own cost), divided by the beats counted in the same window.
    """
    on_pct = median(doc, "heartbeat", f"{subject}:hb1s", "cpu_pct")
    beats = median(doc, "heartbeat", f"{subject}:hb1s", "beats_per_s")
    if on_pct is None or not beats:
        return None
    off_pct = median(doc, "heartbeat", f"{subject}:hb_off", "cpu_pct") or 0.0
    return (on_pct - off_pct) / 100 / beats * 1e6, on_pct, off_pct, beats


def heartbeat(doc: Doc, roles: Roles) -> Row:
    title, target = "heartbeat, per connection-beat", f"≤ {HEARTBEAT_US:g} µs"
    found = heartbeat_us(doc, roles.defaults) if roles.defaults else None
    if found is None:
        return Row(title, "-", target, NO_DATA)
    us, on, off, beats = found
    now = f"{us:.1f} µs ({on:.2f} % of a core with heartbeats, {off:.2f} % without; {beats:,.0f} beats/s)"
    return Row(title, now, target, verdict(us <= HEARTBEAT_US))


ROWS: list[Callable[[Doc, Roles], Row]] = [
    instr_per_conn,
    instr_per_conn_splice,
    instr_per_request,
    churn_w2,
    bulk_1,
    idle,
    rr_p16_500,
    heartbeat,
]


def rows(doc: Doc) -> list[Row]:
    found = run_roles(doc)
    return [row(doc, found) for row in ROWS]


def render(doc: Doc) -> str:
    """The markdown targets table, with a line on anything that makes a verdict unsafe."""
    lines = [
        "## Against the targets of issue 15",
        "",
        "| measure | now | target | |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r.measure} | {r.now} | {r.target} | {r.verdict} |" for r in rows(doc)]
    options = doc.get("meta", {}).get("options", {})
    if options.get("connwatch_set") or int(options.get("connwatch_workers", 1)) != 1:
        lines.append("")
        lines.append(
            "- plain `connwatch` ran with --connwatch-set/--connwatch-workers: not the shipped "
            "defaults, so the rows that need them say no data"
        )
    if "instructions" not in doc:
        lines.append("")
        lines.append(
            "- instruction rows: no bench/instructions.py JSON given (--instructions FILE)"
        )
    return "\n".join(lines)
