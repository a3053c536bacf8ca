"""Samples -> medians, spread and ratios; markdown tables and the JSON document; and, run as
a script, the targets table and chart again from a saved JSON document."""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Sample = dict[str, float]


@dataclass
class Results:
    """Every sample of one scenario, by subject (direct, a peer, or a connwatch setting)."""

    scenario: str
    subjects: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    samples: dict[str, list[Sample]] = field(default_factory=dict)
    failures: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def subject(self, name: str, label: str) -> None:
        if name not in self.subjects:
            self.subjects.append(name)
            self.labels[name] = label
            self.samples.setdefault(name, [])

    def add(self, name: str, sample: Sample) -> None:
        self.samples[name].append(sample)

    def fail(self, name: str, why: str) -> None:
        self.failures.setdefault(name, []).append(why)

    def summary(self, name: str) -> dict[str, dict[str, float]]:
        """metric -> {median, min, max, n} over the rounds that produced it."""
        out: dict[str, dict[str, float]] = {}
        for key in sorted({k for s in self.samples.get(name, []) for k in s}):
            vals = [s[key] for s in self.samples[name] if key in s and not math.isnan(s[key])]
            if vals:
                out[key] = {
                    "median": statistics.median(vals),
                    "min": min(vals),
                    "max": max(vals),
                    "n": len(vals),
                }
        return out

    def median(self, name: str, key: str) -> float | None:
        stat = self.summary(name).get(key)
        return None if stat is None else stat["median"]

    def ratio(self, name: str, ref: str, key: str) -> float | None:
        mine, theirs = self.median(name, key), self.median(ref, key)
        if mine is None or theirs is None or theirs == 0:
            return None
        return mine / theirs

    def to_json(self, refs: list[str]) -> dict[str, Any]:
        doc: dict[str, Any] = {"subjects": {}, "notes": self.notes}
        for name in self.subjects:
            summary = self.summary(name)
            ratios = {
                ref: {k: self.ratio(name, ref, k) for k in summary}
                for ref in refs
                if ref in self.samples and ref != name
            }
            doc["subjects"][name] = {
                "label": self.labels[name],
                "samples": self.samples[name],
                "summary": summary,
                "ratios": ratios,
                "failures": self.failures.get(name, []),
            }
        return doc


@dataclass(frozen=True)
class Column:
    key: str
    label: str
    digits: int = 2


@dataclass(frozen=True)
class Table:
    title: str
    columns: list[Column]
    # Ratios of this metric's medians against each reference subject that has samples.
    ratio_key: str | None = None
    refs: tuple[str, ...] = ("direct", "haproxy")


def fmt(value: float | None, digits: int) -> str:
    if value is None or math.isnan(value):
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def render(results: Results, table: Table) -> str:
    refs = [r for r in table.refs if results.samples.get(r)]
    head = ["subject"] + [c.label for c in table.columns]
    if table.ratio_key:
        head += [f"x {results.labels.get(r, r)}" for r in refs]
    lines = [f"### {results.scenario}: {table.title}", "", _row(head), _row(["---"] * len(head))]
    for name in results.subjects:
        lines.append(_row(_cells(results, table, name, refs)))
    lines.append("")
    lines.append("Cells: median [min-max] over rounds; x NAME = ratio of medians.")
    for name in results.subjects:
        for why in dict.fromkeys(results.failures.get(name, [])):
            lines.append(f"- {results.labels[name]}: {why[:400]}")
    return "\n".join(lines)


def short_reason(why: str) -> str:
    """'failed to start: exited ...: a | b | Error: x' -> 'failed to start: Error: x'."""
    if " | " not in why:
        return why[:120]
    return f"{why.split(':', 1)[0]}: {why.rsplit(' | ', 1)[-1]}"[:120]


def _cells(results: Results, table: Table, name: str, refs: list[str]) -> list[str]:
    summary = results.summary(name)
    label = results.labels[name]
    if not summary:
        why = short_reason(results.failures.get(name, ["no samples"])[-1])
        blanks = len(table.columns) - 1 + len(refs) * bool(table.ratio_key)
        return [label, why, *["-"] * blanks]
    cells = [label]
    for col in table.columns:
        stat = summary.get(col.key)
        if stat is None:
            cells.append("-")
        elif stat["n"] > 1:
            cells.append(
                f"{fmt(stat['median'], col.digits)} "
                f"[{fmt(stat['min'], col.digits)}-{fmt(stat['max'], col.digits)}]"
            )
        else:
            cells.append(fmt(stat["median"], col.digits))
    if table.ratio_key:
        for ref in refs:
            r = None if ref == name else results.ratio(name, ref, table.ratio_key)
            cells.append("-" if r is None else f"{r:.2f}")
    return cells


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    """`python bench/report.py results.json [--instructions I.json] [--chart out.png]`: the
    targets table (and the chart) again from a saved run, without running anything."""
    # Imported here: run as a script, `bench` is importable only after the path fix below.
    from bench import chart, docread, targets

    p = argparse.ArgumentParser(prog="bench/report.py", description=main.__doc__)
    p.add_argument("results", type=Path, help="JSON written by bench/run.py --json")
    p.add_argument("--instructions", type=Path, help="JSON written by bench/instructions.py")
    p.add_argument("--chart", type=Path, help="write the PNG chart of the ratios here")
    args = p.parse_args(argv)
    doc = docread.load(args.results, args.instructions)
    print(targets.render(doc))
    if args.chart:
        if not chart.draw(doc, args.chart):
            print("chart: nothing to draw (no HAProxy figures in this run)", file=sys.stderr)
            return 1
        print(f"chart: {args.chart}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    # Run as a script, bench/ is sys.path[0]: swap it for the folder holding the package.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)
    sys.exit(main())
