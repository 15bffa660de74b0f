"""Who may read and change what through the console: tokens, sessions and CSRF tokens.

Pure: no I/O; the web layer hands in what the request carried.

- With no token configured the console is open (reads and changes), and says so.
- With a token, a change needs it: as `Authorization: Bearer <token>` (API
  clients) or through a session opened by posting the token on the login page.
  Reads need it too unless the console is configured read-only-open.
- Every browser form carries the session's CSRF token, checked on every POST
  (forms exist in open mode too). The session cookie is HttpOnly and
  SameSite=Strict, so other sites cannot ride on it either way.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "SESSION_COOKIE",
    "Access",
    "Decision",
    "Session",
    "SessionStore",
    "bearer_token",
    "tokens_match",
]

SESSION_COOKIE = "graftmesh_console"
# Sessions past this many are dropped oldest first: a client that never keeps its
# cookie cannot grow the store without bound.
_MAX_SESSIONS = 10_000


def tokens_match(given: str | None, expected: str | None) -> bool:
    """Whether `given` is the configured token, in constant time."""
    if given is None or expected is None:
        return False
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, else None."""
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


@dataclass
class Session:
    """A browser session: its CSRF token, and whether the mesh's token opened it."""

    id: str
    csrf: str
    authenticated: bool
    expires_at: float

    def csrf_ok(self, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(
            given.encode("utf-8"), self.csrf.encode("utf-8")
        )


class SessionStore:
    """Server-side sessions by id, expiring after `ttl_s`, at most `max_sessions` kept."""

    def __init__(
        self,
        ttl_s: float,
        *,
        max_sessions: int = _MAX_SESSIONS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self._max = max_sessions
        self._clock = clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, session_id: str | None) -> Session | None:
        """The live session of that id, else None (expired ones are forgotten)."""
        if not session_id:
            return None
        found = self._sessions.get(session_id)
        if found is None:
            return None
        if found.expires_at <= self._clock():
            del self._sessions[session_id]
            return None
        return found

    def new(self, *, authenticated: bool = False) -> Session:
        """A fresh session with ids nobody can guess."""
        session = Session(
            id=secrets.token_urlsafe(32),
            csrf=secrets.token_urlsafe(32),
            authenticated=authenticated,
            expires_at=self._clock() + self.ttl_s,
        )
        self._sessions[session.id] = session
        while len(self._sessions) > self._max:
            self._sessions.popitem(last=False)
        return session

    def login(self, old: Session | None) -> Session:
        """An authenticated session replacing `old`: new ids, so a session id planted
        before the login is worth nothing after it."""
        if old is not None:
            self._sessions.pop(old.id, None)
        return self.new(authenticated=True)

    def logout(self, session: Session) -> Session:
        self._sessions.pop(session.id, None)
        return self.new()


class Decision(StrEnum):
    ALLOW = "allow"
    # No valid credentials: the browser goes to the login page, the API answers 401.
    LOGIN = "login"


@dataclass(frozen=True)
class Access:
    """The console's access policy."""

    token: str | None
    readonly_open: bool

    @property
    def open(self) -> bool:
        return self.token is None

    def authenticated(self, bearer: str | None, session: Session | None) -> bool:
        """Whether the request proves it holds the token (header or session)."""
        if self.token is None:
            return True
        if bearer is not None:
            return tokens_match(bearer, self.token)
        return session is not None and session.authenticated

    def can_read(self, bearer: str | None, session: Session | None) -> Decision:
        if self.open or self.readonly_open or self.authenticated(bearer, session):
            return Decision.ALLOW
        return Decision.LOGIN

    def can_change(self, bearer: str | None, session: Session | None) -> Decision:
        return Decision.ALLOW if self.authenticated(bearer, session) else Decision.LOGIN
