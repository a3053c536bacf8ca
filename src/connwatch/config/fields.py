"""Field types and their validators: durations, sizes, addresses, and the checks each field adds.

The `Annotated` aliases here (Duration, Size, AddressField, ...) are what the models in
`models.py` are written in; `Kind` names a type for the generated reference. `Loc` is a field's
place in the config and `format_loc` spells it the way every report line does.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    SecretStr,
    StrictInt,
)
from pydantic_core import PydanticCustomError

from connwatch._types import Address
from connwatch.config.escapes import decode_escapes, encode_escapes
from connwatch.config.units import (
    UnitError,
    format_duration,
    format_size,
    parse_duration,
    parse_size,
)

# Here, not in report.py: the models name places too (duplicate addresses), and report.py sits
# above the models (it walks the schema), so keeping them low avoids an import circle.
Loc = tuple[str | int, ...]


def format_loc(loc: Loc) -> str:
    """("listeners", 0, "heartbeat", "interval") -> "listeners[0].heartbeat.interval"."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


@dataclass(frozen=True, slots=True)
class Kind:
    """Marks an Annotated type with the name the reference docs show for it."""

    name: str


def _reason(exc: ValueError, given: object) -> str:
    """The message without the leading repr of the input: the report shows the input itself."""
    if isinstance(exc, UnitError):
        return exc.reason
    text, prefix = str(exc), f"{given!r}: "
    return text[len(prefix) :] if text.startswith(prefix) else text


def _to_duration(value: object) -> float:
    if isinstance(value, str | int | float):
        try:
            return parse_duration(value)
        except UnitError as exc:
            raise ValueError(exc.reason) from None
    raise ValueError("expected a duration like 250ms, 5s, 2m, 1h or a number of seconds")


def _to_size(value: object) -> int:
    if isinstance(value, str | int):
        try:
            return parse_size(value)
        except UnitError as exc:
            raise ValueError(exc.reason) from None
    raise ValueError("expected a size like 4096, 64KiB or 1MiB")


def _to_address(value: object) -> Address:
    if isinstance(value, Address):
        return value
    if not isinstance(value, str):
        raise ValueError("expected an address: HOST:PORT, [IPv6]:PORT, :PORT or unix:/path")
    try:
        return Address.parse(value)
    except ValueError as exc:
        raise ValueError(_reason(exc, value.strip())) from None


def _positive(seconds: float) -> float:
    if seconds <= 0:
        raise ValueError("must be more than 0s")
    return seconds


def _keepalive_seconds(seconds: float) -> float:
    # The kernel counts TCP_KEEPIDLE / TCP_KEEPINTVL in whole seconds, 1 to 32767.
    if not seconds.is_integer() or not 1 <= seconds <= 32767:
        raise ValueError("keep-alive timers are whole seconds from 1s to 32767s")
    return seconds


def _user_timeout(seconds: float) -> float:
    if seconds * 1000 > 2**31 - 1:  # TCP_USER_TIMEOUT is a signed 32-bit count of milliseconds
        raise ValueError(
            "must be at most 2147483s (TCP_USER_TIMEOUT is a 32-bit millisecond count)"
        )
    return seconds


def _buffer_size(size: int) -> int:
    if size < 4096:
        raise ValueError("must be at least 4KiB")
    return size


def _data_path(path: str) -> str:
    # `auto` falls back by itself; asking for `splice` where it cannot exist is a config error.
    if path == "splice" and not hasattr(os, "splice"):
        raise ValueError("splice needs Linux (os.splice); use auto or portable here")
    return path


def _upstream_address(address: Address) -> Address:
    if not address.is_unix and (not address.host or address.port == 0):
        raise ValueError("an upstream needs a host and a port from 1 to 65535")
    return address


def _listener_name(name: str) -> str:
    if re.fullmatch(r"[a-z0-9_-]+", name) is None:
        raise ValueError("use only lowercase letters, digits, '_' and '-' (it is a metric label)")
    return name


def _non_empty_secret(secret: SecretStr) -> SecretStr:
    if not secret.get_secret_value():
        raise ValueError("must not be empty; write null for no token")
    return secret


def _workers(value: object) -> object:
    return (os.cpu_count() or 1) if value == "auto" else value


Duration = Annotated[
    float,
    BeforeValidator(_to_duration),
    PlainSerializer(format_duration, return_type=str, when_used="json"),
    Kind("duration"),
]
PositiveDuration = Annotated[Duration, AfterValidator(_positive)]
KeepaliveSeconds = Annotated[Duration, AfterValidator(_keepalive_seconds)]
Size = Annotated[
    int,
    BeforeValidator(_to_size),
    PlainSerializer(format_size, return_type=str, when_used="json"),
    Kind("size"),
]
AddressField = Annotated[
    Address,
    PlainValidator(_to_address),
    PlainSerializer(str, return_type=str, when_used="json"),
    Kind("address"),
]
UpstreamAddress = Annotated[AddressField, AfterValidator(_upstream_address)]
Port = Annotated[StrictInt, Field(ge=1, le=65535)]
Count = Annotated[StrictInt, Field(ge=1)]
Token = Annotated[SecretStr, AfterValidator(_non_empty_secret)]


def _order_error(field: str, given: float, smaller: str, value: float) -> PydanticCustomError:
    return PydanticCustomError(
        "interval_order",
        "must be at least {smaller} ({value}); equal means a fixed interval",
        {
            "field": field,
            "given": format_duration(given),
            "smaller": smaller,
            "value": format_duration(value),
        },
    )


@functools.lru_cache(maxsize=64)
def _status_ranges(text: str) -> tuple[tuple[int, int], ...]:
    """`200-399,404` -> ((200, 399), (404, 404)); ValueError says what is allowed."""
    ranges = []
    for part in text.split(","):
        low, sep, high = part.strip().partition("-")
        if not low.strip().isdigit() or (sep and not high.strip().isdigit()):
            raise ValueError(
                f"{part.strip()!r} is not a status or range; write codes and ranges like 200-399,404"
            )
        first, last = int(low), int(high) if sep else int(low)
        if not 100 <= first <= last <= 599:
            raise ValueError(f"{part.strip()!r}: codes run from 100 to 599, low to high")
        ranges.append((first, last))
    return tuple(ranges)


def _expected_status(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise ValueError("expected status codes and ranges like 200-399,404")
    _status_ranges(value)
    return value


def _escaped_text(value: object) -> str:
    """Canonical escaped text, so that `"PING\r\n"` (YAML double quotes: real CR LF) and
    `PING\r\n` (backslashes) give equal configs: they send the same bytes."""
    if not isinstance(value, str):
        raise ValueError("expected text (escapes \\r \\n \\t \\0 \\\\ \\xNN allowed)")
    try:
        return encode_escapes(decode_escapes(value))
    except UnicodeEncodeError:
        raise ValueError("contains characters that are not valid Unicode") from None


def _expect_text(value: object) -> str:
    if isinstance(value, str) and value.startswith("re:"):
        try:
            _expect_regex(value[3:])
        except UnicodeEncodeError:
            raise ValueError("contains characters that are not valid Unicode") from None
        except re.error as exc:
            raise ValueError(f"the regular expression does not compile: {exc}") from None
        return value
    return _escaped_text(value)


@functools.lru_cache(maxsize=64)
def _expect_regex(pattern: str) -> re.Pattern[bytes]:
    return re.compile(pattern.encode("utf-8", "strict"))


class _Model(BaseModel):
    """The base of every config section: immutable, and unknown keys are errors."""

    model_config = ConfigDict(frozen=True, extra="forbid")
