"""What connwatch does toward the upstream targets (SPEC section 3): active health checks,
passive health (outlier detection) and the warm connection pool."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import (
    ConfigDict,
    Field,
    PlainValidator,
    StrictBool,
    StrictInt,
    StrictStr,
    model_validator,
)
from pydantic_core import PydanticCustomError

from connwatch.config.escapes import decode_escapes
from connwatch.config.fields import (
    Count,
    Kind,
    Port,
    PositiveDuration,
    _escaped_text,
    _expect_regex,
    _expect_text,
    _expected_status,
    _Model,
    _order_error,
    _status_ranges,
)
from connwatch.config.units import format_duration


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


class OutlierDetectionConfig(_Model):
    """Passive health (SPEC section 10): judge targets by the outcome of real client connections."""

    enabled: StrictBool = Field(
        default=False,
        description="Eject a target that fails `consecutive_failures` client connections in a row.",
    )
    consecutive_failures: Count = Field(
        default=5,
        description="Failures in a row that eject a target: connect failures, or upstream "
        "resets/closes before `early_window` with no byte from the upstream. At least 1.",
    )
    early_window: PositiveDuration = Field(
        default=1.0,
        description="A connection the upstream ends within this time, having sent nothing, is a "
        "failure; the first upstream byte, or a connection that outlives it, is a success.",
    )
    base_ejection_time: PositiveDuration = Field(
        default=30.0,
        description="The first ejection's length; each further ejection of the same target "
        "doubles it (reset after a full ejection time without a failure).",
    )
    max_ejection_time: PositiveDuration = Field(
        default=300.0,
        description="The longest an ejection lasts. At least `base_ejection_time`.",
    )
    max_ejection_percent: Annotated[StrictInt, Field(ge=0, le=100)] = Field(
        default=50,
        description="Never eject more than this share of a listener's targets, 0 to 100; "
        "a refused ejection is logged (`upstream_ejection_refused`).",
    )

    @model_validator(mode="after")
    def _times_in_order(self) -> OutlierDetectionConfig:
        if self.max_ejection_time < self.base_ejection_time:
            raise PydanticCustomError(
                "ejection_time_order",
                "must be at least base_ejection_time ({value})",
                {
                    "field": "max_ejection_time",
                    "given": format_duration(self.max_ejection_time),
                    "value": format_duration(self.base_ejection_time),
                },
            )
        return self


class UpstreamPoolConfig(_Model):
    """Warm upstream connections per target, checked before a client gets one (SPEC section 9).

    The YAML key `validate` is the attribute `validation` (`validate` is a BaseModel method)."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", validate_by_name=False, serialize_by_alias=True
    )

    enabled: StrictBool = Field(
        default=False,
        description="Keep connections to each target open and ready; a new client takes one "
        "instead of connecting. Not with `proxy_protocol.send`.",
    )
    min_idle: Annotated[StrictInt, Field(ge=0, le=10000)] = Field(
        default=2, description="Per target: connections kept connected and ready (0 to 10000)."
    )
    max_idle: Annotated[StrictInt, Field(ge=1, le=10000)] = Field(
        default=32,
        description="Per target cap when the pool grows with demand; at least `min_idle`.",
    )
    grow: StrictBool = Field(
        default=True,
        description="Keep ready as many as were taken in the last second (at most `max_idle`).",
    )
    max_idle_age: PositiveDuration = Field(
        default=60.0,
        description="Retire a pooled connection this old; keep it below the upstream's own "
        "idle limit (Redis `timeout`, MySQL `wait_timeout`).",
    )
    scan_interval: PositiveDuration = Field(
        default=5.0,
        description="Check every pooled connection this often; adaptive: scans that find "
        "nothing stretch it by 1.5 up to `scan_max_interval`.",
    )
    scan_max_interval: PositiveDuration = Field(
        default=30.0, description="Longest time between scans; at least `scan_interval`."
    )
    validation: Literal["peek", "probe", "none"] = Field(
        default="peek",
        alias="validate",
        description="`peek`: TCP state and a non-blocking MSG_PEEK before use and at each scan; "
        "`probe`: also send `probe.send` at each scan and match the reply; `none`: no check.",
    )
    probe: SendExpectConfig = Field(
        default=SendExpectConfig(),
        description="`validate: probe`: bytes sent at each scan and the reply expected (within "
        "`health_check.timeout`); the reply is consumed, never seen by a client.",
    )

    @model_validator(mode="after")
    def _sizes_in_order(self) -> UpstreamPoolConfig:
        if self.min_idle > self.max_idle:
            raise PydanticCustomError(
                "pool_order",
                "must be at least min_idle ({value})",
                {"field": "max_idle", "given": self.max_idle, "value": self.min_idle},
            )
        if self.scan_max_interval < self.scan_interval:
            raise _order_error(
                "scan_max_interval", self.scan_max_interval, "scan_interval", self.scan_interval
            )
        return self
