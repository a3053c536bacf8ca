"""Linux `struct tcp_info` from `getsockopt(IPPROTO_TCP, TCP_INFO)`. Stdlib only.

The liveness watchdog calls this at every heartbeat for every socket, so the read is one
system call and one precompiled `struct.Struct` unpack. `read_tcp_info()` returns the full
frozen record; `read_tcp_core()` returns a plain tuple of the few fields the watchdog needs
and costs about half as much (figures in docs/tcp_info.md, from bench/tcp_info_cost.py). A beat
itself (`socket_leg.SocketLeg.beat`) unpacks first only `PLAIN_FIELDS`, with `unpack_plain`.

The layout is include/uapi/linux/tcp.h. The kernel copies min(optlen, sizeof(struct tcp_info))
bytes, so an older kernel returns a shorter struct: fields past the returned length are None in
`TcpInfo`. Fields after `tcpi_rcv_wnd` (rehash, total_rto*, AccECN counters) are not requested.

Byte offsets (native byte order, no padding up to offset 236):
      0 u8  state                 1 u8  ca_state          2 u8  retransmits     3 u8 probes
      4 u8  backoff               5 u8  options
      6 u8  snd_wscale:4, rcv_wscale:4
      7 u8  delivery_rate_app_limited:1, fastopen_client_fail:2
      8 u32 rto  12 ato  16 snd_mss  20 rcv_mss  24 unacked  28 sacked  32 lost  36 retrans
     40 u32 fackets  44 last_data_sent  48 last_ack_sent  52 last_data_recv  56 last_ack_recv
     60 u32 pmtu  64 rcv_ssthresh  68 rtt  72 rttvar  76 snd_ssthresh  80 snd_cwnd  84 advmss
     88 u32 reordering  92 rcv_rtt  96 rcv_space  100 total_retrans
    104 u64 pacing_rate  112 max_pacing_rate  120 bytes_acked  128 bytes_received
    136 u32 segs_out  140 segs_in  144 notsent_bytes  148 min_rtt  152 data_segs_in
    156 u32 data_segs_out
    160 u64 delivery_rate  168 busy_time  176 rwnd_limited  184 sndbuf_limited
    192 u32 delivered  196 delivered_ce
    200 u64 bytes_sent  208 bytes_retrans
    216 u32 dsack_dups  220 reord_seen  224 rcv_ooopack  228 snd_wnd  232 rcv_wnd   (end 236)
"""

from __future__ import annotations

import operator
import socket
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Final

from connwatch._types import SocketLike

__all__ = [
    "CORE_ACKED",
    "CORE_FIELDS",
    "CORE_LAST_ACK_MS",
    "CORE_LAST_SENT_MS",
    "CORE_NOTSENT",
    "CORE_PROBES",
    "CORE_RTT_US",
    "CORE_SIZE",
    "CORE_SND_WND",
    "CORE_STATE",
    "CORE_TOTAL_RETRANS",
    "CORE_UNACKED",
    "PLAIN_FIELDS",
    "TCP_ESTABLISHED",
    "TCP_INFO_SIZE",
    "TCP_INFO_SUPPORTED",
    "TCP_STATES",
    "TcpCore",
    "TcpInfo",
    "parse_core",
    "parse_tcp_info",
    "plain_of_short",
    "read_tcp_core",
    "read_tcp_info",
    "unpack_plain",
]

# include/net/tcp_states.h
TCP_STATES: Final[Mapping[int, str]] = MappingProxyType(
    {
        1: "ESTABLISHED",
        2: "SYN_SENT",
        3: "SYN_RECV",
        4: "FIN_WAIT1",
        5: "FIN_WAIT2",
        6: "TIME_WAIT",
        7: "CLOSE",
        8: "CLOSE_WAIT",
        9: "LAST_ACK",
        10: "LISTEN",
        11: "CLOSING",
        12: "NEW_SYN_RECV",
        13: "BOUND_INACTIVE",
    }
)
TCP_ESTABLISHED: Final = 1


