"""structlog set-up: one JSON object a line on stdout (or a console format for humans)."""

from __future__ import annotations

import logging
import os
import select
import sys
import time
from collections.abc import Callable, MutableMapping
from typing import Any, Final, TextIO

import orjson
import structlog

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


# "000" .. "999": a timestamp's microseconds as two lookups, not str() of a 19-digit clock and
# slices of it (with the clock read inline: 13.5k -> 12.4k instructions a line, measured).
_DIGITS: Final = tuple(f"{i:03d}" for i in range(1000))
_NS: Final = 1_000_000_000


class _Stamper:
    """RFC 3339 UTC timestamps with microseconds; the seconds part is formatted once a second.

    Connection events are logged on the hot path of connection churn, where structlog's own
    TimeStamper (a datetime per line) is a measurable share of the cost.
    """

    __slots__ = ("end", "prefix", "second", "start")

    def __init__(self) -> None:
        self.second = -1
        self.start = self.end = 0  # `second` .. the next one, in time.time_ns() units
        self.prefix = ""  # the formatted `second`

    def __call__(self, logger: Any, name: str, event: MutableMapping[str, Any]) -> Any:
        event["timestamp"] = self.now()
        return event

    def now(self) -> str:
        now = time.time()
        second = int(now)
        if second != self.second:
            self.turn(second)
        return f"{self.prefix}.{int((now - second) * 1e6):06d}Z"

    def turn(self, second: int) -> None:
        self.second = second
        self.start, self.end = second * _NS, (second + 1) * _NS
        self.prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


class LineLogger:
    """A structlog logger that writes each line with a single write() call.

    Worker processes share the daemon's stdout. `print()` writes a line and its newline
    separately, and unbuffered (PYTHONUNBUFFERED, as in the Docker image) that is two write()s
    another process's line can land between. One write() of a line up to PIPE_BUF bytes is never
    split on a pipe, and one to a file opened for appending never on a local filesystem.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        try:
            self._fd: int | None = stream.fileno()
        except (AttributeError, OSError, ValueError):  # StringIO, pytest's capture
            self._fd = None

    def msg(self, message: str) -> None:
        self.write_line((message + "\n").encode())

    def write_line(self, line: bytes) -> None:
        """One whole line, newline included, in one write()."""
        if self._fd is None:
            self._stream.write(line.decode())
            self._stream.flush()
            return
        self._stream.flush()  # anything printed to the stream by other means goes first
        data = memoryview(line)
        while data:
            try:
                data = data[os.write(self._fd, data) :]
            except BlockingIOError:  # someone made the descriptor non-blocking: wait for room
                select.select([], [self._fd], [], 1.0)

    debug = info = warning = warn = error = err = critical = exception = fatal = failure = msg


# orjson (C) renders every JSON line: ~10x faster than the standard library's encoder, which
# matters for the two lines of every connection. Keys that are not text are written as text;
# values JSON cannot hold are written as their repr, as structlog's own fallback does.
_JSON_OPTIONS = orjson.OPT_NON_STR_KEYS


def _fallback(value: object) -> str:
    return repr(value)


def render_json(event: MutableMapping[str, Any], **kw: Any) -> str:
    """structlog's JSONRenderer serializer: the same bytes `JsonInfoLines` writes."""
    return orjson.dumps(event, default=kw.get("default", _fallback), option=_JSON_OPTIONS).decode()


