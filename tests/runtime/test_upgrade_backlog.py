"""The kernel fact the seamless upgrade rests on (SPEC section 11), proved on this machine: a
listening socket passed to another process over SCM_RIGHTS is the same socket, so when the old
holder closes its descriptor, clients already queued in the backlog stay queued and the new
holder accepts them; whereas closing the last descriptor resets them (the hazard avoided)."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap

from tests.support import LOOPBACK

CLIENTS = 50

# The new holder: receive the listening socket, wait for "go" (sent after the old holder closed
# its descriptor), accept every queued client and answer each.
_NEW_HOLDER = textwrap.dedent(
    """
    import socket, sys
    channel = socket.socket(fileno=int(sys.argv[1]))
    _, fds, _, _ = socket.recv_fds(channel, 16, 1)
    listener = socket.socket(fileno=fds[0])
    assert channel.recv(2) == b"go"
    for _ in range(int(sys.argv[2])):
        conn, _ = listener.accept()
        conn.sendall(b"ok")
        conn.close()
    """
)


def _queued_clients(listener: socket.socket) -> list[socket.socket]:
    """Clients whose handshake the kernel completed: they wait in the backlog, not accepted."""
    port = listener.getsockname()[1]
    clients = [socket.create_connection((LOOPBACK, port), timeout=10) for _ in range(CLIENTS)]
    return clients


def test_queued_clients_survive_when_the_old_holder_closes_its_descriptor() -> None:
    listener = socket.create_server((LOOPBACK, 0), backlog=CLIENTS * 2)
    clients = _queued_clients(listener)
    ours, theirs = socket.socketpair()
    child = subprocess.Popen(
        [sys.executable, "-c", _NEW_HOLDER, str(theirs.fileno()), str(CLIENTS)],
        pass_fds=(theirs.fileno(),),
    )
    theirs.close()
    try:
        socket.send_fds(ours, [b"x"], [listener.fileno()])
        listener.close()  # the old holder lets go before the new one has accepted anyone
        ours.sendall(b"go")
        answers = [client.recv(2) for client in clients]
        assert child.wait(timeout=30) == 0
    finally:
        for client in clients:
            client.close()
        ours.close()
        if child.poll() is None:
            child.kill()
    assert answers == [b"ok"] * CLIENTS


def test_queued_clients_are_reset_when_the_last_descriptor_closes() -> None:
    """The control: without a second holder the same close resets every queued client, so the
    test above would fail if the descriptor were not shared."""
    listener = socket.create_server((LOOPBACK, 0), backlog=CLIENTS * 2)
    clients = _queued_clients(listener)
    listener.close()
    outcomes = []
    for client in clients:
        try:
            outcomes.append(client.recv(2))
        except ConnectionResetError:
            outcomes.append("reset")
        finally:
            client.close()
    assert outcomes == ["reset"] * CLIENTS
