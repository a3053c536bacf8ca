"""CONNWATCH_* environment overrides: `CONNWATCH_LISTENERS__0__NAME=web` sets listeners[0].name.

Applied to the data before validation, so a variable can index into lists and a bad value is
reported under the variable's name.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, get_origin

import yaml

from connwatch.config.fields import Loc, format_loc
from connwatch.config.schema_paths import (
    _ABSENT,
    _allowed_keys,
    _annotation_at,
    _child,
    _is_text,
    _strip,
)
from connwatch.config.yaml_source import _Where

ENV_PREFIX = "CONNWATCH_"
#: CONNWATCH_* variables that are not field overrides (the CLI reads them itself).
NON_OVERRIDE_VARS = frozenset({"CONNWATCH_CONFIG"})


def _env_loc(name: str) -> tuple[Loc, str | None]:
    """CONNWATCH_LISTENERS__0__NAME -> ("listeners", 0, "name"); or an error message."""
    loc: Loc = ()
    for segment in name[len(ENV_PREFIX) :].lower().split("__"):
        part: str | int = int(segment) if segment.isdigit() else segment
        if not segment or _child(_annotation_at(loc), part) is _ABSENT:
            here = format_loc(loc) if loc else "the top level"
            if isinstance(part, int) or get_origin(_strip(_annotation_at(loc))) is tuple:
                return loc, f"{here} is a list: the next part must be an index like __0__"
            return loc, f"{here} has no key {segment!r}; allowed: {_allowed_keys(loc)}"
        loc += (part,)
    return loc, None


def _env_value(raw: str, annotation: Any) -> object:
    """A YAML scalar (so `true`, `5`, `null`, `[a, b]` work), but text fields keep the raw text
    unless it reads as null (a token `0123` must not become the number 83), and a list may be
    written comma-separated."""
    try:
        value = yaml.safe_load(raw)
    except (yaml.YAMLError, ValueError, TypeError, OverflowError, RecursionError):
        return raw
    if _is_text(annotation) and value is not None and not isinstance(value, str):
        return raw
    if get_origin(_strip(annotation)) is tuple and isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]  # a,b -> [a, b]
    return value


def _assign(data: dict[str, Any], loc: Loc, value: object) -> str | None:
    """Set data[loc] = value, copying each container on the way (YAML aliases share them)."""
    node: Any = data
    for depth, part in enumerate(loc):
        last = depth == len(loc) - 1
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                count = len(node) if isinstance(node, list) else 0
                return f"{format_loc(loc[: depth + 1])} does not exist: {count} configured"
        elif not isinstance(node, dict):
            return f"{format_loc(loc[:depth])} is not a mapping, so {part!r} cannot be set"
        elif part not in node and not last:
            if isinstance(loc[depth + 1], int):
                return f"{format_loc(loc[: depth + 2])} does not exist: 0 configured"
            node[part] = {}
        if last:
            node[part] = value
        else:
            child = node[part]
            node[part] = list(child) if isinstance(child, tuple) else copy.copy(child)
            node = node[part]
    return None


def _apply_env(data: dict[str, Any], env: Mapping[str, str], where: _Where) -> list[str]:
    issues = []
    for name in sorted(env):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in NON_OVERRIDE_VARS:
            continue
        loc, error = _env_loc(upper)
        if error is None:
            error = _assign(data, loc, _env_value(env[name], _annotation_at(loc)))
        if error is not None:
            issues.append(f"environment variable {name}: no such setting: {error}")
        else:
            where.env[loc] = name
    return issues
