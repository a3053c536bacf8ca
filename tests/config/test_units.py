"""Durations and sizes: examples, rejections, and property-based round trips."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from connwatch.config.units import (
    MAX_DURATION,
    MAX_SIZE,
    format_duration,
    format_size,
    parse_duration,
    parse_size,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("5s", 5.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        ("0.5", 0.5),
        ("30", 30.0),
        (" 5 s ", 5.0),
        (".5s", 0.5),
        ("0s", 0.0),
        (7, 7.0),
        (2.5, 2.5),
    ],
)
def test_durations_parse_from_units_and_plain_numbers(
    text: str | int | float, seconds: float
) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "bad",
    [
        "-5s",
        "-1",
        -1,
        "nan",
        "inf",
        float("nan"),
        float("inf"),
        "1e400",
        "5x",
        "",
        "1d",
        "ms",
        "5 5s",
        "1h30m",
        True,
        None,
        [1],
    ],
)
def test_invalid_durations_are_rejected_with_value_error(bad: object) -> None:
    with pytest.raises(ValueError, match=r"duration|too long"):
        parse_duration(bad)  # type: ignore[arg-type]


def test_duration_error_says_what_is_allowed() -> None:
    with pytest.raises(ValueError, match=r"250ms, 5s, 2m, 1h or a number of seconds"):
        parse_duration("five seconds")
    with pytest.raises(ValueError, match="negative"):
        parse_duration("-250ms")


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.25, "250ms"),
        (30, "30s"),
        (120, "2m"),
        (0, "0s"),
        (3600, "1h"),
        (1.5, "1500ms"),
        (0.5, "500ms"),
        (90, "90s"),
        (0.0015, "1.5ms"),
        (1.001, "1001ms"),
        (999999000.0, "16666650m"),
        (60, "1m"),
        (5400, "90m"),
    ],
)
def test_durations_format_in_the_largest_whole_unit(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_formatting_negative_or_non_finite_durations_is_rejected(bad: float) -> None:
    with pytest.raises(ValueError, match="cannot format"):
        format_duration(bad)


@given(st.floats(min_value=0, max_value=MAX_DURATION, allow_nan=False))
def test_formatted_durations_parse_back_to_the_same_seconds(seconds: float) -> None:
    text = format_duration(seconds)
    assert parse_duration(text) == seconds
    assert format_duration(parse_duration(text)) == text


@given(st.integers(min_value=0, max_value=10**5), st.sampled_from(["ms", "s", "m", "h", ""]))
def test_whole_units_format_as_whole_units(count: int, unit: str) -> None:
    plain = f"{count}{unit or 's'}"
    text = format_duration(parse_duration(plain))
    assert len(text) <= len(plain)
    assert "." not in text
    assert parse_duration(text) == parse_duration(plain)


@given(st.text(max_size=30))
def test_random_text_parses_as_a_duration_or_raises_value_error(text: str) -> None:
    try:
        seconds = parse_duration(text)
    except ValueError:
        return
    assert 0 <= seconds <= MAX_DURATION


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("256KiB", 256 * 1024),
        ("1MiB", 1024**2),
        ("64KB", 64000),
        ("1GiB", 1024**3),
        ("4096", 4096),
        ("4096B", 4096),
        ("1.5MiB", 1536 * 1024),
        ("1 gb", 10**9),
        ("2kib", 2048),
        (4096, 4096),
        (0, 0),
    ],
)
def test_sizes_parse_from_units_and_plain_numbers(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    "bad",
    ["-1", -1, "1.5B", "abc", "5 xb", "", "KiB", "1e3", True, 1.5, None, "9" * 5000, str(2**63)],
)
def test_invalid_sizes_are_rejected_with_value_error(bad: object) -> None:
    with pytest.raises(ValueError, match=r"size|bytes|too large"):
        parse_size(bad)  # type: ignore[arg-type]


def test_one_letter_size_units_are_ambiguous() -> None:
    with pytest.raises(ValueError, match=r"1KiB \(powers of 1024\) or 1KB"):
        parse_size("1k")


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (262144, "256KiB"),
        (64000, "64KB"),
        (4097, "4097B"),
        (0, "0B"),
        (1024**3, "1GiB"),
        (4096, "4KiB"),
        (10**9, "1GB"),
    ],
)
def test_sizes_format_in_the_largest_whole_unit(size: int, text: str) -> None:
    assert format_size(size) == text


@given(st.integers(min_value=0, max_value=MAX_SIZE))
def test_formatted_sizes_parse_back_to_the_same_bytes(size: int) -> None:
    assert parse_size(format_size(size)) == size


@given(st.text(max_size=30))
def test_random_text_parses_as_a_size_or_raises_value_error(text: str) -> None:
    try:
        size = parse_size(text)
    except ValueError:
        return
    assert 0 <= size <= MAX_SIZE
