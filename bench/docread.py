"""Reading the harness's JSON document (bench/run.py --json): medians, ratios, subject roles.

The targets table (bench/targets.py) and the chart (bench/chart.py) are both made from this
document, never from live objects, so either can be made again later from a saved run
(`python bench/report.py results.json`). bench/instructions.py --json is merged in under
"instructions".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.peers import parse_variant

Doc = dict[str, Any]

HAPROXY = "haproxy"
ENVOY = "envoy"
FLOOR = "py-protocol"  # Python's floor: the targets are set against it
CONNWATCH = "connwatch"


def load(results: Path, instructions: Path | None = None) -> Doc:
    """The run's document, with an instructions.py document merged in when given."""
    doc: Doc = json.loads(results.read_text())
    if instructions is not None:
        merge_instructions(doc, json.loads(instructions.read_text()))
    return doc


def merge_instructions(doc: Doc, instr: Doc) -> None:
    doc["instructions"] = instr


def median(doc: Doc, scenario: str, subject: str, key: str) -> float | None:
    """The median of `key` over the rounds of `subject` in `scenario`; None when absent."""
    subjects = doc.get("scenarios", {}).get(scenario, {}).get("subjects", {})
    stat = subjects.get(subject, {}).get("summary", {}).get(key)
    return None if stat is None else float(stat["median"])


def ratio(doc: Doc, scenario: str, subject: str, ref: str, key: str) -> float | None:
    mine, theirs = median(doc, scenario, subject, key), median(doc, scenario, ref, key)
    if mine is None or not theirs:
        return None
    return mine / theirs


def subjects(doc: Doc, scenario: str) -> list[str]:
    """Subject names of a scenario in the order the run listed them."""
    return list(doc.get("scenarios", {}).get(scenario, {}).get("subjects", {}))


def label(doc: Doc, scenario: str, subject: str) -> str:
    entry = doc.get("scenarios", {}).get(scenario, {}).get("subjects", {}).get(subject, {})
    return str(entry.get("label", subject))


def instructions(doc: Doc, subject: str) -> tuple[float, float] | None:
    """(instructions per connection, per request) of a subject counted by instructions.py."""
    entry = doc.get("instructions", {}).get("subjects", {}).get(subject)
    if entry is None:
        return None
    return float(entry["instructions_per_conn"]), float(entry["instructions_per_request"])


@dataclass(frozen=True)
class Roles:
    """Which subject of a run stands for each connwatch setting the targets name."""

    defaults: str | None  # the shipped defaults: plain `connwatch`, one worker, no --connwatch-set
    workers2: str | None  # `workers: 2`
    splice: str | None  # `data_path: splice`


def roles(meta: Doc, present: list[str]) -> Roles:
    """Find the subjects by what their variants set (names are the user's choice)."""
    options = meta.get("options", {})
    variants = dict(parse_variant(v) for v in options.get("connwatch_variant", []))
    workers = int(options.get("connwatch_workers", 1))
    plain_is_default = workers == 1 and not options.get("connwatch_set")

    def variant(key: str, value: Any, fallback: str) -> str | None:
        for name, overrides in variants.items():
            if overrides.get(key) == value and f"{CONNWATCH}[{name}]" in present:
                return f"{CONNWATCH}[{name}]"
        return fallback if fallback in present else None

    have_plain = CONNWATCH in present
    w2 = CONNWATCH if have_plain and workers == 2 else variant("workers", 2, f"{CONNWATCH}[w2]")
    return Roles(
        defaults=CONNWATCH if have_plain and plain_is_default else None,
        workers2=w2,
        splice=variant("listeners.0.data_path", "splice", f"{CONNWATCH}[splice]"),
    )


def all_subjects(doc: Doc) -> list[str]:
    """Every subject named anywhere in the run, first-seen order."""
    seen: dict[str, None] = {}
    for scenario in doc.get("scenarios", {}).values():
        seen.update(dict.fromkeys(scenario.get("subjects", {})))
    return list(seen)


def run_roles(doc: Doc) -> Roles:
    return roles(doc.get("meta", {}), all_subjects(doc))


def instruction_roles(doc: Doc) -> Roles:
    instr = doc.get("instructions", {})
    return roles(instr.get("meta", {}), list(instr.get("subjects", {})))
