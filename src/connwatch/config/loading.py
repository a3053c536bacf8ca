"""The public way in: `load_settings()` (YAML file or a base, then CONNWATCH_* overrides, then
validation) and the way back out, `effective_yaml()`.

`load_settings()` raises `ConfigError` listing every problem, each naming file, line, field path,
what was given and what is allowed; nothing else escapes it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import yaml
from pydantic import ValidationError

from connwatch.config.env_overrides import _apply_env
from connwatch.config.models import Settings
from connwatch.config.report import _duplicate_names, _issue, _problem, _relevant, _show
from connwatch.config.schema_paths import _allowed_keys
from connwatch.config.yaml_source import _read_yaml, _Where
from connwatch.exceptions import ConfigError

_MAX_ISSUES = 200


def load_settings(
    path: str | os.PathLike[str] | None,
    *,
    env: Mapping[str, str] | None = None,
    base: dict[str, Any] | None = None,
) -> Settings:
    """Read the YAML file (or take `base` when `path` is None), apply CONNWATCH_* overrides from
    `env` (default os.environ), validate. ConfigError lists every problem; nothing else escapes."""
    source = os.fspath(path) if path is not None else "<command line>"
    try:
        return _load(path, source, os.environ if env is None else env, base)
    except ConfigError:
        raise
    except Exception as exc:  # the promise is ConfigError or a Settings, whatever the input
        issue = f"{source}: cannot load the configuration: {type(exc).__name__}: {exc}"
        raise ConfigError([issue], source) from exc


def _load(
    path: str | os.PathLike[str] | None,
    source: str,
    env: Mapping[str, str],
    base: dict[str, Any] | None,
) -> Settings:
    if path is not None:
        data, where, issues = _read_yaml(path, source)
    else:
        data, where, issues = base, _Where(source, {}, {}, {}), []
    if data is None:
        data = {}
    if not isinstance(data, dict):
        kind = "a list" if isinstance(data, list) else f"the {type(data).__name__} {_show(data)}"
        raise ConfigError(
            [
                f"{where.describe(())}: the top level must be a mapping with the keys "
                f"{_allowed_keys(())}; given {kind}"
            ],
            source,
        )
    data = dict(data)
    for key in [k for k in data if not isinstance(k, str)]:
        # pydantic-settings would raise TypeError for these; name them like nested levels do.
        issues.append(f"{where.describe(())}: the key {_show(key)} must be text")
        del data[key]
    issues += _apply_env(data, env, where)
    problems = _duplicate_names(data)
    settings: Settings | None = None
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        found = {"duplicate_listener_name"} if problems else set()
        problems += _relevant([p for p in map(_problem, exc.errors()) if p.kind not in found])
    problems.sort(key=lambda p: where.line(p.loc))
    issues += [_issue(problem, where) for problem in problems]
    if issues or settings is None:
        if len(issues) > _MAX_ISSUES:
            issues = [*issues[:_MAX_ISSUES], f"... and {len(issues) - _MAX_ISSUES} more"]
        raise ConfigError(issues, source)
    return settings


def one_listener_config(listen: str, upstreams: list[str]) -> dict[str, Any]:
    """The `base` for `connwatch run --listen A --upstream B ...`: one listener named default."""
    return {"listeners": [{"name": "default", "listen": listen, "upstreams": list(upstreams)}]}


def effective_yaml(settings: Settings, *, show_secrets: bool = False) -> str:
    """The config as YAML with every default filled in; loads back to an equal Settings (the
    admin token reads `***` unless `show_secrets`)."""
    data = settings.model_dump(mode="json")
    token = settings.admin.token
    if token is not None:
        data["admin"]["token"] = token.get_secret_value() if show_secrets else "***"
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)
