"""The model registry agent: model versions, artifacts, aliases and their history.

`ModelRegistry` is the entry point; `service` serves it as `graftmesh.v1.RegistryService`.
Pure modules (no I/O): `validation`, `history`, `paging`, `search`, `upload`,
`convert`, `records`. Boundaries: `store.RegistryStore` (implemented by
`sql_store.SqlRegistryStore` on SQLite or PostgreSQL, schema in `schema`,
migrations in `migrations/`, applied by `database.upgrade`) and
`artifacts.ArtifactStore` (`FileArtifactStore`). See README.md.
"""

from services.registry.artifacts import ArtifactStore, ArtifactWriter, FileArtifactStore
from services.registry.database import (
    create_registry_engine,
    current_revision,
    default_database_url,
    head_revision,
    upgrade,
)
from services.registry.history import alias_at, aliases_at, rollback_target
from services.registry.paging import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from services.registry.records import (
    AliasAction,
    AliasChange,
    AliasEntry,
    DeletedVersion,
    FileRecord,
    Lineage,
    ModelSummaryRecord,
    ModelVersionRecord,
    NewVersion,
    Page,
    Registered,
)
from services.registry.registry import Chunk, Download, EventSink, ModelRegistry, event_subject
from services.registry.search import Comparison, MetricFilter, SearchQuery, SortOrder
from services.registry.settings import RegistrySettings
from services.registry.sql_store import SqlRegistryStore
from services.registry.store import RegistryStore
from services.registry.upload import UploadTracker

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "MAX_PAGE_SIZE",
    "AliasAction",
    "AliasChange",
    "AliasEntry",
    "ArtifactStore",
    "ArtifactWriter",
    "Chunk",
    "Comparison",
    "DeletedVersion",
    "Download",
    "EventSink",
    "FileArtifactStore",
    "FileRecord",
    "Lineage",
    "MetricFilter",
    "ModelRegistry",
    "ModelSummaryRecord",
    "ModelVersionRecord",
    "NewVersion",
    "Page",
    "Registered",
    "RegistrySettings",
    "RegistryStore",
    "SearchQuery",
    "SortOrder",
    "SqlRegistryStore",
    "UploadTracker",
    "alias_at",
    "aliases_at",
    "create_registry_engine",
    "current_revision",
    "default_database_url",
    "event_subject",
    "head_revision",
    "rollback_target",
    "upgrade",
]
