"""PROXY protocol v1/v2 (SPEC section 8): fixed vectors from the HAProxy specification's
rules, plus property-based round trips and garbage resistance."""

from __future__ import annotations

import contextlib
import ipaddress
import struct
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from connwatch.exceptions import IncompleteError, ProtocolError
from connwatch.wire.proxy_protocol import (
    MAX_V1,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyProtocolError,
    encode_v1,
    encode_v2,
    header_for,
    parse,
)

Encoder = Callable[..., bytes]
ports = st.integers(min_value=0, max_value=65535)
v4 = st.ip_addresses(v=4).map(str)
v6 = st.ip_addresses(v=6).map(str)
same_family = st.one_of(st.tuples(v4, v4), st.tuples(v6, v6))
payloads = st.binary(max_size=64)
encoders = st.sampled_from([encode_v1, encode_v2])


def _parse_error(data: bytes) -> str:
    with pytest.raises(ProxyProtocolError) as info:
        parse(data)
    return str(info.value)


# --- round trips ----------------------------------------------------------------------------


@given(same_family, ports, ports, payloads, encoders)
def test_parse_of_an_encoded_header_gives_back_the_addresses_and_the_payload(
    hosts: tuple[str, str], sport: int, dport: int, payload: bytes, encoder: Encoder
) -> None:
    header_bytes: bytes = encoder((hosts[0], sport), (hosts[1], dport))
    header, used = parse(header_bytes + payload)
    assert used == len(header_bytes)
    assert (header_bytes + payload)[used:] == payload
    assert header.version == (1 if encoder is encode_v1 else 2)
    assert header.command == "PROXY"
    assert header.family == ("TCP4" if ":" not in hosts[0] else "TCP6")
    assert header.source == (hosts[0], sport)
    assert header.destination == (hosts[1], dport)


@given(v4, v6, ports, ports, encoders)
def test_mixed_families_are_sent_as_tcp6_with_v4_mapped(
    a: str, b: str, sport: int, dport: int, encoder: Encoder
) -> None:
    header, _ = parse(encoder((a, sport), (b, dport)))
    assert header.family == "TCP6"
    assert header.source is not None
    assert ipaddress.IPv6Address(header.source[0]).ipv4_mapped == ipaddress.IPv4Address(a)
    assert header.destination == (b, dport)


def test_v1_encodes_the_exact_spec_bytes() -> None:
    assert encode_v1(("192.168.0.1", 56324), ("192.168.0.11", 443)) == (
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
    )
    assert encode_v1(None, ("1.2.3.4", 1)) == b"PROXY UNKNOWN\r\n"
    assert encode_v1(("fe80::1%eth0", 1), ("::1", 2)) == b"PROXY TCP6 fe80::1 ::1 1 2\r\n"


def test_v2_encodes_the_exact_spec_bytes() -> None:
    data = encode_v2(("1.2.3.4", 5), ("10.0.0.1", 80))
    assert data == V2_SIGNATURE + bytes.fromhex("2111000c 01020304 0a000001 0005 0050")
    assert encode_v2(None, None, local=True) == V2_SIGNATURE + b"\x20\x00\x00\x00"
    assert encode_v2(None, None) == V2_SIGNATURE + b"\x21\x00\x00\x00"


def test_unknown_and_local_headers_parse_without_addresses() -> None:
    assert parse(b"PROXY UNKNOWN\r\nxyz") == (
        ProxyHeader(1, "PROXY", "UNKNOWN", None, None),
        15,
    )
    worst = b"PROXY UNKNOWN " + b"f" * 91 + b"\r\n"  # UNKNOWN ignores the rest of the line
    assert parse(worst)[1] == len(worst) == MAX_V1
    local = V2_SIGNATURE + b"\x20\x11\x00\x0c" + bytes(12)  # LOCAL ignores the address block
    assert parse(local) == (ProxyHeader(2, "LOCAL", "UNKNOWN", None, None), 28)


@pytest.mark.parametrize(("family", "size"), [(0x00, 0), (0x12, 12), (0x22, 36), (0x31, 216)])
def test_v2_unrelayed_families_are_unknown(family: int, size: int) -> None:
    data = V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", size) + bytes(size)
    assert parse(data) == (ProxyHeader(2, "PROXY", "UNKNOWN", None, None), 16 + size)


def test_v2_tlvs_are_returned() -> None:
    tlvs = b"\x01\x00\x02h2" + b"\x04\x00\x00"
    base = encode_v2(("1.2.3.4", 5), ("5.6.7.8", 9))
    data = base[:14] + struct.pack("!H", 12 + len(tlvs)) + base[16:] + tlvs
    header, used = parse(data + b"rest")
    assert used == len(data)
    assert header.tlvs == tlvs


def test_header_for_picks_the_encoder_by_version_and_rejects_unknown_ones() -> None:
    src, dst = ("1.2.3.4", 5), ("5.6.7.8", 9)
    assert header_for("v1", src, dst) == encode_v1(src, dst)
    assert header_for("v2", src, dst) == encode_v2(src, dst)
    assert header_for("none", src, dst) == b""
    with pytest.raises(ValueError, match="v3"):
        header_for("v3", src, dst)


