"""The Grafana dashboard, alert rules and metric reference speak SPEC section 5 exactly.

Every PromQL expression must parse (promtool checks it as a recording rule) and may name only
the metrics, labels and label values SPEC section 5 defines, so a renamed metric or a typo in a
label value (`result="failure"` on heartbeats, which say `failed`) fails here instead of
drawing an empty panel or an alert that can never fire.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml

from connwatch._types import CloseReason, Direction, Liveness, Side

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "connwatch.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERTS_TEST = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
METRICS_DOC = ROOT / "docs" / "metrics.md"


class Metric(NamedTuple):
    type: str
    labels: dict[str, frozenset[str] | None]  # label -> allowed values (None: any)


_ANY = None
# Enum members hash by name, not value: collect the string values.
_REASONS = frozenset(r.value for r in CloseReason)
_DIRECTIONS = frozenset(d.value for d in Direction)
_SIDES = frozenset(s.value for s in Side)
_SUCCESS_FAILURE = frozenset({"success", "failure"})

SPEC_METRICS: dict[str, Metric] = {
    "connwatch_connections_active": Metric("gauge", {"listener": _ANY}),
    "connwatch_connections_accepted_total": Metric("counter", {"listener": _ANY}),
    "connwatch_connections_closed_total": Metric("counter", {"listener": _ANY, "reason": _REASONS}),
    "connwatch_connection_duration_seconds": Metric("histogram", {"listener": _ANY}),
    "connwatch_bytes_total": Metric("counter", {"listener": _ANY, "direction": _DIRECTIONS}),
    "connwatch_upstream_connections_active": Metric("gauge", {"listener": _ANY, "upstream": _ANY}),
    "connwatch_upstream_connect_duration_seconds": Metric(
        "histogram", {"listener": _ANY, "upstream": _ANY}
    ),
    "connwatch_upstream_connect_failures_total": Metric(
        "counter", {"listener": _ANY, "upstream": _ANY}
    ),
    "connwatch_upstream_up": Metric("gauge", {"listener": _ANY, "upstream": _ANY}),
    "connwatch_health_checks_total": Metric(
        "counter", {"listener": _ANY, "upstream": _ANY, "result": _SUCCESS_FAILURE}
    ),
    "connwatch_health_check_duration_seconds": Metric(
        "histogram", {"listener": _ANY, "upstream": _ANY}
    ),
    "connwatch_heartbeats_total": Metric(
        "counter", {"listener": _ANY, "result": frozenset({"ok", "failed"})}
    ),
    "connwatch_tcp_rtt_seconds": Metric("histogram", {"listener": _ANY, "side": _SIDES}),
    "connwatch_tcp_retransmits_total": Metric("counter", {"listener": _ANY, "side": _SIDES}),
    "connwatch_connections_liveness": Metric(
        "gauge", {"listener": _ANY, "state": frozenset(v.value for v in Liveness)}
    ),
    "connwatch_flow_paused_total": Metric("counter", {"listener": _ANY, "direction": _DIRECTIONS}),
    "connwatch_protocol_errors_total": Metric(
        "counter", {"kind": frozenset({"proxy_protocol", "heartbeat_frame"})}
    ),
    "connwatch_config_reloads_total": Metric("counter", {"result": _SUCCESS_FAILURE}),
    "connwatch_upgrades_total": Metric(
        "counter", {"role": frozenset({"handed_over", "took_over"}), "result": _SUCCESS_FAILURE}
    ),
    "connwatch_build_info": Metric("gauge", {"version": _ANY, "python": _ANY}),
    "connwatch_client_limit_rejections_total": Metric(
        "counter", {"listener": _ANY, "limit": frozenset({"max_connections", "connection_rate"})}
    ),
    "connwatch_clients_tracked": Metric("gauge", {"listener": _ANY}),
    "connwatch_listener_limit": Metric(
        "gauge",
        {
            "listener": _ANY,
            "limit": frozenset(
                {"max_connections", "client_max_connections", "client_connection_rate"}
            ),
        },
    ),
    "connwatch_upstream_ejections_total": Metric("counter", {"listener": _ANY, "upstream": _ANY}),
    "connwatch_upstream_pool_idle": Metric("gauge", {"listener": _ANY, "upstream": _ANY}),
    "connwatch_upstream_pool_borrows_total": Metric(
        "counter", {"listener": _ANY, "upstream": _ANY, "result": frozenset({"hit", "miss"})}
    ),
    "connwatch_upstream_pool_evictions_total": Metric(
        "counter",
        {
            "listener": _ANY,
            "upstream": _ANY,
            "reason": frozenset(
                {
                    "peer_closed",
                    "peer_reset",
                    "not_established",
                    "probe_failed",
                    "unexpected_data",
                    "max_idle_age",
                    "target_down",
                    "shutdown",
                }
            ),
        },
    ),
}

# Labels Prometheus or a scrape config attach to every series.
TARGET_LABELS = frozenset({"job", "instance", "namespace", "pod", "service"})
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

# What a Grafana variable stands for when its expression is checked outside Grafana.
GRAFANA_BUILTINS = {"__rate_interval": "1m", "__interval": "1m", "__range": "1h"}


# ---------------------------------------------------------------------------------- PromQL


def series_names() -> dict[str, str]:
    """Every series name a SPEC metric exposes -> the metric it belongs to."""
    names: dict[str, str] = {}
    for name, metric in SPEC_METRICS.items():
        if metric.type == "histogram":
            names.update({name + suffix: name for suffix in HISTOGRAM_SUFFIXES})
        else:
            names[name] = name
    return names


_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.:])([A-Za-z_:][\w:]*)(\s*\()?")
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"})
_SELECTOR = re.compile(r"(?<![\w.:])([A-Za-z_:][\w:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r'([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*"((?:\\.|[^"\\])*)"')
_GROUPING_LABELS = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def substitute_grafana_variables(expr: str) -> str:
    def replace(match: re.Match[str]) -> str:
        return GRAFANA_BUILTINS.get(match.group(1), "x")

    return re.sub(r"\$\{?(\w+)(?::\w+)?\}?", replace, expr)


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers that are not functions, keywords,
    label names, durations or strings."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", "{}", text)
    text = re.sub(r"\[[^\]]*\]", "[]", text)
    text = _GROUPING.sub(" ", text)
    text = re.sub(r"\boffset\s+-?\w+", " ", text)
    return {
        match.group(1)
        for match in _IDENTIFIER.finditer(text)
        if not match.group(2) and match.group(1).lower() not in _KEYWORDS
    }


def selectors(expr: str) -> Iterator[tuple[str, list[tuple[str, str, str]]]]:
    """(metric name, [(label, operator, value)]) for every `name{...}` in an expression."""
    for match in _SELECTOR.finditer(expr):
        yield match.group(1), _MATCHER.findall(match.group(2))


def matched_values(operator: str, value: str) -> set[str] | None:
    """The literal values a matcher picks, or None when it is a real regex (not checkable)."""
    if operator == "=":
        return {value}
    if operator == "=~" and re.fullmatch(r"[\w]+(\|[\w]+)*", value):
        return set(value.split("|"))
    return None


def check_expression(expr: str, recorded: frozenset[str] = frozenset()) -> list[str]:
    """Problems with an expression's metric names, label names and label values."""
    known = series_names()
    problems = [
        f"{name}: not a SPEC section 5 metric"
        for name in sorted(metric_names(expr))
        if name not in known and name not in recorded
    ]
    for name, matchers in selectors(expr):
        if name not in known:
            continue
        metric = SPEC_METRICS[known[name]]
        allowed = (
            set(metric.labels) | TARGET_LABELS | ({"le"} if name.endswith("_bucket") else set())
        )
        for label, operator, value in matchers:
            if label not in allowed:
                problems.append(f"{name}: no label {label!r}")
                continue
            values, choices = matched_values(operator, value), metric.labels.get(label)
            if values and choices is not None and not values <= choices:
                problems.append(f"{name}: {label} has no value {sorted(values - choices)}")
    return problems


