"""Fixtures of the registry's unit tests: stores on SQLite, and on PostgreSQL where marked."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from services.registry import SqlRegistryStore
from services.registry.schema import metadata
from tests.unit.registry.databases import fresh_postgres_database


class ManualClock:
    """Microseconds that move only when told (alias history times, "live at T")."""

    def __init__(self, start_us: int = 1_700_000_000_000_000) -> None:
        self.now_us = start_us

    def __call__(self) -> int:
        return self.now_us

    def advance(self, us: int = 1_000_000) -> int:
        self.now_us += us
        return self.now_us


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)],
)
def backend(request: pytest.FixtureRequest) -> str:
    """Which database the store under test runs on."""
    name: str = request.param
    return name


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """One PostgreSQL database for the session's store tests, dropped at the end."""
    with fresh_postgres_database() as url:
        yield url


@pytest.fixture
def database_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """An empty registry database of `backend`: a new SQLite file, or the session's
    PostgreSQL database with every table emptied.
    """
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    url: str = request.getfixturevalue("postgres_url")
    engine = sa.create_engine(url, poolclass=sa.NullPool)
    try:
        with engine.begin() as conn:
            if sa.inspect(conn).has_table("models"):
                tables = ", ".join(t.name for t in metadata.sorted_tables)
                conn.execute(sa.text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    finally:
        engine.dispose()
    return url


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def store(database_url: str, clock: ManualClock) -> Iterator[SqlRegistryStore]:
    """A migrated store on a fresh database, with a manual clock."""
    opened = SqlRegistryStore.open(database_url, clock=clock)
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def sqlite_store(tmp_path: Path, clock: ManualClock) -> Iterator[SqlRegistryStore]:
    """A migrated store on a fresh SQLite database (for tests of pure-ish logic)."""
    opened = SqlRegistryStore.open(f"sqlite:///{tmp_path / 'registry.db'}", clock=clock)
    try:
        yield opened
    finally:
        opened.close()
