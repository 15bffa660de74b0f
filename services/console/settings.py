"""The console's settings, from its environment (in `startup_config.yaml`: its `env:`).

- `GRAFTMESH_TOKEN`: the mesh's shared token; or `GRAFTMESH_TOKEN_FILE`, a file
  holding it (surrounding whitespace is ignored). With a token, every change needs
  it (`Authorization: Bearer <token>`, or a session opened on the login page), and
  so does every read unless `GRAFTMESH_CONSOLE_READONLY_OPEN=1`. Without one,
  everything is open (the one-workstation default) and every page says so.
- `GRAFTMESH_CONSOLE_READONLY_OPEN`: `1`/`true` lets anyone read without the token.
- `GRAFTMESH_CONSOLE_SECURE_COOKIE`: `1` marks the session cookie `Secure` (set it
  when the console is served over HTTPS by a proxy in front of it).
- `GRAFTMESH_CONSOLE_SESSION_TTL_S`: how long a session lasts (default 43200, 12 h).
- `GRAFTMESH_CONSOLE_ALERTS`: recent alerts kept for the mesh page (default 200).
- `GRAFTMESH_CONSOLE_TRAINER`, `_REGISTRY`, `_ROUTER`, `_COMPILER`: the agent names
  the console talks to (defaults: `trainer`, `registry`, `router`, `compiler`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from common.agent import env_number
from common.errors import ConfigError
from common.security import TOKEN_ENV, TOKEN_FILE_ENV, Security

__all__ = [
    "READONLY_OPEN_ENV",
    "TOKEN_ENV",
    "TOKEN_FILE_ENV",
    "ConsoleSettings",
    "read_token",
]

READONLY_OPEN_ENV = "GRAFTMESH_CONSOLE_READONLY_OPEN"
SECURE_COOKIE_ENV = "GRAFTMESH_CONSOLE_SECURE_COOKIE"
SESSION_TTL_ENV = "GRAFTMESH_CONSOLE_SESSION_TTL_S"
ALERTS_ENV = "GRAFTMESH_CONSOLE_ALERTS"
_AGENT_ENVS = {
    "trainer": "GRAFTMESH_CONSOLE_TRAINER",
    "registry": "GRAFTMESH_CONSOLE_REGISTRY",
    "router": "GRAFTMESH_CONSOLE_ROUTER",
    "compiler": "GRAFTMESH_CONSOLE_COMPILER",
}
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})


def read_token(environ: Mapping[str, str]) -> str | None:
    """The mesh's shared token (`common.security`: `GRAFTMESH_TOKEN`, else the file named
    by `GRAFTMESH_TOKEN_FILE`); None when neither is set. ConfigError when it is unusable."""
    return Security.from_environ(environ).token


def _flag(environ: Mapping[str, str], key: str, problems: list[str]) -> bool:
    raw = environ.get(key, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw not in _FALSE:
        problems.append(f"{key}={raw!r}: use 1 or 0")
    return False


@dataclass(frozen=True)
class ConsoleSettings:
    """Everything the console reads from its environment, checked."""

    # Kept out of repr so that no log line or traceback ever shows it.
    token: str | None = field(default=None, repr=False)
    readonly_open: bool = False
    secure_cookie: bool = False
    session_ttl_s: float = 12 * 3600.0
    alerts_kept: int = 200
    agents: Mapping[str, str] = field(default_factory=lambda: {r: r for r in _AGENT_ENVS})

    @property
    def open_access(self) -> bool:
        """No token configured: anyone who reaches the port may read and change."""
        return self.token is None

    def agent(self, role: str) -> str:
        """The agent name that plays `role` (`trainer`, `registry`, `router`, `compiler`)."""
        return self.agents[role]

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> ConsoleSettings:
        """Read and check the settings; ConfigError listing every problem."""
        problems: list[str] = []
        token: str | None = None
        try:
            token = read_token(environ)
        except ConfigError as err:
            problems.extend(err.problems)
        agents: dict[str, str] = {}
        for role, key in _AGENT_ENVS.items():
            name = environ.get(key, "").strip() or role
            if not _NAME_RE.match(name):
                problems.append(f"{key}={name!r}: use letters, digits, '_' and '-' only")
            agents[role] = name
        settings = cls(
            token=token,
            readonly_open=_flag(environ, READONLY_OPEN_ENV, problems),
            secure_cookie=_flag(environ, SECURE_COOKIE_ENV, problems),
            session_ttl_s=env_number(environ, SESSION_TTL_ENV, 12 * 3600.0, 60.0, problems),
            alerts_kept=int(env_number(environ, ALERTS_ENV, 200, 1, problems)),
            agents=agents,
        )
        if problems:
            raise ConfigError(problems)
        return settings
