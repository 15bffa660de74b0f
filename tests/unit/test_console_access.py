"""The console's access rules: tokens, sessions and CSRF tokens."""

from __future__ import annotations

from services.console.access import (
    Access,
    Decision,
    SessionStore,
    bearer_token,
    tokens_match,
)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_bearer_token_reads_only_the_bearer_scheme() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token("Bearer ") is None
    assert bearer_token(None) is None


def test_tokens_match_only_the_same_token() -> None:
    assert tokens_match("s3cret", "s3cret")
    assert not tokens_match("s3cre", "s3cret")
    assert not tokens_match(None, "s3cret")
    assert not tokens_match("s3cret", None)


def test_without_a_token_everything_is_open() -> None:
    access = Access(token=None, readonly_open=False)
    assert access.can_read(None, None) is Decision.ALLOW
    assert access.can_change(None, None) is Decision.ALLOW


def test_with_a_token_reads_and_changes_need_it_unless_reads_are_open() -> None:
    store = SessionStore(60)
    anonymous, logged_in = store.new(), store.login(None)
    closed = Access(token="t", readonly_open=False)
    assert closed.can_read(None, anonymous) is Decision.LOGIN
    assert closed.can_read("wrong", None) is Decision.LOGIN
    assert closed.can_read("t", None) is Decision.ALLOW
    assert closed.can_read(None, logged_in) is Decision.ALLOW
    assert closed.can_change(None, anonymous) is Decision.LOGIN
    assert closed.can_change(None, logged_in) is Decision.ALLOW
    # A wrong bearer token is not rescued by a logged-in session.
    assert closed.can_change("wrong", logged_in) is Decision.LOGIN
    readable = Access(token="t", readonly_open=True)
    assert readable.can_read(None, None) is Decision.ALLOW
    assert readable.can_change(None, anonymous) is Decision.LOGIN


def test_sessions_expire_and_login_replaces_the_session_ids() -> None:
    clock = Clock()
    store = SessionStore(10, clock=clock)
    before = store.new()
    assert store.get(before.id) is before
    after = store.login(before)
    assert after.authenticated
    assert after.id != before.id and after.csrf != before.csrf
    assert store.get(before.id) is None
    clock.now = 11
    assert store.get(after.id) is None
    assert store.get(None) is None


def test_the_store_keeps_a_bounded_number_of_sessions() -> None:
    store = SessionStore(60, max_sessions=3)
    first = store.new()
    for _ in range(3):
        store.new()
    assert len(store) == 3
    assert store.get(first.id) is None


def test_csrf_tokens_must_match_the_session() -> None:
    session = SessionStore(60).new()
    assert session.csrf_ok(session.csrf)
    assert not session.csrf_ok("forged")
    assert not session.csrf_ok(None)
