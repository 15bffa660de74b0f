"""Which database failures are worth another attempt of the whole transaction."""

from __future__ import annotations

import sqlite3

import psycopg
from sqlalchemy import exc as sa_exc

from services.registry.sql_store import is_transient


def wrapped(orig: Exception) -> sa_exc.DBAPIError:
    return sa_exc.OperationalError("UPDATE models ...", {}, orig)


def test_a_busy_sqlite_database_is_transient() -> None:
    assert is_transient(wrapped(sqlite3.OperationalError("database is locked")))
    assert is_transient(wrapped(sqlite3.OperationalError("database table is locked: models")))


def test_postgres_serialization_failures_and_deadlocks_are_transient() -> None:
    assert is_transient(wrapped(psycopg.errors.SerializationFailure("could not serialize")))
    assert is_transient(wrapped(psycopg.errors.DeadlockDetected("deadlock detected")))


def test_other_failures_are_not() -> None:
    assert not is_transient(wrapped(sqlite3.OperationalError("no such table: models")))
    assert not is_transient(wrapped(psycopg.errors.UniqueViolation("duplicate key")))
    assert not is_transient(wrapped(psycopg.OperationalError("connection refused")))