@pytest.mark.parametrize(
    ("source", "destination"),
    [(("host.example", 1), ("1.2.3.4", 2)), (("1.2.3.4", 65536), ("1.2.3.4", 2))],
)
def test_encode_rejects_bad_input(source: tuple[str, int], destination: tuple[str, int]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - either message is fine
        encode_v1(source, destination)
    with pytest.raises(ValueError):  # noqa: PT011
        encode_v2(source, destination)


# --- incomplete input -----------------------------------------------------------------------


@given(same_family, ports, ports, encoders, st.data())
def test_any_prefix_is_incomplete(
    hosts: tuple[str, str], sport: int, dport: int, encoder: Encoder, data: st.DataObject
) -> None:
    full: bytes = encoder((hosts[0], sport), (hosts[1], dport))
    cut = data.draw(st.integers(min_value=0, max_value=len(full) - 1))
    with pytest.raises(IncompleteError):
        parse(full[:cut])


def test_every_prefix_of_fixed_headers_is_incomplete() -> None:
    for full in (b"PROXY UNKNOWN\r\n", encode_v2(None, None, local=True)):
        for cut in range(len(full)):
            with pytest.raises(IncompleteError):
                parse(full[:cut])


# --- malformed input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"G", "signature"),
        (b"\r\n\r\n\x00\r\nQUIX", "signature"),
        (b"PROXZ", "signature"),
        (b"PROXY TCP5", "protocol"),
        (b"PROXY tcp4 ", "protocol"),
        (b"PROXY TCP4 1.2.3.4\n", "stray"),
        (b"PROXY TCP4 1.2.3.4\rx", "stray"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "malformed"),
        (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "malformed"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "malformed"),
        (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "not a TCP4 address"),
        (b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", "not a TCP4 address"),
        (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "not a TCP4 address"),
        (b"PROXY TCP6 ::1 1.2.3.4 1 2\r\n", "not a TCP6 address"),
        (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "not a TCP6 address"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "not a port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", "not a port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 +2\r\n", "not a port"),
        (b"PROXY UNKNOWNX\r\n", "malformed"),
        (V2_SIGNATURE + b"\x11", "version"),
        (V2_SIGNATURE + b"\x22", "command"),
        (V2_SIGNATURE + b"\x21\x13", "family"),
        (V2_SIGNATURE + b"\x21\x41", "family"),
        (V2_SIGNATURE + b"\x21\x11\x00\x0b", "too short"),
        (V2_SIGNATURE + b"\x21\x21\x00\x0c", "too short"),
        (V2_SIGNATURE + b"\x21\x31\x00\x24", "too short"),
        (V2_SIGNATURE + b"\x21\x11\x00\x0e" + bytes(14), "truncated TLV"),
        (V2_SIGNATURE + b"\x21\x11\x00\x0f" + bytes(12) + b"\x01\x00\x01", "overruns"),
    ],
)
def test_malformed_input_is_rejected_saying_why(data: bytes, says: str) -> None:
    assert says in _parse_error(data)


def test_oversized_v1_is_rejected() -> None:
    line = b"PROXY TCP6 " + b"f" * 200
    for size in (MAX_V1, MAX_V1 + 1, len(line)):
        assert "no CRLF within 107" in _parse_error(line[:size])
    # 108 bytes with the CRLF at the very end is one byte too long.
    long_unknown = b"PROXY UNKNOWN " + b"f" * 92 + b"\r\n"
    assert len(long_unknown) == MAX_V1 + 1
    assert "107" in _parse_error(long_unknown)
    with pytest.raises(IncompleteError):
        parse(line[: MAX_V1 - 1])


@given(st.binary(max_size=300))
def test_random_bytes_never_crash(data: bytes) -> None:
    try:
        header, used = parse(data)
    except (IncompleteError, ProxyProtocolError):
        return
    assert 0 < used <= len(data)
    assert header.version in (1, 2)


@given(st.binary(max_size=120))
def test_random_bytes_after_a_signature_raise_only_protocol_errors(data: bytes) -> None:
    for signature in (b"PROXY ", V2_SIGNATURE):
        with contextlib.suppress(IncompleteError, ProxyProtocolError):
            parse(signature + data)


@given(st.binary(min_size=1, max_size=40))
def test_first_mismatch_is_decided_at_once(data: bytes) -> None:
    """A prefix matching neither signature is refused however short it is."""
    if V2_SIGNATURE.startswith(data[:12]) or b"PROXY ".startswith(data[:6]):
        return
    with pytest.raises(ProxyProtocolError, match="signature"):
        parse(data)


def test_errors_are_protocol_errors() -> None:
    assert issubclass(ProxyProtocolError, ProtocolError)
    assert issubclass(IncompleteError, ProtocolError)
    assert not issubclass(IncompleteError, ProxyProtocolError)
