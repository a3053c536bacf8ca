"""PROXY protocol v1 (text) and v2 (binary) headers, after HAProxy's proxy-protocol.txt.

Pure: no I/O. `parse` is incremental-friendly: call it on everything received so far; it
returns the header and its length, raises IncompleteError while more bytes could still make
a valid header, and ProxyProtocolError as soon as they cannot.

Choices where the specification leaves room (a receiver's, so strict by default):

* v2 LOCAL: the address block is discarded unread and the family byte ignored, as the
  specification says; the header reports family "UNKNOWN" and no addresses.
* v2 PROXY: family/protocol must be one of the seven assigned bytes (0x00, 0x11, 0x12, 0x21,
  0x22, 0x31, 0x32). Only TCP over IPv4/IPv6 is decoded; UNSPEC, UDP and UNIX headers are
  accepted as family "UNKNOWN" (use the real endpoints), but the length must still hold that
  family's address block.
* v2 TLVs after a TCP address block are returned raw in `tlvs`, after checking that the
  type-length-value records exactly fill the space (a bad length is malformed).
* v1: "UNKNOWN" ignores the rest of its line; TCP4/TCP6 need exactly six fields separated by
  single spaces, canonical decimal numbers without leading zeros, and addresses of the family.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from dataclasses import dataclass
from typing import Literal

from connwatch.exceptions import IncompleteError, ProxyProtocolError

__all__ = [
    "MAX_V1",
    "V2_SIGNATURE",
    "ProxyHeader",
    "ProxyProtocolError",
    "encode_v1",
    "encode_v2",
    "header_for",
    "parse",
]

MAX_V1 = 107
V1_SIGNATURE = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

_V2_HEAD = struct.Struct("!12sBBH")  # signature, version/command, family/protocol, length
_V2_VERSION = 0x2
_CMD_LOCAL, _CMD_PROXY = 0x0, 0x1
_FAM_TCP4, _FAM_TCP6 = 0x11, 0x21
# Family/protocol byte -> bytes of address block it implies (spec section 2.2).
_V2_ADDRESS_SIZE = {0x00: 0, 0x11: 12, 0x12: 12, 0x21: 36, 0x22: 36, 0x31: 216, 0x32: 216}
_V1_FAMILIES = (b"TCP4 ", b"TCP6 ", b"UNKNOWN\r", b"UNKNOWN ")
_DECIMAL = re.compile(rb"0|[1-9][0-9]{0,4}")
_IPV4_TEXT = re.compile(rb"(?:(?:0|[1-9][0-9]{0,2})\.){3}(?:0|[1-9][0-9]{0,2})")
_IPV6_TEXT = re.compile(rb"[0-9A-Fa-f:.]{2,45}")

Endpoint = tuple[str, int]
_IP = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    version: int
    command: str  # "PROXY" | "LOCAL"
    family: str  # "TCP4" | "TCP6" | "UNKNOWN"
    source: Endpoint | None
    destination: Endpoint | None
    tlvs: bytes = b""


# --- encoding -------------------------------------------------------------------------------


def _ip(host: str) -> _IP:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address") from None
    # A link-local peer may carry a scope id (fe80::1%eth0); it has no place on the wire.
    return ipaddress.IPv6Address(int(ip)) if isinstance(ip, ipaddress.IPv6Address) else ip


def _check_port(port: int) -> int:
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is outside 0..65535")
    return port


def _pair(source: Endpoint, destination: Endpoint) -> tuple[_IP, _IP]:
    """Both addresses in one family. A mixed pair (an IPv4 client accepted on an IPv6 socket)
    is sent as TCP6 with the IPv4 side v4-mapped, so the client's address still gets through."""
    src, dst = _ip(source[0]), _ip(destination[0])
    if src.version != dst.version:
        src, dst = (
            ipaddress.IPv6Address(f"::ffff:{a}") if a.version == 4 else a for a in (src, dst)
        )
    _check_port(source[1])
    _check_port(destination[1])
    return src, dst


