"""Durations and sizes as written in the config: parse to seconds / bytes and format back.

Pure and stdlib only. Every parse error is a `UnitError` (a ValueError) whose `reason` says
what is wrong and what is allowed, so the config layer can show it to the operator as is.

Durations: `250ms`, `5s`, `2m`, `1h`, `1.5s`, or a bare number of seconds (`30`, `0.5`).
Sizes: a whole number of bytes (`4096`, `4096B`), binary units `KiB MiB GiB TiB` (powers of
1024) or decimal units `KB MB GB TB` (powers of 1000). Units are case-insensitive except that
one-letter suffixes (`1k`, `64m`) are refused: nginx reads `k` as 1024 and others as 1000, so
the operator has to say which one is meant.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

from connwatch.exceptions import UnitError

__all__ = [
    "DURATION_HELP",
    "MAX_DURATION",
    "MAX_SIZE",
    "SIZE_HELP",
    "UnitError",
    "format_duration",
    "format_size",
    "parse_duration",
    "parse_size",
]

#: Longest duration accepted (about 31.7 years): bigger values only overflow timers downstream.
MAX_DURATION = 1e9

DURATION_HELP = "a duration like 250ms, 5s, 2m, 1h or a number of seconds, 0 or more"
SIZE_HELP = (
    "a size like 4096 (bytes), 64KiB, 1MiB, 1GiB (powers of 1024) or 64KB, 1MB (powers of 1000)"
)

_NUMBER = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
_DURATION_RE = re.compile(rf"({_NUMBER})[ \t]*(ms|s|m|h)?")
# No exponent for sizes: `1e999999999B` would make an exact integer of a billion digits.
_SIZE_RE = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)[ \t]*([a-zA-Z]*)")
#: Biggest size accepted (a signed 64-bit integer); beyond it no socket option or buffer fits.
MAX_SIZE = 2**63 - 1

# Units tried when formatting, biggest first.
_FORMAT_ORDER = ("h", "m", "s", "ms")

_SIZE_UNITS: dict[str, int] = {
    "b": 1,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
}
_SIZE_SPELLING = {
    "b": "B",
    "kib": "KiB",
    "mib": "MiB",
    "gib": "GiB",
    "tib": "TiB",
    "kb": "KB",
    "mb": "MB",
    "gb": "GB",
    "tb": "TB",
}


def _show(value: object) -> str:
    """repr of the offending input, cut short so one bad value cannot flood the message."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _scale(number: float, unit: str) -> float:
    if unit == "ms":
        return number / 1000
    if unit == "m":
        return number * 60
    if unit == "h":
        return number * 3600
    return number


def _unscale(seconds: float, unit: str) -> float:
    if unit == "ms":
        return seconds * 1000
    if unit == "m":
        return seconds / 60
    if unit == "h":
        return seconds / 3600
    return seconds


def _check_seconds(seconds: float, given: object) -> float:
    if math.isnan(seconds) or math.isinf(seconds):
        raise UnitError(given, f"not a finite duration; expected {DURATION_HELP}")
    if seconds < 0:
        raise UnitError(given, f"a duration cannot be negative; expected {DURATION_HELP}")
    if seconds > MAX_DURATION:
        raise UnitError(given, f"too long: at most {MAX_DURATION:.0f}s is accepted")
    return float(seconds)


def parse_duration(value: str | int | float) -> float:
    """Seconds from `250ms`, `5s`, `2m`, `1h`, `1.5s` or a bare number of seconds."""
    if isinstance(value, bool):  # bool is an int subclass; `true` is no duration
        raise UnitError(value, f"not a duration; expected {DURATION_HELP}")
    if isinstance(value, int | float):
        return _check_seconds(float(value), value)
    if not isinstance(value, str):
        raise UnitError(value, f"not a duration; expected {DURATION_HELP}")
    text = value.strip()
    if text.startswith("-"):
        raise UnitError(value, f"a duration cannot be negative; expected {DURATION_HELP}")
    match = _DURATION_RE.fullmatch(text)
    if match is None:
        raise UnitError(value, f"not a duration; expected {DURATION_HELP}")
    return _check_seconds(_scale(float(match.group(1)), match.group(2) or "s"), value)


