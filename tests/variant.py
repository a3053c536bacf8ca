"""The suite-wide variant: `CW_TEST_VARIANT=splice|workers2` runs every test's daemon on the
splice data path or with `workers: 2` unless the test sets that key itself (issue 15: no behaviour
change on either data path or with two workers). Unset or `portable`: configs stay as written."""

from __future__ import annotations

import os
from typing import Any

import pytest

VARIANTS = ("portable", "splice", "workers2")
# Not CONNWATCH_*: the daemons the tests start inherit the environment, and CONNWATCH_* there is a
# config override (an unknown key is a config error).
ENV = "CW_TEST_VARIANT"


def current() -> str:
    name = os.environ.get(ENV, "") or "portable"
    if name not in VARIANTS:
        raise pytest.UsageError(f"{ENV}={name!r}: expected one of {', '.join(VARIANTS)}")
    return name


VARIANT = current()


def with_variant(config: dict[str, Any], *, in_process: bool = False) -> dict[str, Any]:
    """`config` with the variant's defaults filled in where the test left the key unset.

    In-process daemons ignore workers2: `workers` there would fork children out of the test
    process, and those tests inspect the one process's state."""
    if VARIANT == "splice":
        listeners = [_splice_default(listener) for listener in config.get("listeners", [])]
        return {**config, "listeners": listeners}
    if VARIANT == "workers2" and not in_process:
        return {"workers": 2, **config}
    return config


def _splice_default(listener: Any) -> Any:
    if isinstance(listener, dict):
        return {"data_path": "splice", **listener}
    return listener  # not a mapping: the test checks that config errors, leave it as written


def skip_under(variant: str, reason: str) -> pytest.MarkDecorator:
    """Skip a test that cannot hold under `variant` by its nature (never to hide a bug)."""
    assert variant in VARIANTS[1:], variant
    return pytest.mark.skipif(variant == VARIANT, reason=f"{ENV}={variant}: {reason}")


# Processes a daemon subprocess runs when its test leaves `workers` unset: for bounds that hold per
# process (log throttles), which a test then scales.
WORKERS = 2 if VARIANT == "workers2" else 1
