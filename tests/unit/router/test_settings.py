"""The router's settings from `ROUTER_CONFIG`."""

from __future__ import annotations

import pytest

from common.errors import ConfigError
from services.router import settings_from_environ


def test_defaults_without_the_variable() -> None:
    settings = settings_from_environ({})
    assert settings.replicas == 2 and settings.batching.max_batch_size == 32
    assert settings.price("cuda:1") == settings.prices["cuda"]
    assert settings.price("mps") == 1.0


def test_nested_values_are_read() -> None:
    settings = settings_from_environ(
        {
            "ROUTER_CONFIG": '{"replicas": 4, "batching": {"max_wait_us": 100},'
            ' "quality_floors": {"m": {"metric": "accuracy", "min": 0.9}}}'
        }
    )
    assert settings.replicas == 4 and settings.batching.max_wait_us == 100
    assert settings.quality_floors["m"].min == 0.9


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ("{", "is not JSON"),
        ("[1]", "must be a JSON object"),
        ('{"replica": 2}', "ROUTER_CONFIG.replica"),
        ('{"batching": {"max_batch_size": 0}}', "ROUTER_CONFIG.batching.max_batch_size"),
        ('{"ejection": {"base_ejection_s": 10, "max_ejection_s": 5}}', "max_ejection_s"),
        ('{"quality_floors": {"m": {"metric": "acc"}}}', "exactly one of"),
    ],
)
def test_bad_settings_name_the_key(raw: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        settings_from_environ({"ROUTER_CONFIG": raw})
