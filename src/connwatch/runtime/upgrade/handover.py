"""The old process's side of a seamless upgrade: it serves `upgrade_socket` (mode 0600).

A successor connects (`takeover`) and receives every listening socket of this process and of its
workers (each worker exports its own over the same Unix socket), the admin socket and the upgrade
socket itself. Nothing changes here until the successor, accepting on those sockets, says
`release`: then this process stops accepting (closing only its own descriptors: the sockets and
the clients queued in their backlogs live on in the successor), drains as on SIGTERM, and answers
the successor's `stats`, `connections` and `close` until it has reported its final totals.
If the successor hangs up or goes quiet before `release`, the hand-over is abandoned and this
process serves on, unchanged. One hand-over at a time: a second successor is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from connwatch.runtime.upgrade.messages import (
    PROTOCOL_VERSION,
    MessageSocket,
    UpgradeError,
    close_fds,
    socket_identity,
)
from connwatch.runtime.upgrade.status import FAILURE, HANDED_OVER, SUCCESS, UpgradeStatus
from connwatch.snapshots import DaemonStats, stats_to_wire

if TYPE_CHECKING:
    from connwatch.observe.admin import AdminApp
    from connwatch.runtime.admin_backend import DaemonBackend
    from connwatch.runtime.state import DaemonState
    from connwatch.runtime.upgrade.takeover import Takeover

log = structlog.get_logger("connwatch.upgrade")

STEP_TIMEOUT = 10.0  # seconds: a successor's first message, each worker's export
RELEASE_TIMEOUT = 60.0  # seconds a successor may take to start before it must say `release`
FINAL_WAIT = 10.0  # seconds to wait, after draining, for the successor to take the final totals


class Host(Protocol):
    """What the hand-over needs of the daemon."""

    @property
    def state(self) -> DaemonState: ...

    @property
    def admin(self) -> AdminApp: ...

    @property
    def backend(self) -> DaemonBackend: ...

    def request_stop(self) -> None: ...

    def heartbeat_sockets(self) -> list[Any]: ...

    def stop_heartbeat_responder(self) -> None: ...


class HandoverServer:
    def __init__(self, host: Host, path: str, status: UpgradeStatus, predecessor: Takeover | None):
        self._host = host
        self.path = path
        self.status = status
        self._predecessor = predecessor
        self._sock: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._conversations: set[asyncio.Task[None]] = set()
        self._busy = False
        self._released = False
        self._owns_path = True  # False while a predecessor still serves on the same path
        self._exports: dict[int, asyncio.Future[tuple[list[dict[str, Any]], list[int]]]] = {}
        self._final_ready = asyncio.Event()  # drained: the next `stats` answer is final
        self._final_taken = asyncio.Event()

    # -- serving upgrade_socket -----------------------------------------------------------------
    async def start(self, inherited: socket.socket | None = None) -> None:
        """Listen on `upgrade_socket` (or on the one a predecessor handed over)."""
        if inherited is not None:
            sock = inherited
            self._owns_path = False  # until the predecessor released it to us (`own`)
        else:
            sock = await _bind_private(self.path)
        sock.setblocking(False)
        self._sock = sock
        self._accepting = asyncio.get_running_loop().create_task(self._accept_loop())

    async def _accept_loop(self) -> None:
        assert self._sock is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(self._sock)
            except OSError as exc:
                log.warning("upgrade_accept_failed", error=str(exc))
                await asyncio.sleep(0.1)
                continue
            task = loop.create_task(self._converse(MessageSocket(conn)))
            self._conversations.add(task)
            task.add_done_callback(self._conversations.discard)

    def _stop_listening(self, *, unlink: bool) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            self._accepting = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            if unlink:
                with contextlib.suppress(OSError):
                    os.unlink(self.path)

    @property
    def released(self) -> bool:
        """The listeners went to a successor, which reads our figures until we exit."""
        return self._released

    def own(self) -> None:
        """The predecessor released the listeners: the upgrade socket's path is ours now."""
        self._owns_path = True

    def disown(self) -> None:
        """Our take-over failed: the path stays the predecessor's."""
        self._owns_path = False

    async def close(self) -> None:
        """At the end of the process (after `finish`): stop serving `upgrade_socket`; its path is
        removed unless a successor holds it (or a predecessor still does)."""
        self._stop_listening(unlink=self._owns_path and not self._released)
        for task in list(self._conversations):
            task.cancel()
        for task in list(self._conversations):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def finish(self) -> None:
        """After draining: let the successor read the final totals (bounded), then return."""
        if not self._released:
            return
        self._final_ready.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FINAL_WAIT):
                await self._final_taken.wait()
        log.info("upgrade_complete", role=HANDED_OVER, new_pid=self.status.peer_pid)

    # -- one conversation -----------------------------------------------------------------------
    async def _converse(self, conn: MessageSocket) -> None:
        try:
            async with asyncio.timeout(STEP_TIMEOUT):
                message, fds = await conn.receive()
            op = message.get("op")
            if op == "export":
                await self._take_export(conn, message, fds)
            elif op == "takeover":
                close_fds(fds)
                await self._takeover(conn, message)
            else:
                close_fds(fds)
                await conn.send({"ok": False, "error": f"unknown op {op!r}"})
        except (UpgradeError, OSError, TimeoutError) as exc:
            log.debug("upgrade_conversation_ended", error=str(exc))
        except Exception as exc:
            log.error("upgrade_conversation_failed", error=repr(exc), exc_info=exc)
        finally:
            conn.close()

    async def _take_export(
        self, conn: MessageSocket, message: dict[str, Any], fds: list[int]
    ) -> None:
        future = self._exports.get(int(message.get("worker", -1)))
        if future is None or future.done():
            close_fds(fds)
            await conn.send({"ok": False, "error": "no export was asked for"})
            return
        future.set_result((list(message.get("sockets", [])), fds))
        await conn.send({"ok": True})

    async def _takeover(self, conn: MessageSocket, message: dict[str, Any]) -> None:
        reason = self._refusal(message)
        if reason is not None:
            log.warning(
                "upgrade_refused", role=HANDED_OVER, reason=reason, new_pid=message.get("pid")
            )
            await conn.send({"ok": False, "error": reason, "version": PROTOCOL_VERSION})
            return
        self._busy = True
        new_pid = int(message.get("pid", 0))
        log.info("upgrade_started", role=HANDED_OVER, new_pid=new_pid)
        self.status.phase, self.status.peer_pid = "handing_over", new_pid
        try:
            await self._hand_over(conn)
            await self._serve_successor(conn)
        except (UpgradeError, OSError, TimeoutError, RuntimeError) as exc:
            if self._released:  # the successor went away while we drain: nothing to undo
                log.warning("upgrade_successor_lost", role=HANDED_OVER, error=str(exc))
                return
            self.status.count(HANDED_OVER, FAILURE)
            self.status.phase, self.status.peer_pid = None, None
            log.warning(
                "upgrade_failed",
                role=HANDED_OVER,
                new_pid=new_pid,
                error=str(exc) or type(exc).__name__,
                message="still serving, unchanged",
            )
            return
        finally:
            if not self._released:
                self._busy = False

    def _refusal(self, message: dict[str, Any]) -> str | None:
        if message.get("version") != PROTOCOL_VERSION:
            return f"upgrade protocol {message.get('version')!r} is not {PROTOCOL_VERSION}"
        if self._busy or self._released:
            return "another takeover is already in progress"
        if self._host.state.draining:
            return "this connwatch is shutting down"
        if self._predecessor is not None and not self._predecessor.done.is_set():
            return "the previous upgrade is still in progress (the old process is draining)"
        return None

    async def _hand_over(self, conn: MessageSocket) -> None:
        entries, fds, borrowed = await self._collect()
        try:
            await conn.send(
                {
                    "ok": True,
                    "version": PROTOCOL_VERSION,
                    "pid": os.getpid(),
                    "sockets": entries,
                    "id_base": self._host.state.pool.id_base + self._host.state.settings.workers,
                },
                fds,
            )
        finally:
            close_fds(borrowed)

    async def _collect(self) -> tuple[list[dict[str, Any]], list[int], list[int]]:
        """Every listening socket of this process and its workers (each once), the admin socket
        and the upgrade socket; and the descriptors borrowed from workers (to close after)."""
        state = self._host.state
        entries: list[dict[str, Any]] = []
        fds: list[int] = []
        seen: set[tuple[int, int]] = set()

        def add(entry: dict[str, Any], fd: int) -> None:
            identity = socket_identity(fd)
            if identity not in seen:
                seen.add(identity)
                entries.append(entry)
                fds.append(fd)

        for name, listener in state.listeners.items():
            for sock in listener.listening_sockets():
                add(
                    {"kind": "listener", "name": name, "listen": str(listener.config.listen)},
                    sock.fileno(),
                )
        borrowed: list[int] = []
        for index, (worker_entries, worker_fds) in (await self._worker_exports()).items():
            borrowed.extend(worker_fds)
            for entry, fd in zip(worker_entries, worker_fds, strict=False):
                add({**entry, **_as_configured_here(state, entry), "worker": index}, fd)
        for sock in self._host.admin.listening_sockets():
            add({"kind": "admin", "listen": str(state.settings.admin.listen)}, sock.fileno())
        heartbeat = state.settings.admin.heartbeat_listen
        for sock in self._host.heartbeat_sockets():
            add({"kind": "heartbeat", "listen": str(heartbeat)}, sock.fileno())
        if self._sock is not None:
            add({"kind": "upgrade", "path": self.path}, self._sock.fileno())
        return entries, fds, borrowed

    async def _worker_exports(self) -> dict[int, tuple[list[dict[str, Any]], list[int]]]:
        workers = self._host.state.pool.workers
        loop = asyncio.get_running_loop()
        self._exports = {index: loop.create_future() for index in workers}
        try:
            async with asyncio.timeout(STEP_TIMEOUT):
                await asyncio.gather(
                    *(w.channel.call("export", path=self.path) for w in workers.values())
                )
                return {index: await future for index, future in self._exports.items()}
        except BaseException:
            for future in self._exports.values():
                if future.done() and not future.cancelled():
                    close_fds(future.result()[1])
            raise
        finally:
            self._exports = {}

    async def _release(self) -> None:
        """The successor accepts on our sockets: stop accepting here (our descriptors only)."""
        state = self._host.state
        self._released = True
        for listener in state.listeners.values():
            listener.release()
        await state.pool.broadcast("release")
        await self._host.admin.stop()
        self._host.stop_heartbeat_responder()
        self._stop_listening(unlink=False)
        self.status.count(HANDED_OVER, SUCCESS)
        log.info("upgrade_released", role=HANDED_OVER, new_pid=self.status.peer_pid)

    # -- after the release: a retiring worker of the successor ----------------------------------
    async def _serve_successor(self, conn: MessageSocket) -> None:
        """Answer the successor: its admin endpoint asks for our figures from the moment it
        serves (before `release` too: both of us accept on the admin socket then); `release`
        must come within RELEASE_TIMEOUT."""
        backend = self._host.backend
        deadline = asyncio.get_running_loop().time() + RELEASE_TIMEOUT
        while True:
            if self._released:
                message, fds = await conn.receive()
            else:
                async with asyncio.timeout_at(deadline):
                    message, fds = await conn.receive()
            close_fds(fds)
            op = message.get("op")
            answer: dict[str, Any] = {"ok": True}
            if op == "release" and not self._released:
                await self._release()
                await conn.send(answer)
                self._host.request_stop()  # drain as on SIGTERM
                continue
            if op == "stats":
                final = self._final_ready.is_set()
                answer["stats"] = stats_to_wire(await self.statistics())
                answer["upgrades"] = self.upgrade_totals()
                answer["final"] = final
            elif op == "connections":
                answer["result"] = await backend.connection_records(
                    message.get("listener"), message.get("min_idle"), message.get("limit")
                )
            elif op == "close":
                answer["result"] = await backend.close_connection(str(message.get("id")))
            elif op == "bye":
                await conn.send(answer)
                self._final_taken.set()
                return
            else:
                answer = {"ok": False, "error": f"unknown op {op!r}"}
            await conn.send(answer)

    async def statistics(self) -> DaemonStats:
        """This process's totals, its workers' (live or final) and its own predecessor's."""
        host = self._host
        parts = [host.backend.statistics(), *await host.state.pool.statistics()]
        if self._predecessor is not None:
            parts.extend(await self._predecessor.statistics())
        return DaemonStats.merge_all(parts)

    def upgrade_totals(self) -> dict[str, int]:
        predecessor = self._predecessor.upgrade_counts() if self._predecessor else None
        return self.status.totals(predecessor)


