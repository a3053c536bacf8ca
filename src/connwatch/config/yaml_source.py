"""Reading the YAML file with the line of every key and value, so a report can point at it.

One parse gives both the data and the node tree; `_Where` keeps the lines (and, once
`env_overrides.py` has run, the variables) each part of the data came from. Syntax errors and
duplicate keys become report lines here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import yaml

from connwatch.config.fields import Loc, format_loc
from connwatch.exceptions import ConfigError


@dataclass
class _Where:
    """Where each part of the data came from: line numbers in the file, environment variables."""

    source: str
    value_lines: dict[Loc, int]
    key_lines: dict[Loc, int]
    env: dict[Loc, str]

    def describe(self, loc: Loc, *, at_key: bool = False) -> str:
        for end in range(len(loc), -1, -1):
            if loc[:end] in self.env:
                return f"environment variable {self.env[loc[:end]]}"
        line = self.key_lines.get(loc) if at_key else None
        for end in range(len(loc), -1, -1):
            if line is not None:
                break
            line = self.value_lines.get(loc[:end])
        return f"{self.source}:{line}" if line is not None else self.source

    def line(self, loc: Loc) -> int:
        """The line to sort a report by: the place itself or its nearest known parent."""
        for end in range(len(loc), -1, -1):
            found = self.key_lines.get(loc[:end]) or self.value_lines.get(loc[:end])
            if found is not None:
                return found
        return 0


def _read_yaml(path: str | os.PathLike[str], source: str) -> tuple[object, _Where, list[str]]:
    try:
        with open(path, "rb") as stream:
            raw = stream.read()
    except FileNotFoundError:
        raise ConfigError([f"{source}: file not found"], source) from None
    except OSError as exc:
        raise ConfigError([f"{source}: cannot read: {exc.strerror or exc}"], source) from None
    try:
        node, data = _compose(raw)
    except yaml.MarkedYAMLError as exc:
        raise ConfigError([_syntax_issue(exc, source)], source) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source}: YAML error: {exc}"], source) from None
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. a date like 2024-02-30
        raise ConfigError([f"{source}: a value cannot be read: {exc}"], source) from None
    except RecursionError:
        raise ConfigError([f"{source}: the YAML is nested too deeply"], source) from None
    where = _Where(source, {}, {}, {})
    issues = _map_lines(node, where) if node is not None else []
    return data, where, issues


def _at(mark: yaml.Mark) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}"


def _syntax_issue(exc: yaml.MarkedYAMLError, source: str) -> str:
    """`file:6:1: YAML syntax error at line 6, column 1: expected ... (while parsing a flow
    sequence that starts at line 5, column 14)`: the start often shows the real mistake."""
    mark = exc.problem_mark or exc.context_mark
    if mark is None:
        return f"{source}: YAML syntax error: {exc.problem or exc.context}"
    text = f"{source}:{mark.line + 1}:{mark.column + 1}: YAML syntax error at {_at(mark)}"
    where = f" that starts at {_at(exc.context_mark)}" if exc.context_mark else ""
    if exc.context and exc.problem and exc.problem.startswith("but "):
        see = f" (see {_at(exc.context_mark)})" if exc.context_mark else ""
        return f"{text}: {exc.context}, {exc.problem}{see}"
    text += f": {exc.problem or exc.context}"
    if exc.context and exc.problem:
        text += f" ({exc.context}{where})"
    return text


def _compose(raw: bytes) -> tuple[yaml.Node | None, object]:
    """One parse gives both the node tree (for line numbers) and the data."""
    loader = yaml.SafeLoader(raw)
    try:
        node = loader.get_single_node()
        return node, (loader.construct_document(node) if node is not None else None)
    finally:
        loader.dispose()


_STR_TAG = "tag:yaml.org,2002:str"


def _map_lines(root: yaml.Node, where: _Where) -> list[str]:
    """Fill in the line of every value and key; report duplicate keys (YAML keeps the last)."""
    issues: list[str] = []
    stack: list[tuple[Loc, yaml.Node]] = [((), root)]
    seen: set[int] = set()
    while stack:
        loc, node = stack.pop()
        if id(node) in seen:  # an alias: map it once, not once per use (alias bombs)
            continue
        seen.add(id(node))
        where.value_lines.setdefault(loc, node.start_mark.line + 1)
        if isinstance(node, yaml.SequenceNode):
            stack.extend(((*loc, index), item) for index, item in enumerate(node.value))
        elif isinstance(node, yaml.MappingNode):
            first: dict[str, int] = {}
            for key, value in node.value:
                if not (isinstance(key, yaml.ScalarNode) and key.tag == _STR_TAG):
                    continue
                line = key.start_mark.line + 1
                if key.value in first:
                    issues.append(
                        f"{where.source}:{line}: {format_loc((*loc, key.value))}: duplicate key "
                        f"(first at line {first[key.value]}); write each key once"
                    )
                first.setdefault(key.value, line)
                where.key_lines.setdefault((*loc, key.value), line)
                stack.append(((*loc, key.value), value))
    return issues
