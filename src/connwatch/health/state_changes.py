"""A target's health state changing: the one `upstream_state_changed` line and the observer call,
the same for active checks (`monitor`) and passive health (`outlier_detection`)."""

from __future__ import annotations

from collections.abc import Callable

import structlog

from connwatch._types import HealthState
from connwatch.proxy.upstream import Target

log = structlog.get_logger("connwatch.health")

StateChangeCallback = Callable[[str, Target, HealthState, HealthState], None]
"""Called with (listener, target, old, new) after a target's state was set."""


def change_state(
    listener: str,
    target: Target,
    new: HealthState,
    *,
    cause: str,
    detail: str,
    on_change: StateChangeCallback | None,
    notify_unchanged: bool = False,
) -> None:
    """Set the state and its cause, log a change (a warning for DOWN), then tell `on_change`.

    Without `notify_unchanged` a state that is already `new` is left alone entirely; with it
    the cause is set and the observer told all the same (passive health relays every ejection
    to the workers, even of a target that was already DOWN)."""
    old = target.state
    if new is old and not notify_unchanged:
        return
    target.state = new
    target.cause = cause
    if new is not old:
        level = log.warning if new is HealthState.DOWN else log.info
        level(
            "upstream_state_changed",
            listener=listener,
            upstream=target.label,
            old=str(old),
            new=str(new),
            cause=cause,
            detail=detail,
        )
    if on_change is None:
        return
    try:
        on_change(listener, target, old, new)
    except Exception:  # one faulty observer must not stop health checking
        log.exception("state_change_callback_failed", listener=listener, upstream=target.label)
