"""Validation errors -> report lines: `file:LINE: listeners[0].listen = 'x': what is allowed`.

pydantic's errors are turned into `_Problem`s with plain-words messages, then placed by
`yaml_source._Where` (file line or environment variable) and formatted one a line.
"""

from __future__ import annotations

import reprlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from connwatch.config.fields import Loc, _reason, format_loc
from connwatch.config.schema_paths import _ABSENT, _allowed_keys
from connwatch.config.yaml_source import _Where

_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60
_short.maxlist = _short.maxdict = 4
_short.maxlevel = 2


@dataclass
class _Problem:
    loc: Loc
    message: str
    given: object = _ABSENT
    at_key: bool = False
    kind: str = ""


def _show(value: object) -> str:
    """The given value, short, spelled as in YAML where that differs from Python."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, str) and value.isprintable():
        return f"'{value}'" if len(value) <= 60 else f"'{value[:57]}...'"
    try:
        return _short.repr(value)
    except Exception:  # a value whose repr fails (huge int, odd object) must not hide the report
        return f"<{type(value).__name__}>"


def _issue(problem: _Problem, where: _Where) -> str:
    place = where.describe(problem.loc, at_key=problem.at_key)
    given = "" if problem.given is _ABSENT else f" = {_show(problem.given)}"
    if "token" in problem.loc and given:
        given = " = ***"
    return f"{place}: {format_loc(problem.loc)}{given}: {problem.message}"


_TYPE_MESSAGES = {
    "missing": "required, but missing",
    "tuple_type": "expected a list",
    "list_type": "expected a list",
    "int_type": "expected a whole number",
    "int_parsing": "expected a whole number",
    "int_from_float": "expected a whole number",
    "bool_type": "expected true or false",
    "string_type": "expected text",
    "float_type": "expected a number",
    "finite_number": "expected a finite number",
}


def _problem(error: Mapping[str, Any]) -> _Problem:
    kind, ctx = str(error["type"]), error.get("ctx") or {}
    loc: Loc = tuple(error["loc"])
    given = error.get("input", _ABSENT)
    if "field" in ctx:  # a model-level check that names the offending field itself
        field = ctx["field"]
        loc += tuple(field) if isinstance(field, tuple) else (str(field),)
        given = ctx.get("given", _ABSENT)
    if kind == "invalid_key":
        return _Problem(loc[:-1], f"the key {_show(loc[-1])} must be text", kind=kind)
    if kind == "value_error":
        message = _reason(ctx["error"], given) if "error" in ctx else str(error["msg"])
    elif kind == "extra_forbidden":
        return _Problem(loc, f"unknown key; allowed here: {_allowed_keys(loc[:-1])}", at_key=True)
    elif kind in ("model_type", "model_attributes_type", "dict_type"):
        message = f"expected a mapping with keys from: {_allowed_keys(loc)}"
    elif kind == "literal_error":
        message = f"expected one of {ctx.get('expected')}"
    elif kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        words = {"ge": "at least", "le": "at most", "gt": "more than", "lt": "less than"}
        message = " ".join(f"must be {words[k]} {v}" for k, v in ctx.items() if k in words)
    elif kind == "too_short":
        message = f"needs at least {ctx.get('min_length')} item(s)"
    else:
        message = _TYPE_MESSAGES.get(kind, str(error["msg"]))
    if kind == "missing":
        given = _ABSENT
    return _Problem(loc, message, given, kind=kind)


def _relevant(problems: list[_Problem]) -> list[_Problem]:
    """Drop "needs at least 1 item" for a list whose items failed: pydantic counts only the
    valid ones, but the list is not empty, its items are wrong."""
    return [
        p
        for p in problems
        if p.kind != "too_short"
        or not any(len(q.loc) > len(p.loc) and q.loc[: len(p.loc)] == p.loc for q in problems)
    ]


def _duplicate_names(data: Mapping[str, Any]) -> list[_Problem]:
    """Duplicate listener names, found in the raw data so they are reported with other errors
    (the model check only runs once every listener is valid)."""
    listeners = data.get("listeners")
    if not isinstance(listeners, list | tuple):
        return []
    first: dict[str, int] = {}
    problems = []
    for index, listener in enumerate(listeners):
        name = listener.get("name") if isinstance(listener, dict) else None
        if isinstance(name, str) and name in first:
            message = f"duplicate listener name, already used by listeners[{first[name]}]"
            problems.append(_Problem(("listeners", index, "name"), message, name))
        elif isinstance(name, str):
            first[name] = index
    return problems
