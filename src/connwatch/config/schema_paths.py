"""The schema walked by path: which annotation sits at `listeners[0].heartbeat`, which keys a
mapping allows. Used by environment overrides and by the "allowed keys" of report lines."""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import BaseModel, SecretStr

from connwatch._types import Address
from connwatch.config.fields import Loc
from connwatch.config.models import Settings

#: No such place in the schema; in a report, no value given.
_ABSENT = object()


def _strip(annotation: Any) -> Any:
    """Annotated[X, ...] -> X and X | None -> X, repeatedly."""
    while True:
        if get_origin(annotation) is Annotated:
            annotation = get_args(annotation)[0]
            continue
        args = [arg for arg in get_args(annotation) if arg is not type(None)]
        if (
            get_origin(annotation) is not tuple
            and len(args) == 1
            and len(get_args(annotation)) == 2
        ):
            annotation = args[0]
            continue
        return annotation


def _model_of(annotation: Any) -> type[BaseModel] | None:
    stripped = _strip(annotation)
    if isinstance(stripped, type) and issubclass(stripped, BaseModel):
        return stripped
    return None


def _child(annotation: Any, part: str | int) -> Any:
    """The annotation one step down `part`, or _ABSENT when there is no such place."""
    model = _model_of(annotation)
    if model is not None:
        field = _field_named(model, part) if isinstance(part, str) else None
        return _ABSENT if field is None else field.annotation
    stripped = _strip(annotation)
    if get_origin(stripped) is tuple and isinstance(part, int):
        return get_args(stripped)[0]
    return _ABSENT


def _annotation_at(loc: Loc) -> Any:
    annotation: Any = Settings
    for part in loc:
        annotation = _child(annotation, part)
        if annotation is _ABSENT:
            return _ABSENT
    return annotation


def _allowed_keys(loc: Loc) -> str:
    model = _model_of(_annotation_at(loc))
    if model is None:
        return "none"
    return ", ".join(f.alias or name for name, f in model.model_fields.items())


def _field_named(model: type[BaseModel], key: str) -> Any:
    """The field a YAML key names: its alias where it has one (`validate`), else its name."""
    for name, field in model.model_fields.items():
        if (field.alias or name) == key:
            return field
    return None


def _is_text(annotation: Any) -> bool:
    stripped = _strip(annotation)
    if get_origin(stripped) is Literal:
        return all(isinstance(arg, str) for arg in get_args(stripped))
    return stripped in (str, SecretStr, Address)