def _reads_back(text: str, seconds: float) -> bool:
    try:
        return parse_duration(text) == seconds
    except UnitError:  # rounding up can step past MAX_DURATION
        return False


def format_duration(seconds: float) -> str:
    """The shortest exact spelling: 0.25 -> "250ms", 30 -> "30s", 120 -> "2m", 0 -> "0s".

    A whole number in the biggest unit that gives one wins (1.5 -> "1500ms", 0.5 -> "500ms",
    as the SPEC writes them); otherwise the shortest decimal that reads back to exactly the same
    float (0.0015 -> "1.5ms").
    """
    seconds = float(seconds)
    if math.isnan(seconds) or math.isinf(seconds) or seconds < 0:
        raise ValueError(f"cannot format {seconds!r} as a duration")
    if seconds == 0:
        return "0s"
    for unit in _FORMAT_ORDER:
        # round(): 1.001 * 1000 is 1000.9999999999999; reading the text back decides exactness.
        count = round(_unscale(seconds, unit))
        if count > 0:
            text = f"{count}{unit}"
            if _reads_back(text, seconds):
                return text
    # repr(seconds) + "s" always reads back exactly, so there is at least one candidate.
    candidates = [repr(seconds) + "s"]
    for unit in _FORMAT_ORDER:
        text = repr(_unscale(seconds, unit)) + unit
        if _reads_back(text, seconds):
            candidates.append(text)
    return min(candidates, key=len)


def parse_size(value: str | int) -> int:
    """Bytes from `4096`, `256KiB`, `1MiB`, `64KB` (= 64000), `1.5MiB`; must be whole bytes."""
    if isinstance(value, bool):
        raise UnitError(value, f"not a size; expected {SIZE_HELP}")
    if isinstance(value, int):
        if value < 0:
            raise UnitError(value, f"a size cannot be negative; expected {SIZE_HELP}")
        return _check_size(value, value)
    if not isinstance(value, str):
        raise UnitError(value, f"not a size; expected {SIZE_HELP}")
    text = value.strip()
    if text.startswith("-"):
        raise UnitError(value, f"a size cannot be negative; expected {SIZE_HELP}")
    match = _SIZE_RE.fullmatch(text)
    if match is None:
        raise UnitError(value, f"not a size; expected {SIZE_HELP}")
    number, unit = match.group(1), match.group(2).lower() or "b"
    if unit in ("k", "m", "g", "t"):
        raise UnitError(
            value,
            f"one-letter units are ambiguous; write {number}{unit.upper()}iB "
            f"(powers of 1024) or {number}{unit.upper()}B (powers of 1000)",
        )
    if unit not in _SIZE_UNITS:
        raise UnitError(value, f"unknown unit {match.group(2)!r}; expected {SIZE_HELP}")
    try:
        amount = Fraction(number) * _SIZE_UNITS[unit]
    except (ValueError, ZeroDivisionError, OverflowError):
        raise UnitError(value, f"not a size; expected {SIZE_HELP}") from None
    if amount.denominator != 1:
        raise UnitError(value, "not a whole number of bytes")
    return _check_size(int(amount), value)


def _check_size(n: int, given: object) -> int:
    if n > MAX_SIZE:
        raise UnitError(given, f"too large: at most {MAX_SIZE} bytes is accepted")
    return n


def format_size(n: int) -> str:
    """The shortest exact spelling: 262144 -> "256KiB", 64000 -> "64KB", 4097 -> "4097B"."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"cannot format {n!r} as a size")
    best = f"{n}B"
    # Binary units first, so they win ties (buffer sizes are usually powers of two).
    for unit in ("tib", "gib", "mib", "kib", "tb", "gb", "mb", "kb"):
        factor = _SIZE_UNITS[unit]
        if n and n % factor == 0:
            text = f"{n // factor}{_SIZE_SPELLING[unit]}"
            if len(text) < len(best):
                best = text
    return best