@dataclass(frozen=True, slots=True)
class TcpInfo:
    """One `struct tcp_info` snapshot. Units are in the names: `_us` microseconds, `_ms`
    milliseconds ago (the `last_*` fields), rates in bytes per second; the rest are counts,
    bytes or segments as the kernel keeps them. `int | None` fields are None when the kernel
    returned too few bytes to cover them."""

    state: int
    ca_state: int
    retransmits: int  # retransmits of the current unacknowledged segment (resets on ACK)
    probes: int  # unanswered keep-alive / zero-window probes
    backoff: int  # RTO backoff exponent (also grows while zero-window probing)
    options: int  # TCPI_OPT_* bits
    snd_wscale: int
    rcv_wscale: int
    delivery_rate_app_limited: bool
    fastopen_client_fail: int
    rto_us: int
    ato_us: int
    snd_mss: int
    rcv_mss: int
    unacked: int  # segments sent and not yet acknowledged
    sacked: int
    lost: int
    retrans: int
    fackets: int
    last_data_sent_ms: int
    last_ack_sent_ms: int  # never filled in by Linux
    last_data_recv_ms: int
    last_ack_recv_ms: int
    pmtu: int
    rcv_ssthresh: int
    rtt_us: int
    rttvar_us: int
    snd_ssthresh: int
    snd_cwnd: int
    advmss: int
    reordering: int
    rcv_rtt_us: int
    rcv_space: int
    total_retrans: int
    pacing_rate: int | None = None
    max_pacing_rate: int | None = None
    bytes_acked: int | None = None  # counts the SYN on the connecting side
    bytes_received: int | None = None
    segs_out: int | None = None
    segs_in: int | None = None
    notsent_bytes: int | None = None  # queued, not yet sent (e.g. held back by a zero window)
    min_rtt_us: int | None = None
    data_segs_in: int | None = None
    data_segs_out: int | None = None
    delivery_rate: int | None = None
    busy_time_us: int | None = None
    rwnd_limited_us: int | None = None
    sndbuf_limited_us: int | None = None
    delivered: int | None = None
    delivered_ce: int | None = None
    bytes_sent: int | None = None
    bytes_retrans: int | None = None
    dsack_dups: int | None = None
    reord_seen: int | None = None
    rcv_ooopack: int | None = None
    snd_wnd: int | None = None  # the peer's advertised window; 0 = peer not reading
    rcv_wnd: int | None = None  # our advertised window; 0 = we are not reading

    @property
    def state_name(self) -> str:
        return TCP_STATES.get(self.state, f"UNKNOWN_{self.state}")

    @property
    def rtt_s(self) -> float:
        return self.rtt_us / 1_000_000


# struct codes and end offsets of the fields after total_retrans, in order: the kernel's
# returned length decides how many of them are present.
_OPTIONAL: Final = (
    ("Q", 112), ("Q", 120), ("Q", 128), ("Q", 136),  # pacing..bytes_received
    ("I", 140), ("I", 144), ("I", 148), ("I", 152), ("I", 156), ("I", 160),  # segs..data_segs
    ("Q", 168), ("Q", 176), ("Q", 184), ("Q", 192),  # delivery_rate..sndbuf_limited
    ("I", 196), ("I", 200),  # delivered, delivered_ce
    ("Q", 208), ("Q", 216),  # bytes_sent, bytes_retrans
    ("I", 220), ("I", 224), ("I", 228), ("I", 232), ("I", 236),  # dsack_dups..rcv_wnd
)  # fmt: skip
_BASE_FORMAT: Final = "8B24I"  # through total_retrans
_LAYOUT: Final = struct.Struct("=" + _BASE_FORMAT + "".join(code for code, _ in _OPTIONAL))
TCP_INFO_SIZE: Final = _LAYOUT.size  # bytes requested from the kernel: through rcv_wnd
_BASE_SIZE: Final = struct.calcsize("=" + _BASE_FORMAT)
_BASE_COUNT: Final = 32  # unpacked values through total_retrans
_ZEROS: Final = bytes(TCP_INFO_SIZE)

