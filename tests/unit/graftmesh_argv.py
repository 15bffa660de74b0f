"""`graftmesh ...` command lines as the real CLI parses them, for checking deploy files."""

from __future__ import annotations

import shlex
from typing import Any

import pytest
import typer

from services.supervisor.cli import app


def parse_graftmesh(argv: list[str]) -> tuple[str, dict[str, Any]]:
    """The verb and parsed parameters of a `graftmesh ...` command line; fails on bad usage."""
    assert argv and argv[0] == "graftmesh", argv
    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    verb, *rest = argv[1:]
    registered = {c.name or c.callback.__name__ for c in app.registered_commands if c.callback}
    assert verb in registered, f"`graftmesh {verb}` is not a command ({sorted(registered)})"
    try:
        ctx = commands[verb].make_context(verb, list(rest))
    except typer.TyperException as exc:
        pytest.fail(f"`{shlex.join(argv)}` does not parse: {exc}")
    return verb, dict(ctx.params)
