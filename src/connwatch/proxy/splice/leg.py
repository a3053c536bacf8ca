"""Leg: what a SpliceTransport needs of its protocol (MonitoredConnection's `_Leg` fits)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from connwatch.proxy.connection import MonitoredConnection

__all__ = ["Leg"]


class Leg(Protocol):
    """What a SpliceTransport needs of its protocol: MonitoredConnection's `_Leg` fits."""

    sink: asyncio.Transport | None
    bytes_in: int

    @property
    def conn(self) -> MonitoredConnection: ...

    def connection_made(self, transport: asyncio.BaseTransport) -> None: ...

    def get_buffer(self, sizehint: int) -> memoryview: ...

    def buffer_updated(self, nbytes: int) -> None: ...

    def eof_received(self) -> bool: ...

    def pause_writing(self) -> None: ...

    def resume_writing(self) -> None: ...

    def connection_lost(self, exc: Exception | None) -> None: ...