# C bitfields fill a byte from the least significant bit on little-endian ABIs and from the
# most significant bit on big-endian ones.
_LITTLE: Final = sys.byteorder == "little"
_SND_WSCALE_SHIFT, _RCV_WSCALE_SHIFT = (0, 4) if _LITTLE else (4, 0)
_APP_LIMITED_SHIFT, _FASTOPEN_FAIL_SHIFT = (0, 1) if _LITTLE else (7, 5)

# FreeBSD and macOS have a TCP_INFO of their own with a different struct: Linux only.
_SUPPORTED: Final = sys.platform.startswith("linux") and hasattr(socket, "TCP_INFO")
_TCP_INFO: Final[int] = getattr(socket, "TCP_INFO", -1)
_IPPROTO_TCP: Final = socket.IPPROTO_TCP


def _check_layout() -> None:
    """Import-time guard that the offsets table, the struct and the dataclass agree."""
    offset = _BASE_SIZE
    for code, end in _OPTIONAL:
        offset += struct.calcsize("=" + code)
        assert offset == end, (code, end)
    assert _BASE_SIZE == 104
    assert TCP_INFO_SIZE == 236
    # The two bitfield bytes become four fields.
    assert len(fields(TcpInfo)) == _BASE_COUNT + 2 + len(_OPTIONAL)


_check_layout()


def parse_tcp_info(data: bytes) -> TcpInfo | None:
    """Parse the bytes getsockopt returned; None when even the base struct is missing."""
    size = len(data)
    if size >= TCP_INFO_SIZE:
        v = _LAYOUT.unpack_from(data)
    elif size >= _BASE_SIZE:
        v = _LAYOUT.unpack(data + _ZEROS[size:])
        present = sum(1 for _, end in _OPTIONAL if end <= size)
        v = v[: _BASE_COUNT + present] + (None,) * (len(_OPTIONAL) - present)
    else:
        return None
    wscale, flags = v[6], v[7]
    args = (
        *v[:6],
        (wscale >> _SND_WSCALE_SHIFT) & 0xF,
        (wscale >> _RCV_WSCALE_SHIFT) & 0xF,
        bool((flags >> _APP_LIMITED_SHIFT) & 1),
        (flags >> _FASTOPEN_FAIL_SHIFT) & 0x3,
        *v[8:],
    )
    return TcpInfo(*args)


def read_tcp_info(sock: SocketLike) -> TcpInfo | None:
    """TCP_INFO of a socket; None on non-Linux, for non-TCP and closed sockets, on any OSError."""
    if not _SUPPORTED:
        return None
    try:
        data = sock.getsockopt(_IPPROTO_TCP, _TCP_INFO, TCP_INFO_SIZE)
    except (OSError, ValueError):  # ValueError: a closed uvloop pseudo-socket (fd -1)
        return None
    return parse_tcp_info(data)


# The watchdog's fields, in memory order: one sparse unpack gives them in this order.
CORE_FIELDS: Final = (
    "state",
    "retransmits",
    "probes",
    "unacked",
    "last_data_sent_ms",
    "last_data_recv_ms",
    "last_ack_recv_ms",
    "rtt_us",
    "rttvar_us",
    "total_retrans",
    "bytes_acked",
    "notsent_bytes",
    "snd_wnd",
)
TcpCore = tuple[int, ...]  # what read_tcp_core() returns
# Positions in read_tcp_core()'s tuple; -1 there means "this kernel does not report it".
CORE_STATE: Final = CORE_FIELDS.index("state")
CORE_PROBES: Final = CORE_FIELDS.index("probes")
CORE_UNACKED: Final = CORE_FIELDS.index("unacked")
CORE_RTT_US: Final = CORE_FIELDS.index("rtt_us")
CORE_LAST_SENT_MS: Final = CORE_FIELDS.index("last_data_sent_ms")
CORE_LAST_ACK_MS: Final = CORE_FIELDS.index("last_ack_recv_ms")
CORE_TOTAL_RETRANS: Final = CORE_FIELDS.index("total_retrans")
CORE_NOTSENT: Final = CORE_FIELDS.index("notsent_bytes")
CORE_SND_WND: Final = CORE_FIELDS.index("snd_wnd")
CORE_ACKED: Final = CORE_FIELDS.index("bytes_acked")
_CORE_AT: Final = {
    "state": ("B", 0), "retransmits": ("B", 2), "probes": ("B", 3), "unacked": ("I", 24),
    "last_data_sent_ms": ("I", 44), "last_data_recv_ms": ("I", 52),
    "last_ack_recv_ms": ("I", 56), "rtt_us": ("I", 68), "rttvar_us": ("I", 72),
    "total_retrans": ("I", 100), "bytes_acked": ("Q", 120), "notsent_bytes": ("I", 144),
    "snd_wnd": ("I", 228),
}  # fmt: skip


