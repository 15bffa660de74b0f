"""What the README shows a new user works as shown."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from common.config import parse_config
from services.compiler import analyse_blueprint, list_catalogue, parse_blueprint

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_the_blueprint_example_is_valid() -> None:
    block = next(b for b in _blocks("json") if '"nodes"' in b)
    blueprint = parse_blueprint(json.loads(block))
    analysis = analyse_blueprint(blueprint)
    assert analysis is not None


def test_the_health_reply_example_is_what_clients_accept() -> None:
    from common.health import HealthStatus, classify_reply

    block = next(b for b in _blocks("json") if '"status"' in b)
    status, _ = classify_reply(json.loads(block))
    assert status is HealthStatus.HEALTHY


def test_the_catalogue_listed_is_the_catalogue() -> None:
    for entry in list_catalogue():
        assert f"`{entry.name}`" in README


def test_the_config_reference_is_a_valid_config() -> None:
    config = next(b for b in _blocks("yaml") if b.startswith("version: 1"))
    parse_config(yaml.safe_load(config))
