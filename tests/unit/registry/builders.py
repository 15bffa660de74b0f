"""Small versions and uploads for registry tests."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from services.registry import FileRecord, Lineage, NewVersion


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def artifact_files(seed: str = "") -> dict[str, bytes]:
    """The two files every version needs, with content that depends on `seed`."""
    return {
        "model.pt2": f"model bytes {seed}".encode() * 50,
        "manifest.json": f'{{"seed": "{seed}"}}'.encode(),
    }


def file_records(files: Mapping[str, bytes]) -> tuple[FileRecord, ...]:
    return tuple(FileRecord(name, sha(data), len(data)) for name, data in files.items())


def new_version(
    name: str,
    *,
    metrics: Mapping[str, float] | None = None,
    tags: Mapping[str, str] | None = None,
    aliases: tuple[str, ...] = (),
    parent: int = 0,
    files: Mapping[str, bytes] | None = None,
    actor: str = "test",
) -> NewVersion:
    return NewVersion(
        name=name,
        files=file_records(files if files is not None else artifact_files(name)),
        metrics=dict(metrics or {}),
        tags=dict(tags or {}),
        lineage=Lineage(job_id="job-1", kernel_ids=("ab" * 32,), parent_version=parent),
        aliases=aliases,
        actor=actor,
    )
