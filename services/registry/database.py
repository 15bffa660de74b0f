"""Connecting to the registry database and bringing its schema to the newest revision.

SQLite (the default, `<run_dir>/registry/registry.db`) runs in WAL mode, so
readers never wait for the writer, with foreign keys on and `synchronous=FULL`
(a committed registration survives a power cut, like its artifact files). Write
transactions start with `BEGIN IMMEDIATE`: they take the write lock up front and
queue on the busy timeout, instead of failing when two readers both try to
upgrade to writers. PostgreSQL (any `postgresql+psycopg://` URL) always plans
statements for their actual parameters (`plan_cache_mode = force_custom_plan`).

`upgrade(engine)` runs the Alembic migrations in `migrations/` up to head, in
one transaction; on PostgreSQL an advisory lock keeps two registries starting at
once from migrating together.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

__all__ = [
    "MIGRATIONS",
    "WRITE",
    "create_registry_engine",
    "current_revision",
    "default_database_url",
    "head_revision",
    "redact",
    "upgrade",
]

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# Execution options of a write transaction (see the module docstring).
WRITE: dict[str, Any] = {"registry_write": True}
SQLITE_BUSY_TIMEOUT_S = 30.0
# Any constant shared by every registry process: the key of the migration lock.
_MIGRATION_LOCK = 0x6772_6166_7472_6567  # "graftreg"


def default_database_url(run_dir: Path) -> str:
    """The SQLite database under the run dir: `<run_dir>/registry/registry.db`."""
    path = (run_dir / "registry" / "registry.db").resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def redact(url: str) -> str:
    """`url` without its password, for logs and health details."""
    return sa.make_url(url).render_as_string(hide_password=True)


def create_registry_engine(url: str, **kwargs: Any) -> sa.Engine:
    """An engine for `url`, set up as the module docstring says."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() != "sqlite":
        engine = sa.create_engine(parsed, pool_pre_ping=True, **kwargs)
        if parsed.get_backend_name() == "postgresql":
            sa.event.listen(engine, "connect", _postgres_session)
        return engine
    engine = sa.create_engine(
        parsed,
        connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False},
        **kwargs,
    )

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # The driver's own implicit BEGIN is off; transactions start in `_on_begin`.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        finally:
            cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(connection: sa.Connection) -> None:
        write = connection.get_execution_options().get("registry_write", False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


def _postgres_session(dbapi_connection: Any, _record: Any) -> None:
    # The driver prepares statements that run often, and PostgreSQL may then plan them
    # once for any parameters; the best plan of a search depends on the values (how
    # selective a tag or a metric bound is), and a generic one ran several times slower.
    with dbapi_connection.cursor() as cursor:
        cursor.execute("SET plan_cache_mode = force_custom_plan")
    dbapi_connection.commit()


def _alembic_config(connection: sa.Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def upgrade(engine: sa.Engine) -> str:
    """Migrate the database to the newest revision; the revision it is at afterwards."""
    with engine.connect().execution_options(**WRITE) as connection, connection.begin():
        if connection.dialect.name == "postgresql":
            connection.execute(
                sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK}
            )
        command.upgrade(_alembic_config(connection), "head")
        revision = MigrationContext.configure(connection).get_current_revision()
    return revision or ""


def current_revision(engine: sa.Engine) -> str | None:
    """The revision the database is at (None before the first migration)."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str:
    """The newest revision in `migrations/`."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None, "the registry has no migrations"
    return head
