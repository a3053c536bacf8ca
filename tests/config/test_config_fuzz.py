"""Bounded fuzzing in the normal suite: the fuzz/ targets under hypothesis, a few seconds each.

tests/config/test_config.py already throws random structures and text at the loader; here the inputs
are a complete valid config with a few edits (so validation reaches every nested model), the
same through the environment, and the fuzz/ targets for PROXY headers and heartbeat frames fed
in arbitrary chunks. The long runs (atheris or hypothesis) are in fuzz/README.md.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from fuzz.strategies import FULL_CONFIG, INPUTS, PATHS, SCALARS, mutated_configs
from fuzz.targets import CATCH_ALL, TARGETS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connwatch.config import Settings, effective_yaml, load_settings
from connwatch.exceptions import ConfigError

TOKEN = FULL_CONFIG["admin"]["token"]
BOUNDED = {"proxy": 400, "frames": 400, "config": 60}  # examples: a few seconds each


@pytest.mark.parametrize("name", list(TARGETS))
def test_fuzz_target_finds_nothing(name: str) -> None:
    target = TARGETS[name]

    @settings(
        max_examples=BOUNDED[name],
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(INPUTS[name])
    def run(data: bytes) -> None:
        target(data)

    run()


def test_the_full_config_is_valid(tmp_path: Path) -> None:
    path = tmp_path / "full.yaml"
    path.write_text(yaml.safe_dump(FULL_CONFIG))
    settings_ = load_settings(path, env={})
    assert settings_.admin.token is not None
    assert settings_.admin.token.get_secret_value() == TOKEN


def outcome(load: Any) -> Settings | list[str]:
    """The loaded settings, or the issues of the ConfigError; anything else propagates."""
    try:
        return load()  # type: ignore[no-any-return]
    except ConfigError as exc:
        issues = list(exc.issues)
    assert issues
    assert not any(CATCH_ALL in issue for issue in issues), issues
    return issues


def assert_token_hidden(result: Settings | list[str]) -> None:
    text = effective_yaml(result) if isinstance(result, Settings) else "\n".join(result)
    assert TOKEN not in text, text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=mutated_configs())
def test_edited_full_config_as_python_objects_gives_settings_or_config_error(
    config: dict[str, Any],
) -> None:
    before = copy.deepcopy(config)
    result = outcome(lambda: load_settings(None, env={}, base=config))
    assert config == before or config != config  # the base is not changed (NaN aside)
    assert_token_hidden(result)


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(config=mutated_configs())
def test_edited_full_config_as_yaml_gives_settings_or_config_error(
    tmp_path: Path, config: dict[str, Any]
) -> None:
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True), errors="surrogatepass")
    result = outcome(lambda: load_settings(path, env={}))
    assert_token_hidden(result)
    if isinstance(result, Settings):  # check-config's output loads back to the same thing
        again = tmp_path / "again.yaml"
        again.write_text(effective_yaml(result, show_secrets=True))
        assert load_settings(again, env={}) == result


ENV_NAMES = st.sampled_from(PATHS).map(
    lambda path: "CONNWATCH_" + "__".join(str(part).upper() for part in path)
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    env=st.dictionaries(
        ENV_NAMES, SCALARS.map(lambda v: "" if v is None else str(v)), min_size=1, max_size=4
    )
)
def test_environment_overrides_of_real_fields_give_settings_or_config_error(
    tmp_path: Path, env: dict[str, str]
) -> None:
    path = tmp_path / "full.yaml"
    if not path.exists():
        path.write_text(yaml.safe_dump(FULL_CONFIG))
    env = {k: v.replace("\x00", "") for k, v in env.items()}  # no NUL in a real environment
    result = outcome(lambda: load_settings(path, env=env))
    if "CONNWATCH_ADMIN__TOKEN" not in env:
        assert_token_hidden(result)


# Found by fuzz/run_atheris.py config (the one-byte file "?"): a top-level key that is not text.
@pytest.mark.parametrize("text", ["?\n", "1: x\n", "true: 1\n", "~: 1\nlisteners: []\n"])
def test_top_level_key_that_is_not_text_is_named(tmp_path: Path, text: str) -> None:
    path = tmp_path / "odd.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    issues = info.value.issues
    assert not any(CATCH_ALL in issue for issue in issues), issues
    assert any("must be text" in issue for issue in issues), issues
