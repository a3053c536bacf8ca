"""TCP_INFO for many sockets: one NETLINK_SOCK_DIAG dump against one getsockopt per socket.

    python bench/sock_diag_cost.py [--sockets 3000] [--repeats 5]

Opens `--sockets` loopback connections, then reads TCP_INFO of the accepted side of every one of
them both ways and prints the CPU (this thread, user + system) per socket, best of `--repeats`:

- `getsockopt`: `getsockopt(IPPROTO_TCP, TCP_INFO)` on each socket;
- `sock_diag dump`: one `SOCK_DIAG_BY_FAMILY` dump request (`inet_diag_req_v2`, INET_DIAG_INFO)
  filtered in the kernel by the listening port (bytecode `S_GE`/`S_LE`), each record parsed for
  its inode and TCP_INFO with precompiled structs, matched to our sockets by inode.

The kernel walks the whole established hash of the network namespace for a dump (every socket
of every process in it), so the dump's cost depends on the namespace; run it in a fresh one
(`unshare -n` with `ip link set lo up`) to see the best case. Why the watchdog keeps getsockopt:
docs/tcp_info.md.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
INET_DIAG_REQ_BYTECODE = 1
INET_DIAG_INFO = 2
INET_DIAG_BC_S_GE, INET_DIAG_BC_S_LE = 2, 3
ALL_STATES = 0xFFF
TCP_INFO_LEN = 232  # through snd_wnd, as the watchdog asks

NLMSG = struct.Struct("=IHHII")  # len, type, flags, seq, pid
REQ_V2 = struct.Struct("=BBBxI48x")  # family, protocol, ext, pad, states, inet_diag_sockid
RTATTR = struct.Struct("=HH")  # len, type
BC_OP = struct.Struct("=BBH")  # code, yes, no (inet_diag_bc_op)
DIAG_MSG_LEN = 72  # struct inet_diag_msg; idiag_inode is its last u32
INODE = struct.Struct("=I")


def _align(n: int) -> int:
    return (n + 3) & ~3


def sport_filter(port: int) -> bytes:
    """Bytecode: port <= sport <= port. A failed test jumps past the end (len + 4): reject."""
    ge = BC_OP.pack(INET_DIAG_BC_S_GE, 8, 20) + BC_OP.pack(0, 0, port)
    le = BC_OP.pack(INET_DIAG_BC_S_LE, 8, 12) + BC_OP.pack(0, 0, port)
    program = ge + le
    return RTATTR.pack(RTATTR.size + len(program), INET_DIAG_REQ_BYTECODE) + program


def dump_request(family: int, port: int) -> bytes:
    body = REQ_V2.pack(family, socket.IPPROTO_TCP, 1 << (INET_DIAG_INFO - 1), ALL_STATES)
    body += sport_filter(port)
    flags = NLM_F_REQUEST | NLM_F_DUMP
    return NLMSG.pack(NLMSG.size + len(body), SOCK_DIAG_BY_FAMILY, flags, 1, 0) + body


def dump(nl: socket.socket, request: bytes, buf: bytearray) -> dict[int, bytes]:
    """TCP_INFO bytes by inode for every socket the request selects."""
    nl.send(request)
    found: dict[int, bytes] = {}
    while True:
        size = nl.recv_into(buf)
        view = memoryview(buf)[:size]
        off = 0
        while off < size:
            length, kind = NLMSG.unpack_from(view, off)[:2]
            if kind == NLMSG_DONE:
                return found
            if kind == NLMSG_ERROR:
                raise OSError("sock_diag dump refused")
            inode = INODE.unpack_from(view, off + NLMSG.size + DIAG_MSG_LEN - 4)[0]
            attr, end = off + NLMSG.size + DIAG_MSG_LEN, off + length
            while attr < end:
                attr_len, attr_type = RTATTR.unpack_from(view, attr)
                if attr_type == INET_DIAG_INFO:
                    start = attr + RTATTR.size
                    found[inode] = bytes(view[start : start + TCP_INFO_LEN])
                attr += _align(attr_len)
            off += _align(length)


@contextmanager
def connections(count: int) -> Iterator[tuple[int, list[socket.socket]]]:
    """`count` loopback connections; yields the listening port and the accepted sockets."""
    with ExitStack() as stack:
        listener = stack.enter_context(socket.create_server(("127.0.0.1", 0), backlog=4096))
        port = listener.getsockname()[1]
        accepted = []
        for _ in range(count):
            stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=5))
            accepted.append(stack.enter_context(listener.accept()[0]))
        yield port, accepted


def cpu_per_item(fn: Callable[[], object], items: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.thread_time()
        fn()
        best = min(best, time.thread_time() - start)
    return best / items * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sockets", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if not 1 <= args.sockets <= 9000 or args.repeats < 1:
        parser.error("--sockets 1..9000, --repeats >= 1")
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    tcp, info = socket.IPPROTO_TCP, socket.TCP_INFO
    with (
        connections(args.sockets) as (port, accepted),
        socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as nl,
    ):
        nl.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        request, buf = dump_request(socket.AF_INET, port), bytearray(1 << 16)
        inodes = {os.fstat(s.fileno()).st_ino for s in accepted}
        found = dump(nl, request, buf)
        assert inodes <= found.keys(), "the dump missed some of our sockets"
        per_call = cpu_per_item(
            lambda: [s.getsockopt(tcp, info, TCP_INFO_LEN) for s in accepted],
            len(accepted),
            args.repeats,
        )
        per_dump = cpu_per_item(lambda: dump(nl, request, buf), len(accepted), args.repeats)
    print(f"CPU µs per socket, {args.sockets} sockets, best of {args.repeats}")
    print(f"  getsockopt(TCP_INFO) each   {per_call:7.2f}")
    print(f"  one sock_diag dump          {per_dump:7.2f}   ({len(found)} records)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
