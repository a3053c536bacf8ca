"""A PNG of one run's ratios: a panel per scenario/measure, a bar per proxy, targets as lines.

Each panel shows every subject's median as a ratio to HAProxy's (1.0 = HAProxy, drawn as a thin
line) with the absolute figure next to it; the Python floor is a peer in its own colour, and the
target of issue 15 is a dashed red line where the measure has one (an absolute target, such as
KiB per connection, is drawn where it falls against HAProxy's figure in the same run). The
heartbeat panel is absolute (µs per connection-beat: HAProxy has no heartbeats), the
instruction panels are ratios to the Protocol floor. matplotlib (the `bench` extra) is imported
only when drawing, with the non-interactive Agg backend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import targets as t
from bench.docread import (
    FLOOR,
    HAPROXY,
    Doc,
    instruction_roles,
    instructions,
    label,
    median,
    run_roles,
    subjects,
)
from bench.targets import X

COLOURS = {
    "connwatch": "#e8710a",
    "floor": "#4e8fd0",
    "reference": "#3c3c3c",
    "peer": "#b4b4b4",
}
KIND_NAMES = {
    "connwatch": "connwatch",
    "floor": "Python floor",
    "reference": "HAProxy (= 1.0)",
    "peer": "other proxies",
}
TARGET_COLOUR = "#d62728"
MET_SHADE = "#2ca02c"
JUDGED_EDGE = "#000000"


@dataclass(frozen=True)
class Bar:
    label: str
    value: float
    text: str
    kind: str
    judged: bool = False  # the subject a target of the panel is for: drawn outlined


@dataclass(frozen=True)
class Line:
    x: float
    text: str


@dataclass
class Panel:
    title: str
    xlabel: str
    bars: list[Bar] = field(default_factory=list)
    lines: list[Line] = field(default_factory=list)
    reference: float | None = 1.0
    lower_is_better: bool = False


@dataclass(frozen=True)
class Measure:
    """One panel of ratios to HAProxy: a metric of a scenario, and its target if it has one."""

    title: str
    scenario: str
    key: str
    unit: str
    lower_is_better: bool = False
    target_ratio: float | None = None  # the target as x HAProxy
    target_abs: float | None = None  # the target in the metric's unit
    target_text: str = ""
    role: str = "defaults"  # the Roles field naming the subject the target is for


MEASURES = [
    Measure("bulk, 1 stream: GB/s", "bulk", "gbps_1", "GB/s", target_ratio=t.BULK_1,
            target_text=f"target ≥ {t.BULK_1:g}{X}"),
    Measure("bulk, 1 stream: proxy CPU s/GB", "bulk", "cpu_s_per_gb_1", "s/GB", True,
            target_abs=t.BULK_CPU_S_PER_GB, target_text=f"target ≤ {t.BULK_CPU_S_PER_GB:.2f} s/GB"),
    Measure("bulk, 8 streams: GB/s", "bulk", "gbps_8", "GB/s"),
    Measure("churn: conn/s", "churn", "conn_per_s", "conn/s", target_ratio=t.CHURN_W2,
            target_text=f"target ≥ {t.CHURN_W2:.2f}{X} (workers: 2)", role="workers2"),
    Measure("churn: proxy CPU µs per connection", "churn", "cpu_us_per_conn", "µs", True),
    Measure("rr, 50 clients: PING req/s", "rr", "c50.PING_INLINE.rps", "req/s"),
    Measure("rr, 500 clients, -P 16: PING req/s", "rr", "c500_P16.PING_INLINE.rps", "req/s",
            target_ratio=t.RR_P16_500, target_text=f"target ≥ {t.RR_P16_500:.1f}{X}"),
    Measure("idle: RSS KiB per connection", "idle", "kib_per_conn", "KiB", True,
            target_abs=t.IDLE_KIB, target_text=f"target ≤ {t.IDLE_KIB:g} KiB"),
]  # fmt: skip


def kind(subject: str) -> str:
    if subject == HAPROXY:
        return "reference"
    if subject.startswith("py-"):
        return "floor"
    if subject.startswith("connwatch"):
        return "connwatch"
    return "peer"


def short(value: float) -> str:
    """3 significant figures, thousands as k: 0.79, 12.4, 6,663 -> 6.66k."""
    if abs(value) >= 1e6:
        return f"{value / 1e6:.3g}M"
    if abs(value) >= 1e3:
        return f"{value / 1e3:.3g}k"
    return f"{value:.3g}"


def ratio_panel(doc: Doc, m: Measure) -> Panel | None:
    """The measure against HAProxy; None when HAProxy or every other subject lacks it."""
    ref = median(doc, m.scenario, HAPROXY, m.key)
    if not ref:
        return None
    better = "lower" if m.lower_is_better else "higher"
    panel = Panel(
        f"{m.title} ({better} is better)", f"{X} HAProxy", lower_is_better=better == "lower"
    )
    has_target = m.target_ratio is not None or m.target_abs is not None
    judged = getattr(run_roles(doc), m.role) if has_target else None
    for subject in subjects(doc, m.scenario):
        value = median(doc, m.scenario, subject, m.key)
        if subject == "direct" or value is None:
            continue
        x = value / ref
        text = f"{x:.2f}{X}  {short(value)} {m.unit}"
        name = label(doc, m.scenario, subject)
        panel.bars.append(Bar(name, x, text, kind(subject), subject == judged))
    if m.target_ratio is not None:
        panel.lines.append(Line(m.target_ratio, m.target_text))
    if m.target_abs is not None:
        panel.lines.append(Line(m.target_abs / ref, m.target_text))
    return panel if len(panel.bars) > 1 else None


def heartbeat_panel(doc: Doc) -> Panel | None:
    title = "heartbeat: CPU µs per connection-beat (lower is better)"
    panel = Panel(
        title, "µs (heartbeat-on CPU - off) / beats", reference=None, lower_is_better=True
    )
    judged = run_roles(doc).defaults
    for subject in subjects(doc, "heartbeat"):
        if not subject.endswith(":hb1s"):
            continue
        base = subject.removesuffix(":hb1s")
        found = t.heartbeat_us(doc, base)
        if found is not None:
            name = label(doc, "heartbeat", subject).removesuffix(" (heartbeat 1s)")
            text = f"{found[0]:.1f} µs"
            panel.bars.append(Bar(name, found[0], text, kind(base), base == judged))
    panel.lines.append(Line(t.HEARTBEAT_US, f"target ≤ {t.HEARTBEAT_US:g} µs"))
    return panel if panel.bars else None


def instruction_panel(doc: Doc, which: int) -> Panel | None:
    """Instructions per connection (0) or per request (1) as a ratio to the Protocol floor."""
    floor = instructions(doc, FLOOR)
    if floor is None:
        return None
    what = "connection (churn)" if which == 0 else "request (rr)"
    panel = Panel(f"instructions per {what} (lower is better)", f"{X} Protocol floor")
    panel.lower_is_better = True
    found = instruction_roles(doc)
    judged = {found.defaults, found.splice} if which == 0 else {found.defaults}
    for subject, entry in doc["instructions"].get("subjects", {}).items():
        count = instructions(doc, subject)
        if count is not None:
            x = count[which] / floor[which]
            name, text = str(entry.get("label", subject)), f"{x:.2f}{X}  {short(count[which])}"
            panel.bars.append(Bar(name, x, text, kind(subject), subject in judged))
    if which == 0:
        panel.lines.append(
            Line(t.INSTR_CONN_PORTABLE, f"target ≤ {t.figure(t.INSTR_CONN_PORTABLE)}{X}")
        )
        panel.lines.append(
            Line(t.INSTR_CONN_SPLICE, f"≤ {t.figure(t.INSTR_CONN_SPLICE)}{X} (splice)")
        )
    else:
        panel.lines.append(Line(t.INSTR_REQUEST, f"target ≤ {t.INSTR_REQUEST:g}{X}"))
    return panel if len(panel.bars) > 1 else None


def panels(doc: Doc) -> list[Panel]:
    """Every panel this run has data for, in the order of the issue's table."""
    found = [ratio_panel(doc, m) for m in MEASURES]
    found.append(heartbeat_panel(doc))
    if "instructions" in doc:
        found += [instruction_panel(doc, 0), instruction_panel(doc, 1)]
    return [p for p in found if p is not None]


