"""Passive health (SPEC section 10) as a unit: the OutlierDetector fed outcomes by hand, with a
fake monotonic clock; the OutcomeJudge's verdicts; and how active checks respect an ejection."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from structlog.testing import capture_logs

from connwatch._types import Address, CloseReason, HealthState
from connwatch.config import load_settings
from connwatch.health.checks import CheckResult
from connwatch.health.monitor import HealthMonitor, TargetHealth
from connwatch.health.outlier_detection import OutlierDetector
from connwatch.observe.tracker import Tracker
from connwatch.proxy.listener import Listener
from connwatch.proxy.passive_outcomes import OutcomeJudge
from connwatch.proxy.upstream import Target
from connwatch.runtime.outcome_relay import OutcomeBuffer, feed
from tests.support import eventually

UPSTREAMS = ["127.0.0.1:7001", "127.0.0.1:7002"]


def _listener(upstreams: list[str] = UPSTREAMS, **outlier: Any) -> Listener:
    detection = {
        "enabled": True,
        "consecutive_failures": 3,
        "base_ejection_time": "10s",
        "max_ejection_time": "35s",
        **outlier,
    }
    cfg = {
        "admin": {"listen": "127.0.0.1:0"},
        "listeners": [
            {
                "name": "app",
                "listen": "127.0.0.1:0",
                "upstreams": upstreams,
                "outlier_detection": detection,
            }
        ],
    }
    settings = load_settings(None, base=cfg, env={})
    return Listener(settings.listeners[0], Tracker())


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _detector(listener: Listener, clock: Clock, changes: list[Any]) -> OutlierDetector:
    return OutlierDetector(
        {listener.name: listener},
        on_state_change=lambda name, target, old, new: changes.append((target.label, old, new)),
        monotonic=clock,
        wall=clock,
    )


def _fail(detector: OutlierDetector, times: int, upstream: str = UPSTREAMS[0]) -> None:
    for _ in range(times):
        detector.upstream_failed("app", upstream)


async def test_consecutive_failures_eject_and_a_success_resets_the_count() -> None:
    listener, clock, changes = _listener(), Clock(), []
    detector = _detector(listener, clock, changes)
    target = listener.pool.targets[0]
    _fail(detector, 2)
    detector.upstream_succeeded("app", UPSTREAMS[0])
    _fail(detector, 2)
    assert target.state is HealthState.UNKNOWN
    assert target.ejections == 0
    with capture_logs() as logs:
        _fail(detector, 1)
    assert target.state is HealthState.DOWN
    assert target.cause == "passive"
    assert target.ejected_until == pytest.approx(clock.now + 10)
    assert target.ejections == 1
    assert changes == [(UPSTREAMS[0], HealthState.UNKNOWN, HealthState.DOWN)]
    ejected = [line for line in logs if line["event"] == "upstream_ejected"]
    assert ejected == [
        {
            "event": "upstream_ejected",
            "log_level": "warning",
            "listener": "app",
            "upstream": UPSTREAMS[0],
            "failures": 3,
            "ejection_s": 10.0,
            "ejections": 1,
        }
    ]
    changed = [line for line in logs if line["event"] == "upstream_state_changed"]
    assert changed[0]["cause"] == "passive"
    assert changed[0]["new"] == "DOWN"
    detector.close()


async def test_return_to_unknown_then_doubling_up_to_the_cap() -> None:
    listener, clock, changes = _listener(), Clock(), []
    detector = _detector(listener, clock, changes)
    target = listener.pool.targets[0]
    lengths = []
    for _ in range(4):
        _fail(detector, 3)
        assert target.state is HealthState.DOWN
        assert target.ejected_until is not None
        lengths.append(round(target.ejected_until - clock.now, 3))
        detector._return("app", target.label)  # the timer's call, without the wait
        assert target.state is HealthState.UNKNOWN
        assert target.ejected_until is None
        assert target.cause == "passive"
        clock.now += 1  # failing again soon after the return
    assert lengths == [10.0, 20.0, 35.0, 35.0]  # base * 2^(n-1), capped at max_ejection_time
    detector.close()


async def test_a_full_ejection_time_without_failures_resets_the_doubling() -> None:
    listener, clock, changes = _listener(), Clock(), []
    detector = _detector(listener, clock, changes)
    target = listener.pool.targets[0]
    _fail(detector, 3)
    detector._return("app", target.label)
    clock.now += 10.5  # longer than the last ejection (10s), no failure
    _fail(detector, 3)
    assert target.ejected_until == pytest.approx(clock.now + 10)
    detector.close()


async def test_failures_while_ejected_do_not_extend_it() -> None:
    listener, clock, changes = _listener(), Clock(), []
    detector = _detector(listener, clock, changes)
    target = listener.pool.targets[0]
    _fail(detector, 3)
    until = target.ejected_until
    _fail(detector, 10)  # connections opened before the ejection, failing now
    assert target.ejected_until == until
    assert target.ejections == 1
    detector.close()


async def test_max_ejection_percent_refuses_and_logs() -> None:
    listener, clock, changes = _listener(max_ejection_percent=50), Clock(), []
    detector = _detector(listener, clock, changes)
    first, second = listener.pool.targets
    _fail(detector, 3, UPSTREAMS[0])
    with capture_logs() as logs:
        _fail(detector, 3, UPSTREAMS[1])
    assert first.state is HealthState.DOWN
    assert second.state is HealthState.UNKNOWN
    assert second.ejected_until is None
    refused = [line for line in logs if line["event"] == "upstream_ejection_refused"]
    assert refused
    assert refused[0]["upstream"] == UPSTREAMS[1]
    assert refused[0]["max_ejection_percent"] == 50
    assert refused[0]["ejected"] == 1
    detector._return("app", first.label)
    _fail(detector, 1, UPSTREAMS[1])  # the budget is free again: still failing, ejected now
    assert second.state is HealthState.DOWN
    detector.close()


async def test_zero_percent_never_ejects() -> None:
    listener, clock, changes = _listener(max_ejection_percent=0), Clock(), []
    detector = _detector(listener, clock, changes)
    _fail(detector, 10)
    assert listener.pool.targets[0].state is HealthState.UNKNOWN
    assert changes == []


async def test_disabled_listener_is_not_judged() -> None:
    listener, clock, changes = _listener(enabled=False), Clock(), []
    detector = _detector(listener, clock, changes)
    _fail(detector, 10)
    assert listener.pool.targets[0].state is HealthState.UNKNOWN


async def test_the_return_timer_brings_the_target_back() -> None:
    listener, changes = _listener(base_ejection_time="50ms"), []
    detector = OutlierDetector({"app": listener}, on_state_change=lambda *a: changes.append(a[2:]))
    _fail(detector, 3)
    target = listener.pool.targets[0]
    assert target.state is HealthState.DOWN
    await eventually(lambda: target.state is HealthState.UNKNOWN, timeout=5)
    assert changes == [
        (HealthState.UNKNOWN, HealthState.DOWN),
        (HealthState.DOWN, HealthState.UNKNOWN),
    ]
    assert target.weight(0.0) == 1.0


async def test_worker_outcomes_reach_the_primary_in_order() -> None:
    listener, clock, changes = _listener(), Clock(), []
    detector = _detector(listener, clock, changes)
    buffer = OutcomeBuffer()
    for ok in (False, False, True, False, False, False):
        (buffer.upstream_succeeded if ok else buffer.upstream_failed)("app", UPSTREAMS[0])
    rows = buffer.drain()
    assert buffer.pending == 0
    feed(detector, rows[:5])  # fail, fail, success, fail, fail: not yet
    assert listener.pool.targets[0].ejections == 0
    feed(detector, rows[5:])  # the third failure in a row since the success
    assert listener.pool.targets[0].ejections == 1
    detector.close()


# -- the judge -----------------------------------------------------------------------------------
class Sink:
    def __init__(self) -> None:
        self.seen: list[tuple[str, bool]] = []

    def upstream_succeeded(self, listener: str, upstream: str) -> None:
        self.seen.append((upstream, True))

    def upstream_failed(self, listener: str, upstream: str) -> None:
        self.seen.append((upstream, False))


class FakeConn:
    def __init__(self, upstream_bytes: int, reason: CloseReason | None) -> None:
        self.target = Target(Address("127.0.0.1", 7001))
        self.bytes_upstream_to_client = upstream_bytes
        self.reason = reason


@pytest.mark.parametrize(
    ("upstream_bytes", "reason", "verdict"),
    [
        (0, CloseReason.UPSTREAM_RESET, False),
        (0, CloseReason.UPSTREAM_CLOSED, False),
        (5, CloseReason.UPSTREAM_RESET, True),  # it answered: the service works
        (0, CloseReason.CLIENT_CLOSED, None),  # the client left first: no verdict
        (0, CloseReason.IDLE_TIMEOUT, None),
    ],
)
async def test_judge_verdict_at_close(
    upstream_bytes: int, reason: CloseReason, verdict: bool | None
) -> None:
    sink = Sink()
    judge = OutcomeJudge("app", 10.0, sink)
    conn: Any = FakeConn(upstream_bytes, reason)
    judge.opened(conn)
    judge.closed(conn)
    assert sink.seen == ([] if verdict is None else [("127.0.0.1:7001", verdict)])
    assert judge.pending == 0


async def test_judge_outliving_the_early_window_is_a_success_once() -> None:
    sink = Sink()
    judge = OutcomeJudge("app", 0.01, sink)
    conn: Any = FakeConn(0, None)
    judge.opened(conn)
    await eventually(lambda: sink.seen == [("127.0.0.1:7001", True)], timeout=5)
    conn.reason = CloseReason.UPSTREAM_RESET
    judge.closed(conn)  # judged already: a late reset is not a failure
    assert sink.seen == [("127.0.0.1:7001", True)]


# -- active checks and an ejection ---------------------------------------------------------------
async def test_active_checks_do_not_end_an_ejection_and_judge_afresh_after_it() -> None:
    from connwatch.config import HealthCheckConfig

    cfg = HealthCheckConfig.model_validate({"rise": 1, "fall": 1})
    monitor = HealthMonitor()
    target = Target(Address("127.0.0.1", 7001))
    machine = TargetHealth.from_config(cfg)
    ok = CheckResult(True, 0.001, "ok")
    monitor._record("app", target, machine, ok)
    assert target.state is HealthState.UP
    assert target.cause == "active_check"
    target.state, target.cause, target.ejected_until = HealthState.DOWN, "passive", 1e12
    monitor._record("app", target, machine, ok)
    assert target.state is HealthState.DOWN
    assert target.cause == "passive"
    target.ejected_until = None
    target.state = HealthState.UNKNOWN  # the ejection ended
    monitor._record("app", target, machine, ok)
    assert target.state is HealthState.UP
    assert target.cause == "active_check"
    await asyncio.sleep(0)
