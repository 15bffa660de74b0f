"""The package exports exactly its public API."""

from __future__ import annotations

from services import registry

EXPECTED = {
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
}


def test_exports_are_the_public_api_and_all_exist() -> None:
    assert set(registry.__all__) == EXPECTED
    missing = [name for name in registry.__all__ if not hasattr(registry, name)]
    assert missing == []