def _as_configured_here(state: DaemonState, entry: dict[str, Any]) -> dict[str, Any]:
    """A worker's listener `listen` as this process's config writes it: a worker is configured
    with port 0 pinned to the port we got, and a successor keeps the sockets whose `listen` is
    its own config's. Sent as the worker wrote it, a port-0 listener's worker socket was left
    behind, closed for good when that worker released it: the clients in its backlog reset."""
    listener = state.listeners.get(str(entry.get("name")))
    if entry.get("kind") != "listener" or listener is None:
        return {}
    return {"listen": str(listener.config.listen)}


async def _bind_private(path: str) -> socket.socket:
    """A Unix listening socket at `path`, mode 0600; a stale socket file is replaced, a live one
    (another connwatch serving it) is an error."""
    try:
        mode: int | None = os.stat(path).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None:
        if not stat.S_ISSOCK(mode):
            raise UpgradeError(f"upgrade_socket {path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # nobody answers: stale
        else:
            raise UpgradeError(
                f"upgrade_socket {path} is served by a running connwatch; "
                "start this one with --takeover to take over from it"
            )
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o600)  # before listen(): nobody can connect in between
        sock.listen(16)
    except OSError as exc:
        sock.close()
        raise UpgradeError(f"cannot serve upgrade_socket {path}: {exc.strerror or exc}") from exc
    return sock