def encode_v1(source: Endpoint | None, destination: Endpoint | None) -> bytes:
    """A v1 text line. Either address None gives `PROXY UNKNOWN\\r\\n`."""
    if source is None or destination is None:
        return b"PROXY UNKNOWN\r\n"
    src, dst = _pair(source, destination)
    family = "TCP4" if src.version == 4 else "TCP6"
    line = f"PROXY {family} {src} {dst} {source[1]} {destination[1]}\r\n"
    return line.encode("ascii")


def encode_v2(
    source: Endpoint | None, destination: Endpoint | None, *, local: bool = False
) -> bytes:
    """A v2 binary header: LOCAL when `local`, PROXY/UNSPEC when an address is None."""
    if local:
        return _V2_HEAD.pack(V2_SIGNATURE, (_V2_VERSION << 4) | _CMD_LOCAL, 0x00, 0)
    command = (_V2_VERSION << 4) | _CMD_PROXY
    if source is None or destination is None:
        return _V2_HEAD.pack(V2_SIGNATURE, command, 0x00, 0)
    src, dst = _pair(source, destination)
    family = _FAM_TCP4 if src.version == 4 else _FAM_TCP6
    block = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1])
    return _V2_HEAD.pack(V2_SIGNATURE, command, family, len(block)) + block


def header_for(version: str, source: Endpoint | None, destination: Endpoint | None) -> bytes:
    """The header a listener configured with `proxy_protocol.send` sends: "v1", "v2", or
    "none" (no header, b"")."""
    if version == "v1":
        return encode_v1(source, destination)
    if version == "v2":
        return encode_v2(source, destination)
    if version == "none":
        return b""
    raise ValueError(f"unknown PROXY protocol version {version!r} (expected v1, v2 or none)")


# --- parsing --------------------------------------------------------------------------------


def parse(data: bytes | bytearray) -> tuple[ProxyHeader, int]:
    """Parse the header at the start of `data`; return it and the bytes it used."""
    raw = bytes(data)
    if raw[:12] == V2_SIGNATURE[: len(raw)] and raw:
        return _parse_v2(raw)
    if raw[:6] == V1_SIGNATURE[: len(raw)]:
        return _parse_v1(raw)
    raise ProxyProtocolError(f"bad signature: {raw[:12]!r} starts neither a v1 nor a v2 header")


def _parse_v2(raw: bytes) -> tuple[ProxyHeader, int]:
    # Each fixed byte is judged as soon as it arrives, so garbage is refused without waiting.
    command = _v2_command(raw[12]) if len(raw) > 12 else None
    if command == _CMD_PROXY and len(raw) > 13 and raw[13] not in _V2_ADDRESS_SIZE:
        raise ProxyProtocolError(f"v2 header: family/protocol byte 0x{raw[13]:02X} is invalid")
    if len(raw) < _V2_HEAD.size:
        raise IncompleteError(f"v2 header: {len(raw)} of {_V2_HEAD.size} bytes")
    _, _, family, length = _V2_HEAD.unpack_from(raw)
    needed = _V2_ADDRESS_SIZE[family] if command == _CMD_PROXY else 0
    if length < needed:
        raise ProxyProtocolError(
            f"v2 header: address length {length} is too short for family 0x{family:02X}"
            f" (needs {needed})"
        )
    total = _V2_HEAD.size + length
    if len(raw) < total:
        raise IncompleteError(f"v2 header: {len(raw)} of {total} bytes")
    if command == _CMD_LOCAL:
        return ProxyHeader(2, "LOCAL", "UNKNOWN", None, None), total
    return _v2_addresses(family, raw[_V2_HEAD.size : total]), total


def _v2_command(version_command: int) -> int:
    version, command = version_command >> 4, version_command & 0x0F
    if version != _V2_VERSION:
        raise ProxyProtocolError(f"v2 header: version {version}, expected 2")
    if command not in (_CMD_LOCAL, _CMD_PROXY):
        raise ProxyProtocolError(f"v2 header: command 0x{command:X} is neither LOCAL nor PROXY")
    return command


