"""Make one loopback TCP peer silent with nftables, and capture packets with tcpdump.

Every rule lives in a table of its own (`inet connwatch_test_<pid>_<port>`) that is deleted on
exit, whatever happened, so a failed test never leaves a filter behind. Packets are dropped on
the `input` hook: the sender's stack sees a successful transmission (as with a peer that has
vanished behind a NAT) rather than the EPERM an `output` drop would hand back to it, and tcpdump
on `lo` still sees every packet leave, because capture happens at transmit, before the hook.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import struct
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path


def missing_for_root_tests(*tools: str) -> str | None:
    """Why the dead-peer tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (nftables rules and packet capture on lo)"
    for tool in tools:
        if shutil.which(tool) is None:
            return f"needs the {tool!r} command"
    if "nft" in tools:
        return _nft_refused()
    return None


def _nft_refused() -> str | None:
    """Root in a container may still lack CAP_NET_ADMIN: try a table of our own once."""
    table = f"connwatch_probe_{os.getpid()}"
    made = subprocess.run(["nft", "add", "table", "inet", table], capture_output=True, check=False)
    if made.returncode != 0:
        return f"nft cannot add a table here: {made.stderr.decode().strip()}"
    subprocess.run(["nft", "delete", "table", "inet", table], capture_output=True, check=False)
    return None


async def _run(*argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {err.decode().strip()}")


@contextlib.asynccontextmanager
async def silenced(port: int) -> AsyncIterator[str]:
    """Drop every packet to and from TCP `port` on lo until the block ends; yields the table."""
    rules = [f"iif lo tcp dport {port} drop", f"iif lo tcp sport {port} drop"]
    async with nft_table(f"connwatch_test_{os.getpid()}_{port}", rules) as table:
        yield table


@contextlib.asynccontextmanager
async def nft_table(table: str, rules: list[str]) -> AsyncIterator[str]:
    """`rules` in an input chain of a table of their own, deleted when the block ends."""
    # Priority -300 runs before conntrack (-200), so nothing upstream of us sees the packet.
    script = (
        f"add table inet {table}\n"
        f"add chain inet {table} drop_in {{ type filter hook input priority -300 ; }}\n"
        + "".join(f"add rule inet {table} drop_in {rule}\n" for rule in rules)
    )
    proc = await asyncio.create_subprocess_exec(
        "nft", "-f", "-", stdin=subprocess.PIPE, stderr=subprocess.PIPE
    )
    _, err = await proc.communicate(script.encode())
    try:
        if proc.returncode != 0:
            raise RuntimeError(f"nft -f failed ({proc.returncode}): {err.decode().strip()}")
        yield table
    finally:
        # nft -f applies a script atomically, so either the table exists or nothing does.
        with contextlib.suppress(RuntimeError):
            await _run("nft", "delete", "table", "inet", table)


async def table_exists(table: str) -> bool:
    proc = await asyncio.create_subprocess_exec(
        "nft", "list", "table", "inet", table, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    await proc.communicate()
    return proc.returncode == 0


# -- packet capture ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Packet:
    time: float  # capture time, seconds since the epoch
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int  # TCP flag bits: FIN 0x01, SYN 0x02, RST 0x04, PSH 0x08, ACK 0x10
    payload: int  # TCP payload length


ACK_ONLY = 0x10


@contextlib.asynccontextmanager
async def captured(port: int, path: Path) -> AsyncIterator[Path]:
    """tcpdump on lo for `tcp port PORT` into `path` while the block runs (stopped by its PID)."""
    proc = await asyncio.create_subprocess_exec(
        "tcpdump", "-i", "lo", "-U", "-n", "-w", str(path), f"tcp port {port}",
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        # tcpdump says "listening on lo" once the capture is armed.
        async with asyncio.timeout(10):
            while b"listening on" not in (line := await proc.stderr.readline()):
                if not line:
                    raise RuntimeError("tcpdump exited before it started listening")
        yield path
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)  # flushes and closes the file
            try:
                async with asyncio.timeout(5):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()


def read_pcap(path: Path) -> list[Packet]:
    """The IPv4 TCP packets of a classic pcap file from `tcpdump -i lo` (Ethernet framing)."""
    data = path.read_bytes()
    magic = struct.unpack_from("<I", data)[0]
    order = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    nanos = magic in (0xA1B23C4D, 0x4D3CB2A1)
    linktype = struct.unpack_from(order + "I", data, 20)[0]
    assert linktype == 1, f"expected Ethernet framing on lo, got link type {linktype}"
    packets: list[Packet] = []
    at = 24
    while at + 16 <= len(data):
        sec, frac, caplen, _ = struct.unpack_from(order + "IIII", data, at)
        frame = data[at + 16 : at + 16 + caplen]
        at += 16 + caplen
        packet = _tcp(frame, sec + frac / (1e9 if nanos else 1e6))
        if packet is not None:
            packets.append(packet)
    return packets


def _tcp(frame: bytes, when: float) -> Packet | None:
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":  # IPv4 only: the tests use 127.0.0.1
        return None
    ip = frame[14:]
    ihl = (ip[0] & 0x0F) * 4
    total = struct.unpack_from("!H", ip, 2)[0]
    if ip[9] != 6:
        return None
    tcp = ip[ihl:]
    sport, dport, seq, ack, offset, flags = struct.unpack_from("!HHIIBB", tcp)
    payload = total - ihl - (offset >> 4) * 4
    return Packet(when, sport, dport, seq, ack, flags, payload)
