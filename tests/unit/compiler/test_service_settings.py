"""The compiler agent's settings: defaults, overrides, and errors that name the variable."""

from __future__ import annotations

import pytest

from common.errors import ConfigError
from services.compiler.service import CompilerSettings


def test_defaults_apply_when_nothing_is_set() -> None:
    settings = CompilerSettings.from_environ({})
    assert settings.store_max_bytes == 2048 * 1024 * 1024
    assert settings.max_latency_ratio == 10.0


def test_environment_overrides_the_defaults() -> None:
    settings = CompilerSettings.from_environ(
        {"GRAFTMESH_COMPILER_STORE_MAX_MB": "64", "GRAFTMESH_COMPILER_MAX_LATENCY_RATIO": "2.5"}
    )
    assert settings.store_max_bytes == 64 * 1024 * 1024
    assert settings.max_latency_ratio == 2.5


@pytest.mark.parametrize("value", ["0", "-5", "lots", "nan", "inf"])
def test_bad_value_is_a_config_error_naming_the_variable(value: str) -> None:
    with pytest.raises(ConfigError) as raised:
        CompilerSettings.from_environ({"GRAFTMESH_COMPILER_STORE_MAX_MB": value})
    assert raised.value.problems == [
        f"GRAFTMESH_COMPILER_STORE_MAX_MB={value!r} must be a positive number"
    ]
