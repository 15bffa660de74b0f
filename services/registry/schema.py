"""The registry's tables (SQLAlchemy Core), the one description that migrations follow.

Times are integer microseconds since the Unix epoch (`*_us`): exact, portable
between SQLite and PostgreSQL, and cheap to index and compare.

- `models`: one row per model name; `latest_version` is the per-model counter
  that numbers new versions (it only grows: numbers are never reused, even after
  a deletion).
- `model_versions`: one row per version, unique on (model_id, version). The input
  signature and reference statistics are kept as serialized protobuf messages
  (`graftmesh.v1.InputSignature` / `ReferenceStatistics`), opaque to the store.
- `version_metrics`, `version_tags`, `version_files`: one row per metric, tag and
  file, indexed by (key, value) for searches.
- `aliases`: what each alias points at now.
- `alias_history`: every alias change, append-only; `id` orders the changes.

Names compare byte-wise on both databases (`COLLATE "C"` on PostgreSQL, SQLite's
default), so listings are ordered the same everywhere.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

__all__ = [
    "alias_history",
    "aliases",
    "metadata",
    "model_versions",
    "models",
    "version_files",
    "version_metrics",
    "version_tags",
]

# Deterministic constraint names, so migrations can refer to them on every database.
metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


def _name(length: int) -> sa.types.TypeEngine[str]:
    """A name column that sorts byte-wise on every database."""
    return sa.String(length).with_variant(postgresql.VARCHAR(length, collation="C"), "postgresql")


models = sa.Table(
    "models",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", _name(128), nullable=False, unique=True),
    sa.Column("latest_version", sa.BigInteger, nullable=False),
    sa.Column("created_us", sa.BigInteger, nullable=False),
    sa.Column("updated_us", sa.BigInteger, nullable=False),
)

model_versions = sa.Table(
    "model_versions",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column(
        "model_id",
        sa.Integer,
        sa.ForeignKey("models.id", ondelete="RESTRICT"),
        nullable=False,
    ),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("job_id", sa.String(256), nullable=False),
    sa.Column("kernel_ids", sa.JSON, nullable=False),
    sa.Column("parent_version", sa.BigInteger, nullable=False),
    sa.Column("input_signature", sa.LargeBinary, nullable=False),
    sa.Column("reference_statistics", sa.LargeBinary, nullable=False),
    sa.Column("created_by", sa.String(256), nullable=False),
    sa.Column("created_us", sa.BigInteger, nullable=False),
    sa.UniqueConstraint("model_id", "version"),
    sa.Index(None, "created_us"),
    sa.Index(None, "version"),
)

version_metrics = sa.Table(
    "version_metrics",
    metadata,
    sa.Column(
        "version_id",
        sa.Integer,
        sa.ForeignKey("model_versions.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("key", sa.String(128), primary_key=True),
    sa.Column("value", sa.Float(precision=53), nullable=False),
    sa.Index(None, "key", "value", "version_id"),
)

version_tags = sa.Table(
    "version_tags",
    metadata,
    sa.Column(
        "version_id",
        sa.Integer,
        sa.ForeignKey("model_versions.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("key", sa.String(128), primary_key=True),
    sa.Column("value", sa.String(1024), nullable=False),
    sa.Index(None, "key", "value", "version_id"),
)

version_files = sa.Table(
    "version_files",
    metadata,
    sa.Column(
        "version_id",
        sa.Integer,
        sa.ForeignKey("model_versions.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("name", sa.String(255), primary_key=True),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Index(None, "sha256"),
)

aliases = sa.Table(
    "aliases",
    metadata,
    sa.Column(
        "model_id",
        sa.Integer,
        sa.ForeignKey("models.id", ondelete="RESTRICT"),
        primary_key=True,
    ),
    sa.Column("alias", _name(64), primary_key=True),
    # RESTRICT: a version an alias points at cannot disappear underneath it.
    sa.Column(
        "version_id",
        sa.Integer,
        sa.ForeignKey("model_versions.id", ondelete="RESTRICT"),
        nullable=False,
    ),
    sa.Column("updated_us", sa.BigInteger, nullable=False),
    sa.Index(None, "version_id"),
)

alias_history = sa.Table(
    "alias_history",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column(
        "model_id",
        sa.Integer,
        sa.ForeignKey("models.id", ondelete="RESTRICT"),
        nullable=False,
    ),
    sa.Column("alias", _name(64), nullable=False),
    # Version numbers, not keys: the history outlives the versions it names.
    sa.Column("from_version", sa.BigInteger, nullable=False),
    sa.Column("to_version", sa.BigInteger, nullable=False),
    sa.Column("action", sa.String(16), nullable=False),
    sa.Column("actor", sa.String(256), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("at_us", sa.BigInteger, nullable=False),
    sa.Index(None, "model_id", "alias", "id"),
    sa.Index(None, "model_id", "at_us"),
)
