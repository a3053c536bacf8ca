"""The pydantic models (SPEC section 3): field order and defaults are the contract.

Models are frozen and forbid unknown keys. They are written in the field types of `fields.py`;
`loading.py` is the one way in from a file or the command line.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    model_validator,
)
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from connwatch._types import Address
from connwatch.config.fields import (
    AddressField,
    Count,
    Duration,
    KeepaliveSeconds,
    Kind,
    Loc,
    PositiveDuration,
    Size,
    Token,
    UpstreamAddress,
    _buffer_size,
    _data_path,
    _listener_name,
    _Model,
    _order_error,
    _user_timeout,
    _workers,
    format_loc,
)
from connwatch.config.upstream_models import (
    HealthCheckConfig,
    OutlierDetectionConfig,
    UpstreamPoolConfig,
)


def _upgrade_socket_path(value: str | None) -> str | None:
    """An absolute filesystem path short enough for a Unix socket address (108 bytes)."""
    if value is None:
        return None
    if not value.startswith("/"):
        raise PydanticCustomError("upgrade_socket", "must be an absolute path, e.g. /run/x.sock")
    if len(value.encode()) > 107:
        raise PydanticCustomError("upgrade_socket", "a Unix socket path is at most 107 bytes")
    return value


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


class ProxyProtocolConfig(_Model):
    accept: StrictBool = Field(
        default=False,
        description="Clients send a PROXY v1/v2 header first (within `connect_timeout`).",
    )
    send: Literal["none", "v1", "v2"] = Field(
        default="none", description="PROXY header sent to the upstream: `none`, `v1` or `v2`."
    )


class ClientLimitsConfig(_Model):
    """Per-client-key limits (SPEC section 12); the key is the client's address, or its network
    by `ipv4_prefix`/`ipv6_prefix` (the PROXY header's address when `proxy_protocol.accept`)."""

    max_connections: Annotated[StrictInt, Field(ge=0)] = Field(
        default=0,
        description="Open connections allowed per client key; beyond it that client's new "
        "connections are accepted and closed at once (reason `client_limit`); 0 = no limit.",
    )
    connection_rate: Annotated[float, Field(ge=0, allow_inf_nan=False, strict=True)] = Field(
        default=0.0,
        description="New connections per second per client key (token bucket, burst = rate, "
        "at least 1); beyond it closed at once (reason `client_limit`); 0 = no limit.",
    )
    ipv4_prefix: Annotated[StrictInt, Field(ge=0, le=32)] = Field(
        default=32,
        description="Group IPv4 clients by network for limits and /clients: 24 = one key per /24; "
        "0 to 32.",
    )
    ipv6_prefix: Annotated[StrictInt, Field(ge=0, le=128)] = Field(
        default=128,
        description="Group IPv6 clients by network: 64 = one key per /64; 0 to 128.",
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
        "where available; portable: asyncio transports (data_received for small reads, "
        "a BufferedProtocol for busy flows)",
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
    upstream_pool: UpstreamPoolConfig = Field(
        default=UpstreamPoolConfig(),
        description="Warm upstream connections, checked before use (SPEC section 9).",
    )
    outlier_detection: OutlierDetectionConfig = Field(
        default=OutlierDetectionConfig(),
        description="Passive health: eject targets that fail real client connections.",
    )
    slow_start: Duration = Field(
        default=0.0,
        description="0 = off; else a target that becomes UP (or returns from ejection) gets a "
        "share of new connections growing linearly from 10% to 100% over this window.",
    )
    client_limits: ClientLimitsConfig = Field(
        default=ClientLimitsConfig(),
        description="Per-client limits and the client key of /clients (SPEC section 12).",
    )

    @model_validator(mode="after")
    def _pool_without_proxy_header(self) -> ListenerConfig:
        if self.upstream_pool.enabled and self.proxy_protocol.send != "none":
            raise PydanticCustomError(
                "pool_proxy_protocol",
                "cannot be used with upstream_pool.enabled: the PROXY header carries the "
                "client's address, unknown when the pool connects",
                {"field": ("proxy_protocol", "send"), "given": self.proxy_protocol.send},
            )
        return self


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
    upgrade_socket: Annotated[
        StrictStr | None, AfterValidator(_upgrade_socket_path), Kind("absolute path or null")
    ] = Field(
        default=None,
        description="Unix socket through which a new connwatch process (`connwatch run "
        "--takeover`) takes the listeners over, e.g. /run/connwatch/upgrade.sock; off when null.",
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
