"""What the registry stores and returns, as plain frozen values (no I/O, no protobuf).

Times are integer microseconds since the Unix epoch. The input signature and the
reference statistics travel as serialized protobuf bytes: the registry keeps
them for its callers and never looks inside after validation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Generic, TypeVar

__all__ = [
    "AliasAction",
    "AliasChange",
    "AliasEntry",
    "DeletedVersion",
    "FileRecord",
    "Lineage",
    "ModelSummaryRecord",
    "ModelVersionRecord",
    "NewVersion",
    "Page",
    "Registered",
]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class FileRecord:
    """One artifact file of a version: its plain name, content digest and size."""

    name: str
    sha256: str
    size_bytes: int


@dataclass(frozen=True, slots=True)
class Lineage:
    """Where a version came from; `parent_version` is 0 when it has none."""

    job_id: str = ""
    kernel_ids: tuple[str, ...] = ()
    parent_version: int = 0


@dataclass(frozen=True, slots=True)
class NewVersion:
    """A version to register (already validated), before it has a number."""

    name: str
    files: tuple[FileRecord, ...]
    description: str = ""
    metrics: Mapping[str, float] = field(default_factory=dict)
    tags: Mapping[str, str] = field(default_factory=dict)
    lineage: Lineage = field(default_factory=Lineage)
    input_signature: bytes = b""
    reference_statistics: bytes = b""
    # Aliases to point at the new version in the same transaction.
    aliases: tuple[str, ...] = ()
    actor: str = ""


@dataclass(frozen=True, slots=True)
class ModelVersionRecord:
    """A stored version; `aliases` are those pointing at it now, sorted."""

    name: str
    version: int
    description: str
    metrics: Mapping[str, float]
    tags: Mapping[str, str]
    lineage: Lineage
    input_signature: bytes
    reference_statistics: bytes
    files: tuple[FileRecord, ...]
    aliases: tuple[str, ...]
    created_us: int
    created_by: str = ""

    def file(self, name: str) -> FileRecord | None:
        """The version's file called `name`, if it has one."""
        return next((f for f in self.files if f.name == name), None)


@dataclass(frozen=True, slots=True)
class ModelSummaryRecord:
    """A model name with its newest version, version count and current aliases.

    `latest_version` is the highest version that exists now (0 when every version
    was deleted).
    """

    name: str
    latest_version: int
    version_count: int
    aliases: Mapping[str, int]
    created_us: int
    updated_us: int


class AliasAction(StrEnum):
    """What an alias history entry did."""

    SET = "set"
    DELETE = "delete"
    ROLLBACK = "rollback"


@dataclass(frozen=True, slots=True)
class AliasEntry:
    """One alias change. `from_version` 0: the alias did not exist; `to_version` 0: deleted.

    `seq` orders changes (it increases with every change in the store), also
    between changes made within the same microsecond.
    """

    model_name: str
    alias: str
    from_version: int
    to_version: int
    action: AliasAction
    actor: str
    reason: str
    at_us: int
    seq: int


@dataclass(frozen=True, slots=True)
class AliasChange:
    """The outcome of setting or rolling back an alias.

    `changed` is False when the alias already pointed at the version: nothing was
    recorded and `entry` is the change that made it so.
    """

    version: ModelVersionRecord
    entry: AliasEntry
    changed: bool = True


@dataclass(frozen=True, slots=True)
class Registered:
    """A newly stored version and the alias changes made with it."""

    version: ModelVersionRecord
    entries: tuple[AliasEntry, ...]


@dataclass(frozen=True, slots=True)
class DeletedVersion:
    """A deleted version: the aliases removed with it (forced) and the digests now unused."""

    name: str
    version: int
    entries: tuple[AliasEntry, ...]
    # Content digests no stored version refers to any more: their files can go.
    released_digests: frozenset[str]


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a listing; `next_page_token` is empty on the last page."""

    items: Sequence[T]
    next_page_token: str = ""
    total_size: int | None = None