def title(doc: Doc) -> str:
    meta = doc.get("meta", {})
    opts = meta.get("options", {})
    when = meta.get("started", "unknown time")
    rounds, duration = opts.get("rounds", "?"), opts.get("duration", "?")
    text = (
        f"connwatch against HAProxy, the Python floor and other proxies — run of {when}, "
        f"{rounds} round(s) of {duration} s; bars are ratios of medians within the run"
    )
    counted = doc.get("instructions", {}).get("meta", {}).get("started")
    return (
        f"{text}\ninstructions counted by bench/instructions.py at {counted}" if counted else text
    )


def draw(doc: Doc, out: Path) -> int:
    """Write the PNG; returns how many panels it holds (0: nothing to draw, no file written)."""
    found = panels(doc)
    if not found:
        return 0
    import matplotlib

    matplotlib.use("Agg")  # no display; must come before pyplot
    from matplotlib import pyplot as plt

    cols = 2 if len(found) > 1 else 1
    nrows = math.ceil(len(found) / cols)
    tallest = max(len(p.bars) for p in found)
    fig, axes = plt.subplots(
        nrows, cols, figsize=(7.2 * cols, nrows * (0.36 * tallest + 1.5) + 0.9), squeeze=False
    )
    for ax, panel in zip(axes.flat, found, strict=False):
        _draw_panel(ax, panel)
    for ax in list(axes.flat)[len(found) :]:
        ax.set_visible(False)
    _legend(fig)
    fig.suptitle(title(doc), fontsize=10)
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return len(found)