# What a beat reads first (`SocketLeg.beat`): enough to find a socket plainly fine, in memory
# order. The rest of the core is unpacked only for a socket that needs judging.
PLAIN_FIELDS: Final = ("state", "unacked", "rtt_us", "total_retrans", "bytes_acked", "snd_wnd")


def _sparse_struct(names: tuple[str, ...]) -> struct.Struct:
    """A Struct reading only the named fields (given in memory order), skipping the rest."""
    fmt, pos = "=", 0
    for name in names:
        code, offset = _CORE_AT[name]
        assert offset >= pos, f"{name} out of memory order"
        fmt += f"{offset - pos}x{code}" if offset > pos else code
        pos = offset + struct.calcsize("=" + code)
    return struct.Struct(fmt)


_CORE_LAYOUT: Final = _sparse_struct(CORE_FIELDS)
_PLAIN_LAYOUT: Final = _sparse_struct(PLAIN_FIELDS)
CORE_SIZE: Final = _CORE_LAYOUT.size  # bytes to ask getsockopt for: through snd_wnd
assert _PLAIN_LAYOUT.size == CORE_SIZE
# The hot path's parser: `Struct.unpack` of exactly CORE_SIZE bytes, PLAIN_FIELDS only. It raises
# struct.error on the shorter struct of an older kernel, which `plain_of_short()` then reads.
unpack_plain: Final = _PLAIN_LAYOUT.unpack
_PLAIN_OF_CORE: Final = operator.itemgetter(*(CORE_FIELDS.index(n) for n in PLAIN_FIELDS))
TCP_INFO_SUPPORTED: Final = _SUPPORTED


def parse_core(data: bytes) -> TcpCore | None:
    """The watchdog's fields from getsockopt's bytes; on an older kernel's shorter struct a
    field it does not return is -1; None when even the base struct is missing."""
    if len(data) >= CORE_SIZE:
        core: TcpCore = _CORE_LAYOUT.unpack_from(data)
        return core
    info = parse_tcp_info(data)
    if info is None:
        return None
    values = (getattr(info, name) for name in CORE_FIELDS)
    return tuple(-1 if value is None else value for value in values)


def plain_of_short(data: bytes) -> TcpCore | None:
    """PLAIN_FIELDS from fewer than CORE_SIZE bytes (-1 where missing), as `parse_core`."""
    core = parse_core(data)
    if core is None:
        return None
    plain: TcpCore = _PLAIN_OF_CORE(core)
    return plain


def read_tcp_core(sock: SocketLike) -> TcpCore | None:
    """The watchdog's fields, in `CORE_FIELDS` order, as a plain tuple: cheaper than a TcpInfo.

    A field an older kernel does not return is -1 (snd_wnd needs Linux 5.4 or later).
    None in the same cases as `read_tcp_info()`.
    """
    if not _SUPPORTED:
        return None
    try:
        data = sock.getsockopt(_IPPROTO_TCP, _TCP_INFO, CORE_SIZE)
    except (OSError, ValueError):
        return None
    return parse_core(data)
