"""Incident response: every alert in deploy/prometheus carries a `runbook_url` to its own
section of docs/troubleshooting.md, and that section says what the alert means, the first three
checks and how to mitigate."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"
DOC = ROOT / "docs" / "troubleshooting.md"
RUNBOOK_BASE = "https://github.com/connwatch/connwatch/blob/main/docs/troubleshooting.md#"


def alerts() -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = []
    for path in sorted(PROM.glob("*.yml")):
        data = yaml.safe_load(path.read_text())
        if isinstance(data, dict) and "groups" in data:
            rules += [r for g in data["groups"] for r in g["rules"] if "alert" in r]
    return rules


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def sections() -> dict[str, str]:
    """Anchor -> the text of that section (up to the next heading of its level or above)."""
    text = DOC.read_text()
    heads = list(re.finditer(r"(?m)^(#{2,3}) (.+)$", text))
    out: dict[str, str] = {}
    for i, head in enumerate(heads):
        level = len(head.group(1))
        end = len(text)
        for later in heads[i + 1 :]:
            if len(later.group(1)) <= level:
                end = later.start()
                break
        out[slug(head.group(2))] = text[head.end() : end]
    return out


def test_there_are_alerts_to_check() -> None:
    names = {rule["alert"] for rule in alerts()}
    assert {"ConnwatchNearMaxConnections", "ConnwatchClientsHittingLimits"} <= names


@pytest.mark.parametrize("rule", alerts(), ids=lambda rule: rule["alert"])
def test_every_alert_links_its_own_runbook_section(rule: dict[str, Any]) -> None:
    url = rule["annotations"].get("runbook_url")
    assert url, f"{rule['alert']} has no runbook_url annotation"
    assert url.startswith(RUNBOOK_BASE), url
    anchor = url.removeprefix(RUNBOOK_BASE)
    assert anchor == slug(rule["alert"]), "each alert has a section of its own, named after it"
    body = sections().get(anchor)
    assert body is not None, f"docs/troubleshooting.md has no section #{anchor}"
    assert "**What it means.**" in body
    assert "**First three checks.**" in body
    assert re.search(r"(?m)^1\. .+^2\. .+^3\. ", body, re.DOTALL), "three numbered checks"
    assert "**Mitigate.**" in body


def test_doc_anchors_the_alerts_link_to_are_unique() -> None:
    heads = re.findall(r"(?m)^#{2,3} (.+)$", DOC.read_text())
    anchors = [slug(h) for h in heads]
    assert len(anchors) == len(set(anchors))
