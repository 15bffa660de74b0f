"""The `RegistryStore` boundary: the whole of what the registry needs from its database.

Every method is one transaction and blocks (call it from a worker thread in async
code). Errors are the mesh's: `NotFoundError` for an unknown model, version or
alias, `FailedPreconditionError` for a change the current state refuses,
`InvalidArgumentError` for a bad page token, `UnavailableError` when the
database cannot be reached. `SqlRegistryStore` (SQLite or PostgreSQL) is the one
implementation.
"""

from __future__ import annotations

from typing import Protocol

from services.registry.records import (
    AliasChange,
    AliasEntry,
    DeletedVersion,
    ModelSummaryRecord,
    ModelVersionRecord,
    NewVersion,
    Page,
    Registered,
)
from services.registry.search import SearchQuery

__all__ = ["RegistryStore"]


class RegistryStore(Protocol):
    """Model versions, aliases and alias history, kept transactionally."""

    def create_version(self, new: NewVersion) -> Registered:
        """Store `new` under the next version number of its model and point its aliases at it.

        Concurrent calls for one model get distinct, increasing numbers. Numbers
        are never reused, even after their version was deleted.
        """
        ...

    def get_version(self, name: str, version: int) -> ModelVersionRecord:
        """Version `version` of model `name`."""
        ...

    def resolve_alias(self, name: str, alias: str) -> ModelVersionRecord:
        """The version `alias` of model `name` points at now."""
        ...

    def list_models(
        self, name_prefix: str, page_size: int, page_token: str
    ) -> Page[ModelSummaryRecord]:
        """Models whose names start with `name_prefix`, alphabetically (byte order)."""
        ...

    def search_versions(
        self, query: SearchQuery, page_size: int, page_token: str
    ) -> Page[ModelVersionRecord]:
        """Versions that match `query`, in its order, with the number that match."""
        ...

    def set_alias(
        self,
        name: str,
        alias: str,
        version: int,
        *,
        expected_version: int | None = None,
        actor: str = "",
        reason: str = "",
    ) -> AliasChange:
        """Point `alias` at `version` (which must exist), creating the alias if needed.

        With `expected_version`, only if the alias points at that version now (0:
        only if it does not exist); `FailedPreconditionError` otherwise.
        """
        ...

    def delete_alias(
        self, name: str, alias: str, *, actor: str = "", reason: str = ""
    ) -> AliasEntry:
        """Remove `alias`; the history entry that records it."""
        ...

    def rollback_alias(
        self, name: str, alias: str, *, actor: str = "", reason: str = ""
    ) -> AliasChange:
        """Point `alias` back at the version it pointed at before its latest change.

        `FailedPreconditionError` when there is no such version or it was deleted.
        """
        ...

    def alias_history(
        self, name: str, alias: str, page_size: int, page_token: str
    ) -> Page[AliasEntry]:
        """Alias changes of model `name` (only of `alias` when set), newest first."""
        ...

    def aliases_at(self, name: str, at_us: int) -> dict[str, int]:
        """Alias -> version of model `name` as they stood at `at_us` (inclusive)."""
        ...

    def delete_version(
        self, name: str, version: int, *, force: bool = False, actor: str = "", reason: str = ""
    ) -> DeletedVersion:
        """Delete a version. `FailedPreconditionError` while an alias points at it, unless
        `force`, which deletes those aliases (recorded in the history) first.
        """
        ...

    def digests(self) -> set[str]:
        """The content digests of every file of every stored version."""
        ...

    def close(self) -> None:
        """Release the database connections; the store is unusable afterwards."""
        ...