def _v2_addresses(family: int, block: bytes) -> ProxyHeader:
    if family == _FAM_TCP4:
        src: _IP = ipaddress.IPv4Address(block[0:4])
        dst: _IP = ipaddress.IPv4Address(block[4:8])
        ports, tlvs, name = block[8:12], block[12:], "TCP4"
    elif family == _FAM_TCP6:
        src, dst = ipaddress.IPv6Address(block[0:16]), ipaddress.IPv6Address(block[16:32])
        ports, tlvs, name = block[32:36], block[36:], "TCP6"
    else:  # UNSPEC, UDP, UNIX: valid but not relayed; the caller uses the real endpoints
        return ProxyHeader(2, "PROXY", "UNKNOWN", None, None)
    _check_tlvs(tlvs)
    sport, dport = struct.unpack("!HH", ports)
    return ProxyHeader(2, "PROXY", name, (str(src), sport), (str(dst), dport), tlvs)


def _check_tlvs(tlvs: bytes) -> None:
    offset = 0
    while offset < len(tlvs):
        if len(tlvs) - offset < 3:
            raise ProxyProtocolError(f"v2 header: truncated TLV at offset {offset}")
        size = int.from_bytes(tlvs[offset + 1 : offset + 3], "big")
        offset += 3 + size
        if offset > len(tlvs):
            raise ProxyProtocolError(f"v2 header: TLV length {size} overruns the header")


def _parse_v1(raw: bytes) -> tuple[ProxyHeader, int]:
    end = raw.find(b"\r\n", 0, MAX_V1)
    if end < 0:
        _v1_check_prefix(raw)
        raise IncompleteError(f"v1 header: no CRLF in {len(raw)} bytes yet")
    line = raw[:end]
    if b"\r" in line or b"\n" in line:
        raise ProxyProtocolError("v1 header: stray CR or LF before the CRLF")
    return _v1_fields(line), end + 2


def _v1_check_prefix(raw: bytes) -> None:
    """Reject a v1 prefix that no more bytes could make valid."""
    if len(raw) >= MAX_V1:
        raise ProxyProtocolError(f"v1 header: no CRLF within {MAX_V1} bytes")
    if b"\n" in raw or b"\r" in raw[:-1]:
        raise ProxyProtocolError("v1 header: stray CR or LF before the CRLF")
    rest = raw[len(V1_SIGNATURE) :]
    if rest and not any(f.startswith(rest[: len(f)]) for f in _V1_FAMILIES):
        raise ProxyProtocolError(f"v1 header: unknown protocol {rest[:8]!r}")


def _v1_fields(line: bytes) -> ProxyHeader:
    fields = line.split(b" ")
    if fields[:2] == [b"PROXY", b"UNKNOWN"]:  # the rest of an UNKNOWN line is ignored
        return ProxyHeader(1, "PROXY", "UNKNOWN", None, None)
    if len(fields) != 6 or fields[1] not in (b"TCP4", b"TCP6"):
        raise ProxyProtocolError(f"v1 header: malformed line {line!r}")
    family: Literal[4, 6] = 4 if fields[1] == b"TCP4" else 6
    src = _v1_address(fields[2], family)
    dst = _v1_address(fields[3], family)
    return ProxyHeader(
        1,
        "PROXY",
        fields[1].decode("ascii"),
        (src, _v1_port(fields[4])),
        (dst, _v1_port(fields[5])),
    )


def _v1_address(text: bytes, family: Literal[4, 6]) -> str:
    pattern = _IPV4_TEXT if family == 4 else _IPV6_TEXT
    if pattern.fullmatch(text):
        try:
            ip = ipaddress.ip_address(text.decode("ascii"))
        except ValueError:
            pass
        else:
            if ip.version == family:
                return str(ip)
    raise ProxyProtocolError(f"v1 header: {text!r} is not a TCP{family} address")


def _v1_port(text: bytes) -> int:
    if _DECIMAL.fullmatch(text) and int(text) <= 65535:
        return int(text)
    raise ProxyProtocolError(f"v1 header: {text!r} is not a port (0..65535, no leading zeros)")
