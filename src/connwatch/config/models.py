"""The configuration: pydantic models (SPEC section 3), YAML + environment loading, error report.

Models are frozen and forbid unknown keys. `load_settings()` is the one way in from a file; it
raises `ConfigError` listing every problem, each naming file, line, field path, what was given
and what is allowed. `effective_yaml()` prints a loaded config back with every default filled in;
`config_warnings()` points out settings that are valid but cannot work as meant.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import re
import reprlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    SecretStr,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from connwatch._types import Address
from connwatch.config.units import (
    UnitError,
    format_duration,
    format_size,
    parse_duration,
    parse_size,
)
from connwatch.exceptions import ConfigError

__all__ = [
    "AddressField",
    "AdminConfig",
    "ConfigError",
    "Duration",
    "HealthCheckConfig",
    "HeartbeatConfig",
    "HttpCheckConfig",
    "KeepaliveConfig",
    "KeepaliveLegs",
    "ListenerConfig",
    "LogConfig",
    "ProxyProtocolConfig",
    "SendExpectConfig",
    "Settings",
    "ShutdownConfig",
    "Size",
    "config_warnings",
    "decode_escapes",
    "effective_yaml",
    "encode_escapes",
    "load_settings",
    "one_listener_config",
]

Loc = tuple[str | int, ...]
ENV_PREFIX = "CONNWATCH_"
#: CONNWATCH_* variables that are not field overrides (the CLI reads them itself).
NON_OVERRIDE_VARS = frozenset({"CONNWATCH_CONFIG"})


# --- field types --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Kind:
    """Marks an Annotated type with the name the reference docs show for it."""

    name: str


def _reason(exc: ValueError, given: object) -> str:
    """The message without the leading repr of the input: the report shows the input itself."""
    if isinstance(exc, UnitError):
        return exc.reason
    text, prefix = str(exc), f"{given!r}: "
    return text[len(prefix) :] if text.startswith(prefix) else text


def _to_duration(value: object) -> float:
    if isinstance(value, str | int | float):
        try:
            return parse_duration(value)
        except UnitError as exc:
            raise ValueError(exc.reason) from None
    raise ValueError("expected a duration like 250ms, 5s, 2m, 1h or a number of seconds")


def _to_size(value: object) -> int:
    if isinstance(value, str | int):
        try:
            return parse_size(value)
        except UnitError as exc:
            raise ValueError(exc.reason) from None
    raise ValueError("expected a size like 4096, 64KiB or 1MiB")


def _to_address(value: object) -> Address:
    if isinstance(value, Address):
        return value
    if not isinstance(value, str):
        raise ValueError("expected an address: HOST:PORT, [IPv6]:PORT, :PORT or unix:/path")
    try:
        return Address.parse(value)
    except ValueError as exc:
        raise ValueError(_reason(exc, value.strip())) from None


def _positive(seconds: float) -> float:
    if seconds <= 0:
        raise ValueError("must be more than 0s")
    return seconds


def _keepalive_seconds(seconds: float) -> float:
    # The kernel counts TCP_KEEPIDLE / TCP_KEEPINTVL in whole seconds, 1 to 32767.
    if not seconds.is_integer() or not 1 <= seconds <= 32767:
        raise ValueError("keep-alive timers are whole seconds from 1s to 32767s")
    return seconds


def _user_timeout(seconds: float) -> float:
    if seconds * 1000 > 2**31 - 1:  # TCP_USER_TIMEOUT is a signed 32-bit count of milliseconds
        raise ValueError(
            "must be at most 2147483s (TCP_USER_TIMEOUT is a 32-bit millisecond count)"
        )
    return seconds


def _buffer_size(size: int) -> int:
    if size < 4096:
        raise ValueError("must be at least 4KiB")
    return size


def _data_path(path: str) -> str:
    # `auto` falls back by itself; asking for `splice` where it cannot exist is a config error.
    if path == "splice" and not hasattr(os, "splice"):
        raise ValueError("splice needs Linux (os.splice); use auto or portable here")
    return path


def _upstream_address(address: Address) -> Address:
    if not address.is_unix and (not address.host or address.port == 0):
        raise ValueError("an upstream needs a host and a port from 1 to 65535")
    return address


def _listener_name(name: str) -> str:
    if re.fullmatch(r"[a-z0-9_-]+", name) is None:
        raise ValueError("use only lowercase letters, digits, '_' and '-' (it is a metric label)")
    return name


def _non_empty_secret(secret: SecretStr) -> SecretStr:
    if not secret.get_secret_value():
        raise ValueError("must not be empty; write null for no token")
    return secret


def _workers(value: object) -> object:
    return (os.cpu_count() or 1) if value == "auto" else value


Duration = Annotated[
    float,
    BeforeValidator(_to_duration),
    PlainSerializer(format_duration, return_type=str, when_used="json"),
    Kind("duration"),
]
PositiveDuration = Annotated[Duration, AfterValidator(_positive)]
KeepaliveSeconds = Annotated[Duration, AfterValidator(_keepalive_seconds)]
Size = Annotated[
    int,
    BeforeValidator(_to_size),
    PlainSerializer(format_size, return_type=str, when_used="json"),
    Kind("size"),
]
AddressField = Annotated[
    Address,
    PlainValidator(_to_address),
    PlainSerializer(str, return_type=str, when_used="json"),
    Kind("address"),
]
UpstreamAddress = Annotated[AddressField, AfterValidator(_upstream_address)]
Port = Annotated[StrictInt, Field(ge=1, le=65535)]
Count = Annotated[StrictInt, Field(ge=1)]
Token = Annotated[SecretStr, AfterValidator(_non_empty_secret)]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _order_error(field: str, given: float, smaller: str, value: float) -> PydanticCustomError:
    return PydanticCustomError(
        "interval_order",
        "must be at least {smaller} ({value}); equal means a fixed interval",
        {
            "field": field,
            "given": format_duration(given),
            "smaller": smaller,
            "value": format_duration(value),
        },
    )


# --- the models (field order and defaults are SPEC section 3) ---------------------------------


class KeepaliveConfig(_Model):
    enabled: StrictBool = Field(default=True, description="Turn on TCP keep-alive (SO_KEEPALIVE).")
    idle: KeepaliveSeconds = Field(
        default=60.0,
        description="Silence before the first probe (TCP_KEEPIDLE); whole seconds, 1s to 32767s.",
    )
    interval: KeepaliveSeconds = Field(
        default=10.0,
        description="Time between probes (TCP_KEEPINTVL); whole seconds, 1s to 32767s.",
    )
    count: Annotated[StrictInt, Field(ge=1, le=127)] = Field(
        default=5,
        description="Unanswered probes before the connection is dropped (TCP_KEEPCNT), 1 to 127.",
    )
    user_timeout: Annotated[Duration, AfterValidator(_user_timeout)] = Field(
        default=0.0,
        description="TCP_USER_TIMEOUT (Linux): how long sent data, or keep-alive probes, may go "
        "unacknowledged before the connection is dropped; 0 = kernel default. When set, it "
        "replaces `count` as the keep-alive limit.",
    )
    path_idle_limit: PositiveDuration | None = Field(
        default=None,
        description="The idle limit of a NAT, load balancer or conntrack on this path, if known; "
        "only used to warn when keep-alive cannot keep the path open.",
    )


class KeepaliveLegs(_Model):
    client: KeepaliveConfig = Field(
        default=KeepaliveConfig(), description="Keep-alive for accepted client sockets."
    )
    upstream: KeepaliveConfig = Field(
        default=KeepaliveConfig(), description="Keep-alive for sockets to upstream targets."
    )


class HeartbeatConfig(_Model):
    enabled: StrictBool = Field(
        default=True, description="Run the per-connection liveness watchdog."
    )
    interval: PositiveDuration = Field(default=5.0, description="First and fastest beat.")
    max_interval: PositiveDuration = Field(
        default=30.0,
        description="Adaptive: each passing beat multiplies the interval by 1.5 up to this; "
        "equal to `interval` means fixed. At least `interval`.",
    )
    failure_threshold: Count = Field(
        default=3,
        description="Consecutive failed beats before the connection is closed (`heartbeat_failed`).",
    )
    stall_timeout: PositiveDuration = Field(
        default=30.0,
        description="Bytes in flight with no ACK progress this long make a failed beat.",
    )

    @model_validator(mode="after")
    def _intervals_in_order(self) -> HeartbeatConfig:
        if self.max_interval < self.interval:
            raise _order_error("max_interval", self.max_interval, "interval", self.interval)
        return self


@functools.lru_cache(maxsize=64)
def _status_ranges(text: str) -> tuple[tuple[int, int], ...]:
    """`200-399,404` -> ((200, 399), (404, 404)); ValueError says what is allowed."""
    ranges = []
    for part in text.split(","):
        low, sep, high = part.strip().partition("-")
        if not low.strip().isdigit() or (sep and not high.strip().isdigit()):
            raise ValueError(
                f"{part.strip()!r} is not a status or range; write codes and ranges like 200-399,404"
            )
        first, last = int(low), int(high) if sep else int(low)
        if not 100 <= first <= last <= 599:
            raise ValueError(f"{part.strip()!r}: codes run from 100 to 599, low to high")
        ranges.append((first, last))
    return tuple(ranges)


def _expected_status(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise ValueError("expected status codes and ranges like 200-399,404")
    _status_ranges(value)
    return value


class HttpCheckConfig(_Model):
    path: StrictStr = Field(default="/healthz", description="Request path of the HTTP check.")
    scheme: Literal["http", "https"] = Field(default="http", description="`http` or `https`.")
    host: StrictStr | None = Field(
        default=None, description="Host header to send; null = the target's address."
    )
    expected_status: Annotated[str, PlainValidator(_expected_status), Kind("status codes")] = Field(
        default="200-399",
        description="Status codes that count as healthy: codes and ranges, comma-separated, "
        "e.g. `200-399,404`.",
    )

    @model_validator(mode="after")
    def _path_is_absolute(self) -> HttpCheckConfig:
        if not self.path.startswith("/"):
            raise PydanticCustomError(
                "http_path", "must start with '/'", {"field": "path", "given": self.path}
            )
        return self

    def status_ok(self, code: int) -> bool:
        """True when `code` is within one of the `expected_status` ranges."""
        return any(low <= code <= high for low, high in _status_ranges(self.expected_status))


_ESCAPES = {"r": b"\r", "n": b"\n", "t": b"\t", "\\": b"\\", "0": b"\0"}
_ESCAPE_RE = re.compile(r"\\(x[0-9a-fA-F]{2}|[rnt0\\])")


def decode_escapes(text: str) -> bytes:
    r"""`PING\r\n` -> b"PING\r\n": `\r \n \t \0 \\ \xNN` are decoded, the rest is UTF-8.

    ValueError for a backslash that starts no known escape.
    """
    _check_escapes(text)
    out, pos = bytearray(), 0
    for match in _ESCAPE_RE.finditer(text):
        out += text[pos : match.start()].encode("utf-8", "strict")
        code = match.group(1)
        out += bytes([int(code[1:], 16)]) if code[0] == "x" else _ESCAPES[code]
        pos = match.end()
    return bytes(out + text[pos:].encode("utf-8", "strict"))


def _check_escapes(text: str) -> None:
    """Refuse a backslash that starts no known escape (a typo would otherwise go on the wire)."""
    pos = 0
    while (pos := text.find("\\", pos)) >= 0:
        match = _ESCAPE_RE.match(text, pos)
        if match is None:
            raise ValueError(
                f"unknown escape '{text[pos : pos + 2]}'; allowed: \\r \\n \\t \\0 \\\\ \\xNN"
            )
        pos = match.end()


_ESCAPE_NAMES = {ord("\r"): "\\r", ord("\n"): "\\n", ord("\t"): "\\t", 0: "\\0", ord("\\"): "\\\\"}


def encode_escapes(data: bytes) -> str:
    r"""The canonical escaped text of `data`: printable ASCII as is, `\r \n \t \0 \\`, else `\xNN`."""
    return "".join(
        _ESCAPE_NAMES.get(byte) or (chr(byte) if 0x20 <= byte < 0x7F else f"\\x{byte:02x}")
        for byte in data
    )


def _escaped_text(value: object) -> str:
    """Canonical escaped text, so that `"PING\r\n"` (YAML double quotes: real CR LF) and
    `PING\r\n` (backslashes) give equal configs: they send the same bytes."""
    if not isinstance(value, str):
        raise ValueError("expected text (escapes \\r \\n \\t \\0 \\\\ \\xNN allowed)")
    try:
        return encode_escapes(decode_escapes(value))
    except UnicodeEncodeError:
        raise ValueError("contains characters that are not valid Unicode") from None


def _expect_text(value: object) -> str:
    if isinstance(value, str) and value.startswith("re:"):
        try:
            _expect_regex(value[3:])
        except UnicodeEncodeError:
            raise ValueError("contains characters that are not valid Unicode") from None
        except re.error as exc:
            raise ValueError(f"the regular expression does not compile: {exc}") from None
        return value
    return _escaped_text(value)


@functools.lru_cache(maxsize=64)
def _expect_regex(pattern: str) -> re.Pattern[bytes]:
    return re.compile(pattern.encode("utf-8", "strict"))


class SendExpectConfig(_Model):
    send: Annotated[str, PlainValidator(_escaped_text), Kind("escaped text")] = Field(
        default="PING\\r\\n",
        description="Bytes to send, exactly, after escapes (`\\r \\n \\t \\0 \\\\ \\xNN`); "
        "nothing is added.",
    )
    expect: Annotated[str, PlainValidator(_expect_text), Kind("escaped text or re:")] = Field(
        default="+PONG",
        description="The reply must start with these bytes (escapes as for `send`), or, when "
        "written `re:PATTERN`, contain a match of that regular expression.",
    )

    @property
    def send_bytes(self) -> bytes:
        return decode_escapes(self.send)

    @property
    def expect_regex(self) -> re.Pattern[bytes] | None:
        """The compiled pattern when `expect` is written `re:…`, else None."""
        return _expect_regex(self.expect[3:]) if self.expect.startswith("re:") else None

    @property
    def expect_bytes(self) -> bytes | None:
        """The prefix the reply must start with, or None when `expect` is a regex."""
        return None if self.expect.startswith("re:") else decode_escapes(self.expect)

    def matches(self, reply: bytes) -> bool:
        """Prefix match of the decoded `expect`, or a regex search when written `re:…`."""
        regex = self.expect_regex
        if regex is not None:
            return regex.search(reply) is not None
        return reply.startswith(decode_escapes(self.expect))


class HealthCheckConfig(_Model):
    enabled: StrictBool = Field(default=True, description="Actively check every upstream target.")
    type: Literal["tcp", "http", "send_expect", "heartbeat"] = Field(
        default="tcp",
        description="`tcp` connect only; `http` request; `send_expect` send bytes, match the "
        "reply; `heartbeat` PING/PONG frame (SPEC section 7).",
    )
    interval: PositiveDuration = Field(default=5.0, description="Time between checks, at first.")
    max_interval: PositiveDuration = Field(
        default=30.0,
        description="Adaptive, as for heartbeat: passing checks stretch the interval up to "
        "this. At least `interval`.",
    )
    timeout: PositiveDuration = Field(
        default=2.0, description="A check not done in this time failed."
    )
    rise: Count = Field(default=2, description="Consecutive successes to mark a target UP.")
    fall: Count = Field(default=3, description="Consecutive failures to mark a target DOWN.")
    port: Port | None = Field(
        default=None,
        description="Check this port of the target instead of its own; null = same port.",
    )
    http: HttpCheckConfig = Field(
        default=HttpCheckConfig(), description="Settings of the `http` check."
    )
    send_expect: SendExpectConfig = Field(
        default=SendExpectConfig(), description="Settings of the `send_expect` check."
    )

    @model_validator(mode="after")
    def _intervals_in_order(self) -> HealthCheckConfig:
        if self.max_interval < self.interval:
            raise _order_error("max_interval", self.max_interval, "interval", self.interval)
        return self


class ProxyProtocolConfig(_Model):
    accept: StrictBool = Field(
        default=False,
        description="Clients send a PROXY v1/v2 header first (within `connect_timeout`).",
    )
    send: Literal["none", "v1", "v2"] = Field(
        default="none", description="PROXY header sent to the upstream: `none`, `v1` or `v2`."
    )


class ListenerConfig(_Model):
    name: Annotated[StrictStr, AfterValidator(_listener_name)] = Field(
        description="Unique, `[a-z0-9_-]+`; the `listener` metric label."
    )
    listen: AddressField = Field(description="Where clients connect.")
    upstreams: tuple[UpstreamAddress, ...] = Field(
        min_length=1, description="One or more targets to forward to, in order (`first` balancing)."
    )
    balance: Literal["round_robin", "least_connections", "first"] = Field(
        default="round_robin", description="How a healthy target is picked for each new connection."
    )
    connect_timeout: PositiveDuration = Field(
        default=3.0, description="Time allowed for one connect attempt (and for a PROXY header)."
    )
    connect_attempts: Annotated[StrictInt, Field(ge=1, le=100)] = Field(
        default=2,
        description="Tries across healthy targets before giving up (`upstream_connect_failed`); "
        "1 to 100.",
    )
    max_connections: Count = Field(
        default=10000,
        description="Open connections allowed; beyond it new clients are closed at once.",
    )
    idle_timeout: Duration = Field(
        default=0.0, description="0 = never; else close when no byte moved either way this long."
    )
    half_close_timeout: Duration = Field(
        default=0.0, description="0 = never; else close a half-closed connection idle this long."
    )
    max_lifetime: Duration = Field(
        default=0.0, description="0 = never; else close at this age (±10% jitter), at a quiet gap."
    )
    on_upstream_down: Literal["keep", "close"] = Field(
        default="keep", description="`close`: close connections to a target when it is marked DOWN."
    )
    buffer_size: Annotated[Size, AfterValidator(_buffer_size)] = Field(
        default=256 * 1024,
        description="Per-direction high-water mark before reading pauses; at least 4KiB.",
    )
    data_path: Annotated[Literal["portable", "splice", "auto"], AfterValidator(_data_path)] = Field(
        default="portable",
        description="splice: zero-copy os.splice socket→pipe→socket on Linux; auto: splice "
        "where available; portable: asyncio BufferedProtocol",
    )
    proxy_protocol: ProxyProtocolConfig = Field(
        default=ProxyProtocolConfig(), description="PROXY protocol on either leg."
    )
    keepalive: KeepaliveLegs = Field(
        default=KeepaliveLegs(), description="Socket keep-alive options per leg."
    )
    heartbeat: HeartbeatConfig = Field(
        default=HeartbeatConfig(), description="The per-connection liveness watchdog."
    )
    health_check: HealthCheckConfig = Field(
        default=HealthCheckConfig(), description="Active checks of every upstream target."
    )


class AdminConfig(_Model):
    listen: AddressField = Field(
        default=Address("127.0.0.1", 9464),
        description="The admin HTTP endpoint: /metrics /healthz /readyz /connections.",
    )
    token: Token | None = Field(
        default=None,
        description='If set, mutating endpoints need "Authorization: Bearer <token>"; shown '
        "as `***` by check-config.",
    )
    heartbeat_listen: AddressField | None = Field(
        default=None, description="If set, answer heartbeat PING frames here (SPEC section 7)."
    )


class LogConfig(_Model):
    level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Lowest level logged."
    )
    format: Literal["json", "console"] = Field(
        default="json", description="`json`: one object a line on stdout; `console`: for humans."
    )
    connection_events: StrictBool = Field(
        default=True, description="Log `connection_opened` / `connection_closed`."
    )
    progress_interval: Duration = Field(
        default=0.0,
        description="0 = off; else a `connection_progress` line this often per connection.",
    )
    connection_events_limit: Annotated[int, Field(ge=0, strict=True)] = Field(
        default=0,
        description="Most `connection_opened`/`connection_closed` lines a second (0 = no limit); "
        "beyond it they are counted and summed up once a second in `connection_events_suppressed`.",
    )


class ShutdownConfig(_Model):
    drain_timeout: Duration = Field(
        default=30.0, description="On SIGTERM: stop accepting, wait this long, then close the rest."
    )
    quiet_close: StrictBool = Field(
        default=True, description="While draining, close each connection at its first quiet gap."
    )
    quiet_period: PositiveDuration = Field(
        default=0.5,
        description="A quiet gap: no bytes either way this long, nothing unsent or unacked.",
    )
    close_rate: Annotated[float, Field(ge=0, allow_inf_nan=False, strict=True)] = Field(
        default=0.0,
        description="At the deadline, close at most this many per second; 0 = all at once.",
    )


class Settings(BaseSettings):
    """The whole configuration. Environment overrides are applied by `load_settings()`."""

    model_config = SettingsConfigDict(frozen=True, extra="forbid")

    admin: AdminConfig = Field(default=AdminConfig(), description="The admin endpoint.")
    log: LogConfig = Field(default=LogConfig(), description="Logging.")
    shutdown: ShutdownConfig = Field(
        default=ShutdownConfig(), description="Graceful shutdown on SIGTERM."
    )
    workers: Annotated[
        StrictInt, BeforeValidator(_workers), Field(ge=1, le=1024), Kind("integer or `auto`")
    ] = Field(
        default=1,
        description='Processes sharing the listeners (SO_REUSEPORT), 1 to 1024; "auto" = one '
        "per CPU core.",
    )
    listeners: tuple[ListenerConfig, ...] = Field(
        min_length=1, description="One or more listeners."
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Only what the caller passes: load_settings() applies the environment itself, so it can
        # index into lists and say which variable a bad value came from.
        return (init_settings,)

    @model_validator(mode="after")
    def _unique(self) -> Settings:
        names = [listener.name for listener in self.listeners]
        for index, name in enumerate(names):
            if name in names[:index]:
                raise PydanticCustomError(
                    "duplicate_listener_name",
                    "duplicate listener name, already used by listeners[{first}]",
                    {"field": (index, "name"), "given": name, "first": names.index(name)},
                )
        seen: dict[Address, Loc] = {}
        for loc, address in self._bound_addresses():
            if address.is_unix or address.port != 0:  # port 0: each bind gets its own port
                if address in seen:
                    raise PydanticCustomError(
                        "duplicate_listen",
                        "address already used by {other}",
                        {"field": loc, "given": str(address), "other": format_loc(seen[address])},
                    )
                seen[address] = loc
        return self

    def _bound_addresses(self) -> Iterator[tuple[Loc, Address]]:
        yield ("admin", "listen"), self.admin.listen
        if self.admin.heartbeat_listen is not None:
            yield ("admin", "heartbeat_listen"), self.admin.heartbeat_listen
        for index, listener in enumerate(self.listeners):
            yield ("listeners", index, "listen"), listener.listen


# --- loading ------------------------------------------------------------------------------------

_ABSENT = object()
_MAX_ISSUES = 200
_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60
_short.maxlist = _short.maxdict = 4
_short.maxlevel = 2


@dataclass
class _Where:
    """Where each part of the data came from: line numbers in the file, environment variables."""

    source: str
    value_lines: dict[Loc, int]
    key_lines: dict[Loc, int]
    env: dict[Loc, str]

    def describe(self, loc: Loc, *, at_key: bool = False) -> str:
        for end in range(len(loc), -1, -1):
            if loc[:end] in self.env:
                return f"environment variable {self.env[loc[:end]]}"
        line = self.key_lines.get(loc) if at_key else None
        for end in range(len(loc), -1, -1):
            if line is not None:
                break
            line = self.value_lines.get(loc[:end])
        return f"{self.source}:{line}" if line is not None else self.source

    def line(self, loc: Loc) -> int:
        """The line to sort a report by: the place itself or its nearest known parent."""
        for end in range(len(loc), -1, -1):
            found = self.key_lines.get(loc[:end]) or self.value_lines.get(loc[:end])
            if found is not None:
                return found
        return 0


@dataclass
class _Problem:
    loc: Loc
    message: str
    given: object = _ABSENT
    at_key: bool = False
    kind: str = ""


def format_loc(loc: Loc) -> str:
    """("listeners", 0, "heartbeat", "interval") -> "listeners[0].heartbeat.interval"."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _show(value: object) -> str:
    """The given value, short, spelled as in YAML where that differs from Python."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, str) and value.isprintable():
        return f"'{value}'" if len(value) <= 60 else f"'{value[:57]}...'"
    try:
        return _short.repr(value)
    except Exception:  # a value whose repr fails (huge int, odd object) must not hide the report
        return f"<{type(value).__name__}>"


def _issue(problem: _Problem, where: _Where) -> str:
    place = where.describe(problem.loc, at_key=problem.at_key)
    given = "" if problem.given is _ABSENT else f" = {_show(problem.given)}"
    if "token" in problem.loc and given:
        given = " = ***"
    return f"{place}: {format_loc(problem.loc)}{given}: {problem.message}"


def _read_yaml(path: str | os.PathLike[str], source: str) -> tuple[object, _Where, list[str]]:
    try:
        with open(path, "rb") as stream:
            raw = stream.read()
    except FileNotFoundError:
        raise ConfigError([f"{source}: file not found"], source) from None
    except OSError as exc:
        raise ConfigError([f"{source}: cannot read: {exc.strerror or exc}"], source) from None
    try:
        node, data = _compose(raw)
    except yaml.MarkedYAMLError as exc:
        raise ConfigError([_syntax_issue(exc, source)], source) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source}: YAML error: {exc}"], source) from None
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. a date like 2024-02-30
        raise ConfigError([f"{source}: a value cannot be read: {exc}"], source) from None
    except RecursionError:
        raise ConfigError([f"{source}: the YAML is nested too deeply"], source) from None
    where = _Where(source, {}, {}, {})
    issues = _map_lines(node, where) if node is not None else []
    return data, where, issues


def _at(mark: yaml.Mark) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}"


def _syntax_issue(exc: yaml.MarkedYAMLError, source: str) -> str:
    """`file:6:1: YAML syntax error at line 6, column 1: expected ... (while parsing a flow
    sequence that starts at line 5, column 14)`: the start often shows the real mistake."""
    mark = exc.problem_mark or exc.context_mark
    if mark is None:
        return f"{source}: YAML syntax error: {exc.problem or exc.context}"
    text = f"{source}:{mark.line + 1}:{mark.column + 1}: YAML syntax error at {_at(mark)}"
    where = f" that starts at {_at(exc.context_mark)}" if exc.context_mark else ""
    if exc.context and exc.problem and exc.problem.startswith("but "):
        see = f" (see {_at(exc.context_mark)})" if exc.context_mark else ""
        return f"{text}: {exc.context}, {exc.problem}{see}"
    text += f": {exc.problem or exc.context}"
    if exc.context and exc.problem:
        text += f" ({exc.context}{where})"
    return text


def _compose(raw: bytes) -> tuple[yaml.Node | None, object]:
    """One parse gives both the node tree (for line numbers) and the data."""
    loader = yaml.SafeLoader(raw)
    try:
        node = loader.get_single_node()
        return node, (loader.construct_document(node) if node is not None else None)
    finally:
        loader.dispose()


_STR_TAG = "tag:yaml.org,2002:str"


def _map_lines(root: yaml.Node, where: _Where) -> list[str]:
    """Fill in the line of every value and key; report duplicate keys (YAML keeps the last)."""
    issues: list[str] = []
    stack: list[tuple[Loc, yaml.Node]] = [((), root)]
    seen: set[int] = set()
    while stack:
        loc, node = stack.pop()
        if id(node) in seen:  # an alias: map it once, not once per use (alias bombs)
            continue
        seen.add(id(node))
        where.value_lines.setdefault(loc, node.start_mark.line + 1)
        if isinstance(node, yaml.SequenceNode):
            stack.extend(((*loc, index), item) for index, item in enumerate(node.value))
        elif isinstance(node, yaml.MappingNode):
            first: dict[str, int] = {}
            for key, value in node.value:
                if not (isinstance(key, yaml.ScalarNode) and key.tag == _STR_TAG):
                    continue
                line = key.start_mark.line + 1
                if key.value in first:
                    issues.append(
                        f"{where.source}:{line}: {format_loc((*loc, key.value))}: duplicate key "
                        f"(first at line {first[key.value]}); write each key once"
                    )
                first.setdefault(key.value, line)
                where.key_lines.setdefault((*loc, key.value), line)
                stack.append(((*loc, key.value), value))
    return issues


# --- the schema, walked by path (environment overrides, "allowed keys" in messages) -----------


def _strip(annotation: Any) -> Any:
    """Annotated[X, ...] -> X and X | None -> X, repeatedly."""
    while True:
        if get_origin(annotation) is Annotated:
            annotation = get_args(annotation)[0]
            continue
        args = [arg for arg in get_args(annotation) if arg is not type(None)]
        if (
            get_origin(annotation) is not tuple
            and len(args) == 1
            and len(get_args(annotation)) == 2
        ):
            annotation = args[0]
            continue
        return annotation


def _model_of(annotation: Any) -> type[BaseModel] | None:
    stripped = _strip(annotation)
    if isinstance(stripped, type) and issubclass(stripped, BaseModel):
        return stripped
    return None


def _child(annotation: Any, part: str | int) -> Any:
    """The annotation one step down `part`, or _ABSENT when there is no such place."""
    model = _model_of(annotation)
    if model is not None:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        return _ABSENT if field is None else field.annotation
    stripped = _strip(annotation)
    if get_origin(stripped) is tuple and isinstance(part, int):
        return get_args(stripped)[0]
    return _ABSENT


def _annotation_at(loc: Loc) -> Any:
    annotation: Any = Settings
    for part in loc:
        annotation = _child(annotation, part)
        if annotation is _ABSENT:
            return _ABSENT
    return annotation


def _allowed_keys(loc: Loc) -> str:
    model = _model_of(_annotation_at(loc))
    return ", ".join(model.model_fields) if model is not None else "none"


def _is_text(annotation: Any) -> bool:
    stripped = _strip(annotation)
    if get_origin(stripped) is Literal:
        return all(isinstance(arg, str) for arg in get_args(stripped))
    return stripped in (str, SecretStr, Address)


# --- environment overrides ----------------------------------------------------------------------


def _env_loc(name: str) -> tuple[Loc, str | None]:
    """CONNWATCH_LISTENERS__0__NAME -> ("listeners", 0, "name"); or an error message."""
    loc: Loc = ()
    for segment in name[len(ENV_PREFIX) :].lower().split("__"):
        part: str | int = int(segment) if segment.isdigit() else segment
        if not segment or _child(_annotation_at(loc), part) is _ABSENT:
            here = format_loc(loc) if loc else "the top level"
            if isinstance(part, int) or get_origin(_strip(_annotation_at(loc))) is tuple:
                return loc, f"{here} is a list: the next part must be an index like __0__"
            return loc, f"{here} has no key {segment!r}; allowed: {_allowed_keys(loc)}"
        loc += (part,)
    return loc, None


def _env_value(raw: str, annotation: Any) -> object:
    """A YAML scalar (so `true`, `5`, `null`, `[a, b]` work), but text fields keep the raw text
    unless it reads as null (a token `0123` must not become the number 83), and a list may be
    written comma-separated."""
    try:
        value = yaml.safe_load(raw)
    except (yaml.YAMLError, ValueError, TypeError, OverflowError, RecursionError):
        return raw
    if _is_text(annotation) and value is not None and not isinstance(value, str):
        return raw
    if get_origin(_strip(annotation)) is tuple and isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]  # a,b -> [a, b]
    return value


def _assign(data: dict[str, Any], loc: Loc, value: object) -> str | None:
    """Set data[loc] = value, copying each container on the way (YAML aliases share them)."""
    node: Any = data
    for depth, part in enumerate(loc):
        last = depth == len(loc) - 1
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                count = len(node) if isinstance(node, list) else 0
                return f"{format_loc(loc[: depth + 1])} does not exist: {count} configured"
        elif not isinstance(node, dict):
            return f"{format_loc(loc[:depth])} is not a mapping, so {part!r} cannot be set"
        elif part not in node and not last:
            if isinstance(loc[depth + 1], int):
                return f"{format_loc(loc[: depth + 2])} does not exist: 0 configured"
            node[part] = {}
        if last:
            node[part] = value
        else:
            child = node[part]
            node[part] = list(child) if isinstance(child, tuple) else copy.copy(child)
            node = node[part]
    return None


def _apply_env(data: dict[str, Any], env: Mapping[str, str], where: _Where) -> list[str]:
    issues = []
    for name in sorted(env):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in NON_OVERRIDE_VARS:
            continue
        loc, error = _env_loc(upper)
        if error is None:
            error = _assign(data, loc, _env_value(env[name], _annotation_at(loc)))
        if error is not None:
            issues.append(f"environment variable {name}: no such setting: {error}")
        else:
            where.env[loc] = name
    return issues


# --- validation errors -> report lines ----------------------------------------------------------

_TYPE_MESSAGES = {
    "missing": "required, but missing",
    "tuple_type": "expected a list",
    "list_type": "expected a list",
    "int_type": "expected a whole number",
    "int_parsing": "expected a whole number",
    "int_from_float": "expected a whole number",
    "bool_type": "expected true or false",
    "string_type": "expected text",
    "float_type": "expected a number",
    "finite_number": "expected a finite number",
}


def _problem(error: Mapping[str, Any]) -> _Problem:
    kind, ctx = str(error["type"]), error.get("ctx") or {}
    loc: Loc = tuple(error["loc"])
    given = error.get("input", _ABSENT)
    if "field" in ctx:  # a model-level check that names the offending field itself
        field = ctx["field"]
        loc += tuple(field) if isinstance(field, tuple) else (str(field),)
        given = ctx.get("given", _ABSENT)
    if kind == "invalid_key":
        return _Problem(loc[:-1], f"the key {_show(loc[-1])} must be text", kind=kind)
    if kind == "value_error":
        message = _reason(ctx["error"], given) if "error" in ctx else str(error["msg"])
    elif kind == "extra_forbidden":
        return _Problem(loc, f"unknown key; allowed here: {_allowed_keys(loc[:-1])}", at_key=True)
    elif kind in ("model_type", "model_attributes_type", "dict_type"):
        message = f"expected a mapping with keys from: {_allowed_keys(loc)}"
    elif kind == "literal_error":
        message = f"expected one of {ctx.get('expected')}"
    elif kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        words = {"ge": "at least", "le": "at most", "gt": "more than", "lt": "less than"}
        message = " ".join(f"must be {words[k]} {v}" for k, v in ctx.items() if k in words)
    elif kind == "too_short":
        message = f"needs at least {ctx.get('min_length')} item(s)"
    else:
        message = _TYPE_MESSAGES.get(kind, str(error["msg"]))
    if kind == "missing":
        given = _ABSENT
    return _Problem(loc, message, given, kind=kind)


def _relevant(problems: list[_Problem]) -> list[_Problem]:
    """Drop "needs at least 1 item" for a list whose items failed: pydantic counts only the
    valid ones, but the list is not empty, its items are wrong."""
    return [
        p
        for p in problems
        if p.kind != "too_short"
        or not any(len(q.loc) > len(p.loc) and q.loc[: len(p.loc)] == p.loc for q in problems)
    ]


def _duplicate_names(data: Mapping[str, Any]) -> list[_Problem]:
    """Duplicate listener names, found in the raw data so they are reported with other errors
    (the model check only runs once every listener is valid)."""
    listeners = data.get("listeners")
    if not isinstance(listeners, list | tuple):
        return []
    first: dict[str, int] = {}
    problems = []
    for index, listener in enumerate(listeners):
        name = listener.get("name") if isinstance(listener, dict) else None
        if isinstance(name, str) and name in first:
            message = f"duplicate listener name, already used by listeners[{first[name]}]"
            problems.append(_Problem(("listeners", index, "name"), message, name))
        elif isinstance(name, str):
            first[name] = index
    return problems


# --- public API ---------------------------------------------------------------------------------


def load_settings(
    path: str | os.PathLike[str] | None,
    *,
    env: Mapping[str, str] | None = None,
    base: dict[str, Any] | None = None,
) -> Settings:
    """Read the YAML file (or take `base` when `path` is None), apply CONNWATCH_* overrides from
    `env` (default os.environ), validate. ConfigError lists every problem; nothing else escapes."""
    source = os.fspath(path) if path is not None else "<command line>"
    try:
        return _load(path, source, os.environ if env is None else env, base)
    except ConfigError:
        raise
    except Exception as exc:  # the promise is ConfigError or a Settings, whatever the input
        issue = f"{source}: cannot load the configuration: {type(exc).__name__}: {exc}"
        raise ConfigError([issue], source) from exc


def _load(
    path: str | os.PathLike[str] | None,
    source: str,
    env: Mapping[str, str],
    base: dict[str, Any] | None,
) -> Settings:
    if path is not None:
        data, where, issues = _read_yaml(path, source)
    else:
        data, where, issues = base, _Where(source, {}, {}, {}), []
    if data is None:
        data = {}
    if not isinstance(data, dict):
        kind = "a list" if isinstance(data, list) else f"the {type(data).__name__} {_show(data)}"
        raise ConfigError(
            [
                f"{where.describe(())}: the top level must be a mapping with the keys "
                f"{_allowed_keys(())}; given {kind}"
            ],
            source,
        )
    data = dict(data)
    for key in [k for k in data if not isinstance(k, str)]:
        # pydantic-settings would raise TypeError for these; name them like nested levels do.
        issues.append(f"{where.describe(())}: the key {_show(key)} must be text")
        del data[key]
    issues += _apply_env(data, env, where)
    problems = _duplicate_names(data)
    settings: Settings | None = None
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        found = {"duplicate_listener_name"} if problems else set()
        problems += _relevant([p for p in map(_problem, exc.errors()) if p.kind not in found])
    problems.sort(key=lambda p: where.line(p.loc))
    issues += [_issue(problem, where) for problem in problems]
    if issues or settings is None:
        if len(issues) > _MAX_ISSUES:
            issues = [*issues[:_MAX_ISSUES], f"... and {len(issues) - _MAX_ISSUES} more"]
        raise ConfigError(issues, source)
    return settings


def one_listener_config(listen: str, upstreams: list[str]) -> dict[str, Any]:
    """The `base` for `connwatch run --listen A --upstream B ...`: one listener named default."""
    return {"listeners": [{"name": "default", "listen": listen, "upstreams": list(upstreams)}]}


def effective_yaml(settings: Settings, *, show_secrets: bool = False) -> str:
    """The config as YAML with every default filled in; loads back to an equal Settings (the
    admin token reads `***` unless `show_secrets`)."""
    data = settings.model_dump(mode="json")
    token = settings.admin.token
    if token is not None:
        data["admin"]["token"] = token.get_secret_value() if show_secrets else "***"
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)


# --- warnings -----------------------------------------------------------------------------------


def config_warnings(settings: Settings) -> list[str]:
    """Valid settings that cannot work as meant: keep-alive vs path idle limits and
    TCP_USER_TIMEOUT. One line each, naming the field path."""
    warnings = []
    for index, listener in enumerate(settings.listeners):
        for leg in ("client", "upstream"):
            cfg: KeepaliveConfig = getattr(listener.keepalive, leg)
            if cfg.enabled:
                prefix = f"listeners[{index}].keepalive.{leg}"
                warnings += [f"{prefix}: {text}" for text in _keepalive_warnings(cfg)]
    return warnings


def _keepalive_warnings(cfg: KeepaliveConfig) -> Iterator[str]:
    idle, interval, count = cfg.idle, cfg.interval, cfg.count
    if cfg.path_idle_limit is not None and cfg.path_idle_limit <= idle:
        yield (
            f"path_idle_limit {format_duration(cfg.path_idle_limit)} <= idle "
            f"{format_duration(idle)}: the path drops a silent connection before the first "
            f"keep-alive probe is sent; set idle below {format_duration(cfg.path_idle_limit)}"
        )
    if cfg.user_timeout <= 0:
        return
    # Linux (tcp_keepalive_timer): with TCP_USER_TIMEOUT set, keep-alive ignores `count` and
    # gives up at the first probe time at which nothing has been received for user_timeout,
    # counting from the last byte received, so including the `idle` wait.
    probes = max(1, math.ceil((cfg.user_timeout - idle) / interval))
    planned = idle + interval * count
    if probes < count:
        yield (
            f"user_timeout {format_duration(cfg.user_timeout)} < idle + interval x count "
            f"({format_duration(planned)}): on Linux TCP_USER_TIMEOUT also ends keep-alive, "
            f"counted from the last byte received, so a silent peer is dropped after "
            f"{probes} of {count} probes ({format_duration(idle + interval * probes)}); raise "
            f"user_timeout to at least {format_duration(planned)} or lower count"
        )
    elif probes > count:
        yield (
            f"user_timeout {format_duration(cfg.user_timeout)} > idle + interval x count "
            f"({format_duration(planned)}): on Linux TCP_USER_TIMEOUT replaces count as the "
            f"keep-alive limit, so a dead peer is detected only after {probes} probes "
            f"({format_duration(idle + interval * probes)}), not {count}"
        )
