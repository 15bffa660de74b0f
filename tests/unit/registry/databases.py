"""Databases for registry tests: a fresh SQLite file, or a fresh PostgreSQL database.

PostgreSQL is the local server (`GRAFTMESH_TEST_PG_URL`, default
`postgresql+psycopg://root@127.0.0.1:5432/postgres`, an account that may create
databases). Each test database is `graftmesh_test_<hex>`, created empty and
dropped afterwards, connections and all.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

PG_ADMIN_URL = os.environ.get(
    "GRAFTMESH_TEST_PG_URL", "postgresql+psycopg://root@127.0.0.1:5432/postgres"
)
BACKENDS = ("sqlite", "postgresql")


def _admin_engine() -> sa.Engine:
    return sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)


def postgres_reachable() -> bool:
    """Whether the test PostgreSQL answers."""
    engine = _admin_engine()
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        return True
    except sa.exc.OperationalError:
        return False
    finally:
        engine.dispose()


@contextlib.contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """The URL of a new, empty PostgreSQL database, dropped on exit; skips without a server."""
    if not postgres_reachable():
        pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN_URL}")
    name = f"graftmesh_test_{uuid.uuid4().hex[:12]}"
    engine = _admin_engine()
    try:
        with engine.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        try:
            yield sa.make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
        finally:
            with engine.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        engine.dispose()


@contextlib.contextmanager
def fresh_database(backend: str, tmp_path: Path) -> Iterator[str]:
    """The URL of a new, empty database of `backend` (`sqlite` or `postgresql`)."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / f'registry-{uuid.uuid4().hex[:8]}.db'}"
        return
    with fresh_postgres_database() as url:
        yield url
