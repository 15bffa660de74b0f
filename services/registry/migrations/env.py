"""Alembic environment of the registry database.

The registry runs these migrations itself at start (`database.upgrade`), handing
over its connection in `config.attributes["connection"]`. From the command line,
`alembic -c services/registry/alembic.ini upgrade head` (or `revision
--autogenerate -m "..."` for a new one) uses `GRAFTMESH_REGISTRY_DB_URL`, else the
`sqlalchemy.url` of the ini file.
"""

from __future__ import annotations

import os

import sqlalchemy as sa
from alembic import context

from services.registry.schema import metadata

_config = context.config


def _run(connection: sa.Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        # SQLite cannot ALTER most things in place; batch mode copies the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _run_online() -> None:
    connection = _config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = os.environ.get("GRAFTMESH_REGISTRY_DB_URL") or _config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("set GRAFTMESH_REGISTRY_DB_URL or sqlalchemy.url to the registry database")
    from services.registry.database import WRITE, create_registry_engine

    engine = create_registry_engine(url)
    try:
        with engine.connect().execution_options(**WRITE) as conn:
            _run(conn)
            conn.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("the registry migrations run online only (against a database)")
_run_online()
