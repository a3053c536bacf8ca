"""Configuration (SPEC section 3): the public names; the modules of this folder hold the parts."""

from __future__ import annotations

from connwatch.config.advice import config_warnings
from connwatch.config.env_overrides import ENV_PREFIX, NON_OVERRIDE_VARS
from connwatch.config.escapes import decode_escapes, encode_escapes
from connwatch.config.fields import (
    AddressField,
    Count,
    Duration,
    KeepaliveSeconds,
    Kind,
    Loc,
    Port,
    PositiveDuration,
    Size,
    Token,
    UpstreamAddress,
    format_loc,
)
from connwatch.config.loading import effective_yaml, load_settings, one_listener_config
from connwatch.config.models import (
    AdminConfig,
    ClientLimitsConfig,
    HeartbeatConfig,
    KeepaliveConfig,
    KeepaliveLegs,
    ListenerConfig,
    LogConfig,
    ProxyProtocolConfig,
    Settings,
    ShutdownConfig,
)
from connwatch.config.upstream_models import (
    HealthCheckConfig,
    HttpCheckConfig,
    OutlierDetectionConfig,
    SendExpectConfig,
    UpstreamPoolConfig,
)

__all__ = [
    "ENV_PREFIX",
    "NON_OVERRIDE_VARS",
    "AddressField",
    "AdminConfig",
    "ClientLimitsConfig",
    "Count",
    "Duration",
    "HealthCheckConfig",
    "HeartbeatConfig",
    "HttpCheckConfig",
    "KeepaliveConfig",
    "KeepaliveLegs",
    "KeepaliveSeconds",
    "Kind",
    "ListenerConfig",
    "Loc",
    "LogConfig",
    "OutlierDetectionConfig",
    "Port",
    "PositiveDuration",
    "ProxyProtocolConfig",
    "SendExpectConfig",
    "Settings",
    "ShutdownConfig",
    "Size",
    "Token",
    "UpstreamAddress",
    "UpstreamPoolConfig",
    "config_warnings",
    "decode_escapes",
    "effective_yaml",
    "encode_escapes",
    "format_loc",
    "load_settings",
    "one_listener_config",
]