class JsonInfoLines:
    """Info lines rendered exactly as the JSON chain below renders them (the fields, then
    `event`, `level`, `timestamp`), without the chain.

    For the per-connection lines, two per connection on the path of connection churn: the
    structlog chain costs twice what this does there.
    """

    __slots__ = ("_fd", "_out", "_stamp")

    def __init__(self, out: LineLogger) -> None:
        self._out = out
        self._stamp = _Stamper()
        self._fd = out._fd  # what `stamped` reads of `out` for every line, read once here

    def info(self, event: str, **fields: Any) -> None:
        self.line(event, fields)

    def line(self, event: str, fields: dict[str, Any]) -> None:
        """`info(event, **fields)` given the fields as a dict (taken over, not copied): a call
        with keyword arguments costs ~1k instructions more a line (CPython matches every
        keyword against the parameter names before it builds the `**fields` dict)."""
        fields["event"] = event
        fields["level"] = "info"
        fields["timestamp"] = ""
        self.stamped(fields)

    def stamped(self, fields: dict[str, Any]) -> None:
        """A line whose dict ends in `event`, `level` ("info") and a `timestamp` to fill in (its
        value is replaced). Built so by the caller, in one dict display: three keys added here
        would cost an insert each and a resize of the dict (~2k instructions a line)."""
        # The stamper's clock in integer nanoseconds (no float rounding in the microseconds),
        # inline: two lines a connection come through here.
        stamp, ns = self._stamp, time.time_ns()
        start = stamp.start
        if not start <= ns < stamp.end:
            stamp.turn(ns // _NS)
            start = stamp.start
        micros = (ns - start) // 1000
        fields["timestamp"] = f"{stamp.prefix}.{_DIGITS[micros // 1000]}{_DIGITS[micros % 1000]}Z"
        # The keys are keyword names, always text: no OPT_NON_STR_KEYS (its slower path costs
        # ~2k instructions a line).
        line = orjson.dumps(fields, default=_fallback, option=orjson.OPT_APPEND_NEWLINE)
        # LineLogger.write_line's usual case inline (one whole write()): one Python call fewer
        # for each of a connection's two lines; anything else is left to write_line.
        fd = self._fd
        written = 0
        if fd is not None:
            # No flush of the stream first (as `write_line` does, ~0.8k instructions a line): in
            # the daemon every other write to the stream is whole and at once (`write_line`, and
            # the demo's display prints with flush=True), so nothing waits in its buffer.
            try:  # (not contextlib.suppress: three Python calls)
                written = os.write(fd, line)
            except BlockingIOError:
                written = 0
        if written < len(line):
            self._out.write_line(line[written:] if written else line)


_configured: tuple[str, str, TextIO | None] | None = None  # level, format, stream in force


def configure_logging(level: str = "info", fmt: str = "json", stream: TextIO | None = None) -> None:
    """Configure structlog process-wide. Safe to call again (on reload)."""
    global _configured
    _configured = (level, fmt, stream)
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    else:
        renderer = structlog.processors.JSONRenderer(serializer=render_json)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            _Stamper(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=lambda *_: LineLogger(stream or sys.stdout),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> Any:
    """A concrete logger for a hot path: skips the lazy proxy's per-call bind.

    Bound with the configuration in force now; owners re-fetch it after `configure_logging`.
    """
    return structlog.get_logger(name).bind()


LineWriter = Callable[[str, dict[str, Any]], None]
StampedWriter = Callable[[dict[str, Any]], None]


def line_writer(name: str) -> LineWriter:
    """`info_lines(name)` as one function of (event, fields dict): `JsonInfoLines.line` when
    the JSON shortcut applies, else the structlog logger's `info`."""
    lines = info_lines(name)
    if isinstance(lines, JsonInfoLines):
        return lines.line
    return lambda event, fields: lines.info(event, **fields)


def stamped_writer(name: str) -> StampedWriter:
    """`line_writer(name)` for dicts that end in `event`, `level` and `timestamp` (see
    `JsonInfoLines.stamped`); other formats get the fields and the event through structlog."""
    lines = info_lines(name)
    if isinstance(lines, JsonInfoLines):
        return lines.stamped

    def chain(fields: dict[str, Any]) -> None:
        event = fields.pop("event")
        del fields["level"], fields["timestamp"]  # structlog's processors add their own
        lines.info(event, **fields)

    return chain


def info_lines(name: str) -> Any:
    """`get_logger(name)` for info lines on a hot path: `JsonInfoLines` when the format is JSON
    and info lines are on (the same text, for half the cost), else the structlog logger."""
    if _configured is not None:
        level, fmt, stream = _configured
        if fmt == "json" and LEVELS[level] <= logging.INFO:
            return JsonInfoLines(LineLogger(stream or sys.stdout))
    return get_logger(name)
