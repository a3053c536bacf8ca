"""Shared fixtures. Async tests run on uvloop; tests marked `both_loops` also on asyncio's loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import pytest
import uvloop

from tests.variant import ENV, VARIANT

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "both_loops: run under uvloop and asyncio's default loop")


def pytest_report_header(config: pytest.Config) -> str:
    return f"connwatch variant: {VARIANT} ({ENV}=splice|workers2 to run the suite on another)"


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, LoopFactory]:
    if item.get_closest_marker("both_loops") is not None:
        return {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}
    return {"uvloop": uvloop.new_event_loop}
