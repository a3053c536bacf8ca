"""Config warnings: settings that are valid but cannot work as meant (keep-alive timing against a
path's idle limit, TCP_USER_TIMEOUT against the probes). `check-config` and `run` print them."""

from __future__ import annotations

import math
from collections.abc import Iterator

from connwatch.config.models import KeepaliveConfig, Settings
from connwatch.config.units import format_duration


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
