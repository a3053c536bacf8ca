"""Generate the option reference of docs/configuration.md from the config models.

    python -m connwatch.config.reference                              # print the generated reference
    python -m connwatch.config.reference --write docs/configuration.md  # replace it between the markers
    python -m connwatch.config.reference --check docs/configuration.md  # exit 1 when it is stale

Every option, its type, default and description come from the pydantic fields, so the docs
cannot drift from the code (tests/config/test_docs_config.py checks it).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo

from connwatch._types import Address
from connwatch.config.fields import Kind
from connwatch.config.models import Settings
from connwatch.config.units import format_duration, format_size

BEGIN = "<!-- BEGIN GENERATED -->"
END = "<!-- END GENERATED -->"

_SIMPLE = {bool: "bool", int: "integer", float: "number", str: "text", SecretStr: "secret text"}


def _kind(metadata: Sequence[Any]) -> str | None:
    return next((m.name for m in metadata if isinstance(m, Kind)), None)


def _type_name(annotation: Any, metadata: Sequence[Any] = ()) -> str:
    """`duration`, `list of address`, `` `a` \\| `b` ``, `integer or null`, ..."""
    kind = _kind(metadata)
    if kind is not None:
        return kind
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _type_name(args[0], annotation.__metadata__)
    if origin is Literal:
        return " \\| ".join(f"`{arg}`" for arg in args)
    if origin is tuple:
        return f"list of {_type_name(args[0])}"
    if type(None) in args:
        (inner,) = (arg for arg in args if arg is not type(None))
        return f"{_type_name(inner)} or null"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    return _SIMPLE.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _default_text(field: FieldInfo) -> str:
    if field.is_required():
        return "**required**"
    value, kind = field.default, _kind(field.metadata)
    if isinstance(value, BaseModel):
        return "see below"
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif kind == "duration":
        text = format_duration(value)
    elif kind == "size":
        text = format_size(value)
    elif isinstance(value, Address | str):
        text = str(value)
    elif isinstance(value, float):
        text = f"{value:g}"
    else:
        text = str(value)
    return f"`{text}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _sections(model: type[BaseModel], path: str) -> Iterator[tuple[type[BaseModel], str]]:
    """(model, path) for this model and every model below it, depth first in field order."""
    yield model, path
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if get_origin(annotation) is tuple:
            annotation, name = get_args(annotation)[0], f"{name}[]"
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _sections(annotation, f"{path}.{name}" if path else name)


def _table(model: type[BaseModel]) -> list[str]:
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        type_name = _type_name(field.annotation, field.metadata)
        description = _cell(field.description or "")
        rows.append(
            f"| `{field.alias or name}` | {type_name} | {_default_text(field)} | {description} |"
        )
    return rows


def render_reference() -> str:
    """The option reference: one table per section, sections that share a model merged."""
    paths: dict[type[BaseModel], list[str]] = {}
    for model, path in _sections(Settings, ""):
        paths.setdefault(model, []).append(path)
    lines = [
        "_Generated from the models in `src/connwatch/config/` by "
        "`python -m connwatch.config.reference --write docs/configuration.md`; do not edit by hand._",
    ]
    for model, where in paths.items():
        title = ", ".join(f"`{p}`" for p in where) if where != [""] else "Top level"
        lines += ["", f"### {title}", "", *_table(model)]
    return "\n".join(lines) + "\n"


def replace_generated(document: str, generated: str) -> str:
    """`document` with the text between the markers replaced; ValueError without markers."""
    start, end = document.find(BEGIN), document.find(END)
    if start < 0 or end < start:
        raise ValueError(f"markers {BEGIN} ... {END} not found")
    return document[: start + len(BEGIN)] + "\n" + generated + document[end:]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m connwatch.config.reference", description=__doc__
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", metavar="FILE", help="replace the reference between markers")
    group.add_argument("--check", metavar="FILE", help="exit 1 when FILE's reference is stale")
    args = parser.parse_args(argv)
    generated = render_reference()
    target = args.write or args.check
    if target is None:
        sys.stdout.write(generated)
        return 0
    path = Path(target)
    current = path.read_text(encoding="utf-8")
    wanted = replace_generated(current, generated)
    if args.check:
        if current != wanted:
            print(f"{path} is stale: run python -m connwatch.config.reference --write {path}")
            return 1
        return 0
    path.write_text(wanted, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
