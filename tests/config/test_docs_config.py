"""docs/configuration.md and config/connwatch.yaml keep up with the config models."""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args, get_origin

import pytest
import yaml
from pydantic import BaseModel

from connwatch.config import Settings
from connwatch.config.reference import BEGIN, END, main, render_reference, replace_generated

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "configuration.md"
EXAMPLE = REPO / "config" / "connwatch.yaml"
REGENERATE = "python -m connwatch.config.reference --write docs/configuration.md"


def generated_part(text: str) -> str:
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[start:end].lstrip("\n")


def test_reference_is_current() -> None:
    assert generated_part(DOC.read_text(encoding="utf-8")) == render_reference(), (
        f"docs/configuration.md is stale; regenerate it with: {REGENERATE}"
    )


def fields(model: type[BaseModel], path: str = "") -> list[tuple[str, Any]]:
    """(dotted path, FieldInfo) of every field, descending into nested models and lists."""
    found = []
    for attribute, field in model.model_fields.items():
        name = field.alias or attribute  # as written in YAML (`validate`)
        here = f"{path}.{name}" if path else name
        found.append((here, field))
        annotation = field.annotation
        if get_origin(annotation) is tuple:
            annotation, here = get_args(annotation)[0], f"{here}[]"
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found += fields(annotation, here)
    return found


@pytest.mark.parametrize(("path", "field"), fields(Settings))
def test_every_field_is_described_and_documented(path: str, field: Any) -> None:
    assert field.description, f"{path} needs Field(description=...)"
    assert f"| `{path.rsplit('.', 1)[-1].removesuffix('[]')}` |" in render_reference()


def test_example_shows_every_option() -> None:
    data = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))

    def missing(model: type[BaseModel], node: Any, path: str) -> list[str]:
        gaps = []
        for attribute, field in model.model_fields.items():
            name = field.alias or attribute  # as written in YAML (`validate`)
            if not isinstance(node, dict) or name not in node:
                gaps.append(f"{path}{name}")
                continue
            annotation, value = field.annotation, node[name]
            if get_origin(annotation) is tuple and isinstance(value, list) and value:
                annotation, value = get_args(annotation)[0], value[0]
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                gaps += missing(annotation, value, f"{path}{name}.")
        return gaps

    assert missing(Settings, data, "") == []


def test_replace_generated_keeps_the_hand_written_text() -> None:
    doc = f"intro\n{BEGIN}\nold\n{END}\noutro\n"
    assert replace_generated(doc, "new\n") == f"intro\n{BEGIN}\nnew\n{END}\noutro\n"
    with pytest.raises(ValueError, match="markers"):
        replace_generated("no markers", "new\n")


def test_write_makes_a_stale_reference_current_and_check_tells_them_apart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = tmp_path / "configuration.md"
    doc.write_text(f"# Configuration\n{BEGIN}\nstale\n{END}\n", encoding="utf-8")
    assert main(["--check", str(doc)]) == 1
    assert "--write" in capsys.readouterr().out
    assert main(["--write", str(doc)]) == 0
    assert main(["--check", str(doc)]) == 0
    assert generated_part(doc.read_text(encoding="utf-8")) == render_reference()
    assert main([]) == 0
    assert capsys.readouterr().out == render_reference()
