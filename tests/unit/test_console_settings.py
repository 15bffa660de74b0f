"""The console's settings: the mesh's token and access from the environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.errors import ConfigError
from services.console.settings import ConsoleSettings, read_token


def test_no_token_means_open_access() -> None:
    settings = ConsoleSettings.from_environ({})
    assert settings.token is None and settings.open_access
    assert settings.agent("trainer") == "trainer"


def test_the_token_comes_from_the_environment_or_a_file(tmp_path: Path) -> None:
    assert read_token({"GRAFTMESH_TOKEN": "abc"}) == "abc"
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    assert read_token({"GRAFTMESH_TOKEN_FILE": str(token_file)}) == "from-file"


def test_the_token_never_shows_in_the_settings_repr() -> None:
    settings = ConsoleSettings.from_environ({"GRAFTMESH_TOKEN": "very-secret"})
    assert "very-secret" not in repr(settings)


def test_every_bad_setting_is_reported_at_once(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        ConsoleSettings.from_environ(
            {
                "GRAFTMESH_TOKEN_FILE": str(tmp_path / "missing"),
                "GRAFTMESH_CONSOLE_READONLY_OPEN": "maybe",
                "GRAFTMESH_CONSOLE_SESSION_TTL_S": "1",
                "GRAFTMESH_CONSOLE_TRAINER": "no spaces",
            }
        )
    problems = "\n".join(caught.value.problems)
    assert "GRAFTMESH_TOKEN_FILE" in problems
    assert "GRAFTMESH_CONSOLE_READONLY_OPEN" in problems
    assert "GRAFTMESH_CONSOLE_SESSION_TTL_S" in problems
    assert "GRAFTMESH_CONSOLE_TRAINER" in problems


def test_an_empty_token_file_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "token"
    empty.write_text("\n")
    with pytest.raises(ConfigError):
        read_token({"GRAFTMESH_TOKEN_FILE": str(empty)})