def grouping_labels(expr: str) -> set[str]:
    return {
        label.strip()
        for group in _GROUPING_LABELS.findall(_STRING.sub('""', expr))
        for label in group.split(",")
        if label.strip()
    }


def promtool_check_expressions(exprs: dict[str, str], tmp_path: Path) -> None:
    """Parse every expression with promtool, as recording rules named by their key."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (not on PATH)")
    rules = {
        "groups": [{"name": "exprs", "rules": [{"record": k, "expr": e} for k, e in exprs.items()]}]
    }
    path = tmp_path / "exprs.rules.yml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr + path.read_text()


def test_expressions_yield_their_metric_names_and_spec_violations() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, side) (rate(connwatch_tcp_rtt_seconds_bucket{side="'
        'client", listener=~"a|b"}[5m] offset 1h))) / on (listener) group_left () up or vector(1e3)'
    )
    assert metric_names(expr) == {"connwatch_tcp_rtt_seconds_bucket", "up"}
    assert check_expression('connwatch_heartbeats_total{result="failure"}') == [
        "connwatch_heartbeats_total: result has no value ['failure']"
    ]
    assert check_expression("connwatch_tcp_rtt_seconds{le='1'}") == [
        "connwatch_tcp_rtt_seconds: not a SPEC section 5 metric"
    ]
    assert check_expression('connwatch_bytes_total{side="client"}') == [
        "connwatch_bytes_total: no label 'side'"
    ]


# ---------------------------------------------------------------------------------- dashboard


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded = json.loads(DASHBOARD.read_text())
    assert isinstance(loaded, dict)
    return loaded


def all_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # panels inside collapsed rows


def dashboard_expressions(dashboard: dict[str, Any]) -> dict[str, str]:
    """Recording-rule-safe key -> expression with Grafana variables substituted."""
    return {
        f"dashboard:panel_{panel['id']}_{target['refId']}": substitute_grafana_variables(
            target["expr"]
        )
        for panel in all_panels(dashboard)
        for target in panel.get("targets", [])
    }


def test_dashboard_panels_have_unique_ids_fit_the_grid_and_use_the_datasource(
    dashboard: dict[str, Any],
) -> None:
    assert dashboard["uid"] == "connwatch"
    assert dashboard["title"]
    ids = [panel["id"] for panel in all_panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in all_panels(dashboard):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_dashboard_is_templated_by_listener(dashboard: dict[str, Any]) -> None:
    variables = {var["name"]: var for var in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["listener"]["includeAll"] is True
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            for name, _ in selectors(substitute_grafana_variables(target["expr"])):
                metric = SPEC_METRICS[series_names()[name]]
                if "listener" in metric.labels:
                    assert "$listener" in target["expr"], f"{panel['title']}: {target['expr']}"


def test_dashboard_covers_the_operator_views(dashboard: dict[str, Any]) -> None:
    used = {
        series_names().get(name, name)
        for expr in dashboard_expressions(dashboard).values()
        for name in metric_names(expr)
    }
    assert set(SPEC_METRICS) <= used, f"not on the dashboard: {set(SPEC_METRICS) - used}"
    types = {panel["type"] for panel in all_panels(dashboard)}
    assert "heatmap" in types  # connection duration


def test_dashboard_expressions_parse(dashboard: dict[str, Any], tmp_path: Path) -> None:
    promtool_check_expressions(dashboard_expressions(dashboard), tmp_path)


def test_dashboard_names_only_spec_metrics(dashboard: dict[str, Any]) -> None:
    problems = {
        key: found
        for key, expr in dashboard_expressions(dashboard).items()
        if (found := check_expression(expr))
    }
    assert not problems
    for expr in dashboard_expressions(dashboard).values():
        assert metric_names(expr), f"selects no metric: {expr}"


def test_dashboard_variables_query_spec_metrics(dashboard: dict[str, Any]) -> None:
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]["query"]
        match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query)
        assert match, query
        selector, label = substitute_grafana_variables(match.group(1)), match.group(2)
        assert not check_expression(selector), query
        (name,) = metric_names(selector)
        assert label in set(SPEC_METRICS[name].labels) | TARGET_LABELS


def test_dashboard_groups_by_known_labels(dashboard: dict[str, Any]) -> None:
    known = (
        {"le"}
        | TARGET_LABELS
        | {label for metric in SPEC_METRICS.values() for label in metric.labels}
    )
    for expr in dashboard_expressions(dashboard).values():
        assert grouping_labels(expr) <= known, expr


# ---------------------------------------------------------------------------------- alerts


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_alerts_name_only_spec_metrics() -> None:
    rules = alert_rules()
    recorded = frozenset(rule["record"] for rule in rules if "record" in rule)
    for rule in rules:
        assert not check_expression(rule["expr"], recorded), rule.get("alert", rule.get("record"))
        assert metric_names(rule["expr"]) or "vector(" in rule["expr"]
    for name in recorded:
        assert name.startswith("connwatch:"), "recording rules follow level:metric:operations"


def test_alert_unit_test_series_are_spec_metrics() -> None:
    for test in yaml.safe_load(ALERTS_TEST.read_text())["tests"]:
        for series in test["input_series"]:
            assert not check_expression(series["series"]), series["series"]


# ---------------------------------------------------------------------------------- docs


def metrics_doc_rows() -> dict[str, list[str]]:
    """First-column metric name -> the row's cells, from docs/metrics.md's tables."""
    rows: dict[str, list[str]] = {}
    for line in METRICS_DOC.read_text().splitlines():
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if cells and (match := re.fullmatch(r"`(connwatch_\w+)`", cells[0])):
            assert match.group(1) not in rows, f"{match.group(1)} listed twice"
            rows[match.group(1)] = cells
    return rows


def test_metrics_doc_lists_every_spec_metric() -> None:
    rows = metrics_doc_rows()
    assert set(rows) == set(SPEC_METRICS)
    for name, cells in rows.items():
        metric = SPEC_METRICS[name]
        assert cells[1].startswith(metric.type), f"{name}: type {cells[1]!r}"
        documented = set(re.findall(r"`(\w+)`", cells[2]))
        assert documented == set(metric.labels), f"{name}: labels {cells[2]!r}"


def test_metrics_doc_examples_parse(tmp_path: Path) -> None:
    examples: dict[str, str] = {}
    for name, cells in metrics_doc_rows().items():
        found = re.findall(r"`([^`]+)`", cells[-1].replace("\\|", "|"))
        assert found, f"{name}: no example PromQL"
        for index, expr in enumerate(found):
            assert not check_expression(expr), expr
            assert any(series_names().get(n) == name for n in metric_names(expr)), expr
            examples[f"doc:{name}_{index}"] = expr
    promtool_check_expressions(examples, tmp_path)
