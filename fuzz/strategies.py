"""Hypothesis strategies producing inputs in the targets' byte format (fuzz/targets.py).

Biased towards the interesting: valid headers and frames with damage, YAML configs that are
a complete valid config with a few fields replaced, removed or added.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml
from hypothesis import strategies as st

from connwatch.wire import proxy_protocol
from connwatch.wire.heartbeat_frame import FRAME_SIZE, Frame, FrameType, encode

# -- chunked streams ----------------------------------------------------------------------------
cut_sizes = st.lists(st.integers(min_value=0, max_value=255), max_size=7)


def with_cuts(payload: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """Prefix a payload with the chunking header split_input() reads."""
    return st.builds(lambda cuts, body: bytes([len(cuts), *cuts]) + body, cut_sizes, payload)


@st.composite
def damaged(draw: st.DrawFn, valid: bytes) -> bytes:
    """`valid` with a few bytes flipped, cut, inserted or a random tail."""
    data = bytearray(valid)
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "tail"]))
        at = draw(st.integers(min_value=0, max_value=max(0, len(data) - 1)))
        if op == "flip" and data:
            data[at] ^= draw(st.integers(min_value=1, max_value=255))
        elif op == "cut":
            del data[at : at + draw(st.integers(min_value=1, max_value=8))]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            data += draw(st.binary(max_size=32))
    return bytes(data)


# -- heartbeat frames ---------------------------------------------------------------------------
frames = st.builds(
    Frame,
    st.sampled_from(list(FrameType)),
    st.integers(min_value=0, max_value=2**64 - 1),
)
frame_stream = st.lists(frames, max_size=6).map(lambda fs: b"".join(encode(f) for f in fs))
frames_inputs = with_cuts(
    st.one_of(
        frame_stream,
        frame_stream.flatmap(damaged),
        st.binary(max_size=4 * FRAME_SIZE),
    )
)

# -- PROXY protocol -----------------------------------------------------------------------------
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ports = st.integers(min_value=0, max_value=65535)
endpoints_v4 = st.tuples(ipv4, ports)
endpoints_v6 = st.tuples(ipv6, ports)
address_pairs = st.one_of(
    st.tuples(endpoints_v4, endpoints_v4), st.tuples(endpoints_v6, endpoints_v6)
)
valid_headers = st.one_of(
    address_pairs.map(lambda p: proxy_protocol.encode_v1(*p)),
    address_pairs.map(lambda p: proxy_protocol.encode_v2(*p)),
    st.just(proxy_protocol.encode_v1(None, None)),
    st.just(proxy_protocol.encode_v2(None, None)),
    st.just(proxy_protocol.encode_v2(None, None, local=True)),
)
proxy_inputs = with_cuts(
    st.one_of(
        st.tuples(valid_headers, st.binary(max_size=16)).map(b"".join),
        valid_headers.flatmap(damaged),
        st.binary(max_size=120).map(lambda b: proxy_protocol.V2_SIGNATURE + b),
        st.text(alphabet="PROXYTCP46UNKNOW 0123456789.:abcdef\r\n", max_size=110).map(
            lambda t: b"PROXY " + t.encode()
        ),
        st.binary(max_size=64),
    )
)

# -- configuration ------------------------------------------------------------------------------
FULL_CONFIG: dict[str, Any] = {
    "admin": {"listen": "127.0.0.1:9464", "token": "s3cret-token", "heartbeat_listen": None},
    "log": {"level": "info", "format": "json", "connection_events": True, "progress_interval": "0s"},
    "shutdown": {"drain_timeout": "30s", "quiet_close": True, "quiet_period": "500ms", "close_rate": 0},
    "workers": 1,
    "listeners": [
        {
            "name": "app",
            "listen": "0.0.0.0:7000",
            "upstreams": ["127.0.0.1:6379", "[::1]:6380"],
            "balance": "round_robin",
            "connect_timeout": "3s",
            "connect_attempts": 2,
            "max_connections": 10000,
            "idle_timeout": "0s",
            "half_close_timeout": "0s",
            "max_lifetime": "0s",
            "on_upstream_down": "keep",
            "buffer_size": "256KiB",
            "proxy_protocol": {"accept": False, "send": "none"},
            "keepalive": {
                "client": {"enabled": True, "idle": "60s", "interval": "10s", "count": 5,
                           "user_timeout": "0s", "path_idle_limit": "350s"},
                "upstream": {"enabled": True, "idle": "60s", "interval": "10s", "count": 5,
                             "user_timeout": "0s"},
            },
            "heartbeat": {"enabled": True, "interval": "5s", "max_interval": "30s",
                          "failure_threshold": 3, "stall_timeout": "30s"},
            "health_check": {
                "enabled": True, "type": "tcp", "interval": "5s", "max_interval": "30s",
                "timeout": "2s", "rise": 2, "fall": 3, "port": None,
                "http": {"path": "/healthz", "scheme": "http", "host": None,
                         "expected_status": "200-399"},
                "send_expect": {"send": "PING\\r\\n", "expect": "+PONG"},
            },
        },
        {"name": "b", "listen": "unix:/tmp/cw.sock", "upstreams": ["unix:/run/up.sock"]},
    ],
}  # fmt: skip

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=16),
    st.sampled_from(
        ["0", "-1s", "1e309s", "5 s", "1.5ms", "1h30m", "auto", "64KB", "1KiB", "0x10", ":0",
         "[::1]", "[::1]:99999", "unix:", "re:(", "re:.*", "\\x0", "\\xzz", "200-100", "999",
         "nan", "inf", "yes", "~", "\u00e9", "\x00"]
    ),
)  # fmt: skip
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _paths(value, (*prefix, i))
    return out


PATHS = _paths(FULL_CONFIG)


@st.composite
def mutated_configs(draw: st.DrawFn) -> dict[str, Any]:
    """The full config with 1-4 edits: a value replaced, a key removed, or a key added."""
    config = copy.deepcopy(FULL_CONFIG)
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        path = draw(st.sampled_from(PATHS))
        parent: Any = config
        try:
            for part in path[:-1]:
                parent = parent[part]
            op = draw(st.sampled_from(["replace", "remove", "add"]))
            if op == "replace":
                parent[path[-1]] = draw(VALUES)
            elif op == "remove":
                del parent[path[-1]]
            elif isinstance(parent, dict):
                parent[draw(st.text(max_size=8))] = draw(VALUES)
            elif isinstance(parent, list):
                parent.append(draw(VALUES))
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit removed or replaced this path
    return config


def _dump(config: Any) -> bytes:
    return yaml.safe_dump(config, allow_unicode=True).encode("utf-8", "surrogatepass")


config_inputs = st.one_of(
    mutated_configs().map(_dump),
    mutated_configs().map(_dump).flatmap(damaged),
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
)

INPUTS: dict[str, st.SearchStrategy[bytes]] = {
    "proxy": proxy_inputs,
    "frames": frames_inputs,
    "config": config_inputs,
}
