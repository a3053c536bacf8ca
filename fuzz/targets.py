"""Fuzz targets: one function per parser, bytes in, AssertionError out when an invariant breaks.

Pure and deterministic, so the same targets serve atheris (`fuzz/run_atheris.py`), a long
hypothesis run (`fuzz/run_hypothesis.py`) and the bounded in-suite run
(tests/config/test_config_fuzz.py). Any exception other than the parser's own error type escapes and
counts as a finding.
"""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

from connwatch.config import Settings, effective_yaml, load_settings
from connwatch.exceptions import ConfigError, IncompleteError
from connwatch.wire import proxy_protocol
from connwatch.wire.heartbeat_frame import (
    FRAME_SIZE,
    MAGIC,
    Frame,
    FrameDecoder,
    FrameError,
    decode,
    encode,
)
from connwatch.wire.proxy_protocol import ProxyHeader, ProxyProtocolError

CATCH_ALL = "cannot load the configuration"  # load_settings' wrapper for unexpected exceptions
# Catch-all issues to let pass, "|"-separated substrings: keeps a long run going past a finding
# already reported (e.g. CONNWATCH_FUZZ_KNOWN="keywords must be strings"). Empty: strict.
KNOWN = tuple(k for k in os.environ.get("CONNWATCH_FUZZ_KNOWN", "").split("|") if k)
_MAGIC = struct.pack("!I", MAGIC)


# -- chunking: the first bytes of the input choose where a stream is cut ------------------------
def split_input(data: bytes) -> tuple[list[int], bytes]:
    """(cut sizes, payload): byte 0 = number of cuts (mod 8), then one size byte per cut."""
    if not data:
        return [], b""
    count = data[0] % 8
    sizes = list(data[1 : 1 + count])
    return sizes, data[1 + count :]


def chunks(payload: bytes, sizes: list[int]) -> list[bytes]:
    out, at = [], 0
    for size in sizes:
        out.append(payload[at : at + size])
        at += size
    out.append(payload[at:])
    return out


# -- heartbeat frames -----------------------------------------------------------------------------
def _reference(stream: bytes) -> tuple[list[Frame], str | None]:
    """What a decoder must make of the whole stream: frames up to the first bad one, and its
    check name (a partial tail with a wrong magic prefix is already bad)."""
    frames: list[Frame] = []
    whole = len(stream) - len(stream) % FRAME_SIZE
    for at in range(0, whole, FRAME_SIZE):
        try:
            frames.append(decode(stream[at : at + FRAME_SIZE]))
        except FrameError as exc:
            return frames, exc.check
    tail = stream[whole : whole + 4]
    if tail != _MAGIC[: len(tail)]:
        return frames, "magic"
    return frames, None


def frames_target(data: bytes) -> None:
    """FrameDecoder fed the payload in the chunks the input chooses."""
    sizes, stream = split_input(data)
    expected, error = _reference(stream)
    decoder = FrameDecoder()
    got: list[Frame] = []
    raised: str | None = None
    for piece in chunks(stream, sizes):
        try:
            got += decoder.feed(memoryview(piece) if len(piece) % 2 else bytearray(piece))
        except FrameError as exc:
            raised = exc.check
            break
        assert decoder.pending < FRAME_SIZE
    assert raised == error, (raised, error)
    # Frames decoded in the failing call are dropped with it: a prefix of the reference.
    assert got == expected[: len(got)]
    if error is None:
        assert got == expected
        assert decoder.pending == len(stream) % FRAME_SIZE
    else:
        assert decoder.failed is not None
        try:
            decoder.feed(b"")
        except FrameError:
            pass
        else:
            raise AssertionError("a failed decoder accepted more input")
    for frame in got:
        assert decode(encode(frame)) == frame


# -- PROXY protocol -------------------------------------------------------------------------------
Outcome = tuple[str, ProxyHeader | None, int]


def _parse(data: bytes) -> Outcome:
    try:
        header, used = proxy_protocol.parse(data)
    except IncompleteError:
        return "incomplete", None, 0
    except ProxyProtocolError:
        return "error", None, 0
    return "ok", header, used


def proxy_target(data: bytes) -> None:
    """parse() on every prefix the input's chunking produces, as the listener calls it."""
    sizes, raw = split_input(data)
    whole = _parse(raw)
    if whole[0] == "ok":
        header, used = whole[1], whole[2]
        assert header is not None
        assert 0 < used <= len(raw)
        assert _parse(raw[:used]) == whole  # the header alone is enough
        assert _parse(raw[: used - 1])[0] == "incomplete"
        _roundtrip(header)
    seen = b""
    for piece in chunks(raw, sizes):
        seen += piece
        step = _parse(seen)
        # Monotonic: a prefix is never an error when more data makes it fine, nor fine when
        # more data makes it an error, and a complete header stays the same header.
        if step[0] == "error":
            assert whole[0] == "error", (seen, whole)
        elif step[0] == "ok":
            assert step == whole, (seen, step, whole)


def _roundtrip(header: ProxyHeader) -> None:
    if header.command == "LOCAL":
        encoded = proxy_protocol.encode_v2(None, None, local=True)
    elif header.source is None or header.destination is None:
        encoded = proxy_protocol.header_for(f"v{header.version}", None, None)
    else:
        encoded = proxy_protocol.header_for(f"v{header.version}", header.source, header.destination)
    again, used = proxy_protocol.parse(encoded)
    assert used == len(encoded)
    assert (again.command, again.family, again.source, again.destination) == (
        header.command,
        header.family,
        header.source,
        header.destination,
    ), (header, again)


# -- configuration ----------------------------------------------------------------------------------
_SCRATCH = Path(tempfile.gettempdir()) / f"connwatch-fuzz-{os.getpid()}"


def config_target(data: bytes) -> None:
    """A YAML file with these bytes: a Settings or a ConfigError, never anything else."""
    _SCRATCH.mkdir(exist_ok=True)
    path = _SCRATCH / "config.yaml"
    path.write_bytes(data)
    settings = load_or_issues(path)
    if isinstance(settings, Settings):
        # What check-config prints loads back to the same settings.
        again_path = _SCRATCH / "effective.yaml"
        again_path.write_text(effective_yaml(settings, show_secrets=True))
        again = load_or_issues(again_path)
        assert again == settings, (data[:200], again)


def load_or_issues(path: Path) -> Settings | list[str]:
    try:
        return load_settings(path, env={})
    except ConfigError as exc:
        issues = list(exc.issues)
    assert issues, "a ConfigError without issues"
    unexpected = [i for i in issues if CATCH_ALL in i and not any(k in i for k in KNOWN)]
    assert not unexpected, issues
    return issues


TARGETS: dict[str, Callable[[bytes], None]] = {
    "proxy": proxy_target,
    "frames": frames_target,
    "config": config_target,
}
