r"""The escape codec of `send_expect` bytes: `PING\r\n` <-> b"PING\r\n". Pure, no pydantic."""

from __future__ import annotations

import re

_ESCAPES = {"r": b"\r", "n": b"\n", "t": b"\t", "\\": b"\\", "0": b"\0"}
_ESCAPE_RE = re.compile(r"\\(x[0-9a-fA-F]{2}|[rnt0\\])")


def decode_escapes(text: str) -> bytes:
    r"""`PING\r\n` -> b"PING\r\n": `\r \n \t \0 \\ \xNN` are decoded, the rest is UTF-8.

    ValueError for a backslash that starts no known escape.
    """
    _check_escapes(text)
    out, pos = bytearray(), 0
    for match in _ESCAPE_RE.finditer(text):
        out += text[pos : match.start()].encode("utf-8", "strict")
        code = match.group(1)
        out += bytes([int(code[1:], 16)]) if code[0] == "x" else _ESCAPES[code]
        pos = match.end()
    return bytes(out + text[pos:].encode("utf-8", "strict"))


def _check_escapes(text: str) -> None:
    """Refuse a backslash that starts no known escape (a typo would otherwise go on the wire)."""
    pos = 0
    while (pos := text.find("\\", pos)) >= 0:
        match = _ESCAPE_RE.match(text, pos)
        if match is None:
            raise ValueError(
                f"unknown escape '{text[pos : pos + 2]}'; allowed: \\r \\n \\t \\0 \\\\ \\xNN"
            )
        pos = match.end()


_ESCAPE_NAMES = {ord("\r"): "\\r", ord("\n"): "\\n", ord("\t"): "\\t", 0: "\\0", ord("\\"): "\\\\"}


def encode_escapes(data: bytes) -> str:
    r"""The canonical escaped text of `data`: printable ASCII as is, `\r \n \t \0 \\`, else `\xNN`."""
    return "".join(
        _ESCAPE_NAMES.get(byte) or (chr(byte) if 0x20 <= byte < 0x7F else f"\\x{byte:02x}")
        for byte in data
    )