def _draw_panel(ax: Any, panel: Panel) -> None:
    ys = list(range(len(panel.bars)))
    values = [b.value for b in panel.bars]
    ax.barh(
        ys, values, height=0.7, color=[COLOURS[b.kind] for b in panel.bars],
        edgecolor=[JUDGED_EDGE if b.judged else "none" for b in panel.bars],
        linewidth=[1.8 if b.judged else 0.0 for b in panel.bars],
    )  # fmt: skip
    ax.set_yticks(ys, [b.label for b in panel.bars], fontsize=9)
    for tick, bar in zip(ax.get_yticklabels(), panel.bars, strict=True):
        tick.set_fontweight("bold" if bar.judged else "normal")
    ax.set_ylim(len(ys) - 0.5, -1.3)  # first subject on top; a free row above it for targets
    right = max([*values, *(line.x for line in panel.lines), panel.reference or 0.0])
    ax.set_xlim(0, right * 1.55)  # room for the value labels
    if panel.lines:  # the side of the (first) target that meets it, lightly shaded
        edge = panel.lines[0].x
        ax.axvspan(*((0, edge) if panel.lower_is_better else (edge, right * 1.55)),
                   color=MET_SHADE, alpha=0.12, zorder=0, linewidth=0)  # fmt: skip
    if panel.reference is not None:
        ax.axvline(panel.reference, color=COLOURS["reference"], linewidth=0.8, zorder=1)
    for i, line in enumerate(panel.lines):
        ax.axvline(line.x, color=TARGET_COLOUR, linestyle="--", linewidth=1.4, zorder=2)
        # Two targets close together (2.0x and 2.3x): the first one's text goes to its left.
        left = i == 0 and len(panel.lines) > 1
        text = f"{line.text} " if left else f" {line.text}"
        ax.text(line.x, -0.95, text, color=TARGET_COLOUR, fontsize=8, va="center",
                ha="right" if left else "left")  # fmt: skip
    for y, bar in zip(ys, panel.bars, strict=True):
        ax.text(
            bar.value + right * 0.02,
            y,
            bar.text,
            va="center",
            fontsize=8.5,
            zorder=3,
            bbox={"facecolor": "white", "edgecolor": "none", "pad": 1.0, "alpha": 0.85},
        )  # fmt: skip: the label stays readable where a target line crosses it
    ax.set_title(panel.title, fontsize=10, loc="left")
    ax.set_xlabel(panel.xlabel, fontsize=8.5)
    ax.tick_params(axis="x", labelsize=8)
    ax.spines[["top", "right"]].set_visible(False)


def _legend(fig: Any) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles: list[Any] = [Patch(color=COLOURS[k], label=KIND_NAMES[k]) for k in COLOURS]
    handles.append(Line2D([], [], color=TARGET_COLOUR, linestyle="--", label="issue 15 target"))
    handles.append(Patch(color=MET_SHADE, alpha=0.12, label="target met"))
    handles.append(
        Patch(facecolor="white", edgecolor=JUDGED_EDGE, linewidth=1.8, label="setting judged")
    )
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, frameon=False)
