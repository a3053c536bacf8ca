"""The new process's side of a seamless upgrade (`connwatch run --takeover`).

`Takeover.connect` runs before anything is bound: it asks the running process for its listening
sockets. The daemon starts on the ones whose listener `name` and `listen` are unchanged (and on
the admin and upgrade sockets when their addresses are unchanged) and binds the rest; then
`release()` tells the old process to stop accepting. From then on the old process is, in effect,
a retiring worker of this one: `statistics()`, `connection_records()` and `close_connection()`
ask it over the same conversation until it has drained, and its final totals are kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from connwatch.runtime.upgrade.messages import PROTOCOL_VERSION, MessageSocket, UpgradeError
from connwatch.runtime.upgrade.sockets import adopt_fd, connect_unix
from connwatch.runtime.upgrade.status import TOOK_OVER, UpgradeStatus, counts_from_wire
from connwatch.snapshots import DaemonStats, stats_from_wire

if TYPE_CHECKING:
    from connwatch.config import Settings

log = structlog.get_logger("connwatch.upgrade")

TAKEOVER_TIMEOUT = 10.0  # seconds for each step of the conversation (SPEC section 11)
_POLL = 0.2  # seconds between two reads of the old process's figures while it drains
_QUERY_TIMEOUT = 2.0  # seconds a scrape waits for the old process before using its last figures


@dataclass
class Received:
    """The sockets the old process sent, sorted for the new settings."""

    listeners: dict[str, list[socket.socket]] = field(default_factory=dict)  # by listener name
    admin: socket.socket | None = None
    upgrade: socket.socket | None = None
    heartbeat: socket.socket | None = None
    id_base: int = 0


class Takeover:
    """One take-over, from the first message to the old process's exit."""

    def __init__(self, conn: MessageSocket, path: str, answer: dict[str, Any], fds: list[int]):
        self._conn = conn
        self.path = path
        self.old_pid = int(answer.get("pid", 0))
        self._entries: list[dict[str, Any]] = list(answer.get("sockets", []))
        self._fds = fds
        self.id_base = int(answer.get("id_base", 0))
        self.status = UpgradeStatus()
        self.status.phase = "taking_over"
        self.status.peer_pid = self.old_pid
        self._last: DaemonStats | None = None  # the old process's latest figures
        self._last_counts: Counter[tuple[str, str]] = Counter()
        self.done = asyncio.Event()  # the old process has exited (or is gone)
        self._poller: asyncio.Task[None] | None = None

    # -- before the daemon binds ----------------------------------------------------------------
    @classmethod
    async def connect(cls, path: str, timeout: float = TAKEOVER_TIMEOUT) -> Takeover:
        """Ask the process serving `path` for its sockets; UpgradeError when it cannot be done."""
        conn = await connect_unix(path, timeout)
        try:
            async with asyncio.timeout(timeout):
                await conn.send({"op": "takeover", "version": PROTOCOL_VERSION, "pid": os.getpid()})
                answer, fds = await conn.receive()
        except TimeoutError as exc:
            conn.close()
            raise UpgradeError(
                f"the running connwatch did not answer on {path} within {timeout:g}s"
            ) from exc
        except BaseException:
            conn.close()
            raise
        if not answer.get("ok"):
            conn.close()
            raise UpgradeError(f"the running connwatch refused the takeover: {answer.get('error')}")
        if answer.get("version") != PROTOCOL_VERSION:
            conn.close()
            raise UpgradeError(
                f"the running connwatch speaks upgrade protocol {answer.get('version')!r}, "
                f"this one {PROTOCOL_VERSION}"
            )
        if len(fds) != len(answer.get("sockets", [])):
            conn.close()
            raise UpgradeError("the running connwatch sent a malformed set of sockets")
        takeover = cls(conn, path, answer, fds)
        log.info("upgrade_started", role=TOOK_OVER, old_pid=takeover.old_pid, sockets=len(fds))
        return takeover

    def sort_sockets(self, settings: Settings) -> Received:
        """Keep the sockets the new settings use (same listener name and listen, same admin and
        upgrade addresses); close the others (the old process still holds them)."""
        wanted = {(cfg.name, str(cfg.listen)) for cfg in settings.listeners}
        heartbeat = settings.admin.heartbeat_listen
        out = Received(id_base=self.id_base)
        seen: set[tuple[int, int]] = set()
        for entry, fd in zip(self._entries, self._fds, strict=True):
            kind = entry.get("kind")
            identity = (os.fstat(fd).st_dev, os.fstat(fd).st_ino)
            keep = identity not in seen and (
                (kind == "listener" and (entry.get("name"), entry.get("listen")) in wanted)
                or (kind == "admin" and entry.get("listen") == str(settings.admin.listen))
                or (kind == "upgrade" and entry.get("path") == settings.upgrade_socket)
                or (kind == "heartbeat" and entry.get("listen") == str(heartbeat))
            )
            if not keep:
                os.close(fd)
                continue
            seen.add(identity)
            sock = adopt_fd(fd)
            if kind == "listener":
                out.listeners.setdefault(str(entry["name"]), []).append(sock)
            elif kind == "admin":
                out.admin = sock
            elif kind == "heartbeat":
                out.heartbeat = sock
            else:
                out.upgrade = sock
        self._fds = []
        return out

    # -- once the daemon is accepting -----------------------------------------------------------
    async def release(self) -> None:
        """Tell the old process to stop accepting and drain; UpgradeError if it does not."""
        try:
            answer = await self._conn.call({"op": "release"}, TAKEOVER_TIMEOUT)
        except TimeoutError as exc:
            raise UpgradeError(
                f"the old connwatch (pid {self.old_pid}) did not release the listeners"
                f" within {TAKEOVER_TIMEOUT:g}s"
            ) from exc
        if not answer.get("ok"):
            raise UpgradeError(f"the old connwatch refused to release: {answer.get('error')}")
        self.status.count(TOOK_OVER, "success")
        self.status.phase = "draining_predecessor"
        self._poller = asyncio.get_running_loop().create_task(self._poll())
        log.info("upgrade_accepting", role=TOOK_OVER, old_pid=self.old_pid)

    def abandon(self) -> None:
        """The take-over failed: hang up (the old process keeps serving, unchanged)."""
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []
        self._conn.close()

    async def _poll(self) -> None:
        """Read the old process's figures until it reports its final ones, then let it exit."""
        try:
            while True:
                answer = await self._conn.call({"op": "stats"}, TAKEOVER_TIMEOUT)
                self._take(answer)
                if answer.get("final"):
                    with contextlib.suppress(UpgradeError, OSError, TimeoutError):
                        await self._conn.call({"op": "bye"}, TAKEOVER_TIMEOUT)
                    break
                await asyncio.sleep(_POLL)
            log.info("upgrade_complete", role=TOOK_OVER, old_pid=self.old_pid)
        except (UpgradeError, OSError, TimeoutError) as exc:
            log.warning(
                "upgrade_predecessor_lost",
                old_pid=self.old_pid,
                error=str(exc),
                message="its last reported totals are kept",
            )
        finally:
            self._conn.close()
            self.status.phase = None
            self.done.set()

    def _take(self, answer: dict[str, Any]) -> None:
        if answer.get("ok") and answer.get("stats") is not None:
            self._last = stats_from_wire(answer["stats"])
            self._last_counts = counts_from_wire(answer.get("upgrades", {}))

    # -- what the admin backend asks ------------------------------------------------------------
    async def statistics(self) -> list[DaemonStats]:
        """The old process's figures (live while it drains; its final ones after)."""
        if not self.done.is_set():
            with contextlib.suppress(UpgradeError, OSError, TimeoutError):
                self._take(await self._conn.call({"op": "stats"}, _QUERY_TIMEOUT))
        return [self._last] if self._last is not None else []

    def upgrade_counts(self) -> Counter[tuple[str, str]]:
        return self._last_counts

    async def connection_records(self, **query: Any) -> list[dict[str, Any]]:
        if self.done.is_set():
            return []
        with contextlib.suppress(UpgradeError, OSError, TimeoutError):
            answer = await self._conn.call({"op": "connections", **query}, _QUERY_TIMEOUT)
            return list(answer.get("result") or [])
        return []

    async def close_connection(self, conn_id: str) -> bool:
        if self.done.is_set():
            return False
        with contextlib.suppress(UpgradeError, OSError, TimeoutError):
            answer = await self._conn.call({"op": "close", "id": conn_id}, _QUERY_TIMEOUT)
            return bool(answer.get("result"))
        return False

    async def close(self) -> None:
        if self._poller is not None and not self._poller.done():
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        self._conn.close()
