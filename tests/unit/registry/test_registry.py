"""`ModelRegistry` in process: uploads checked and stored, events announced, files kept
consistent with the metadata. Real stores (SQLite, files); the event sink records.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from common.errors import FailedPreconditionError, IntegrityError, InvalidArgumentError
from services.registry import (
    Chunk,
    FileArtifactStore,
    ModelRegistry,
    SqlRegistryStore,
)
from services.registry.convert import VersionRef
from tests.unit.registry.builders import artifact_files, new_version


class RecordingSink:
    """Keeps what the registry publishes and reports."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.errors: list[str] = []

    async def publish_event(self, subject: str, payload: Mapping[str, Any]) -> None:
        self.events.append((subject, dict(payload)))

    def report_error(self, message: str, **_: Any) -> None:
        self.errors.append(message)


@pytest.fixture
def sink() -> RecordingSink:
    return RecordingSink()


@pytest.fixture
def artifacts(tmp_path: Path) -> FileArtifactStore:
    return FileArtifactStore(tmp_path / "artifacts")


@pytest.fixture
def registry(
    sqlite_store: SqlRegistryStore, artifacts: FileArtifactStore, sink: RecordingSink
) -> Iterator[ModelRegistry]:
    yield ModelRegistry(sqlite_store, artifacts, sink)


async def chunks_of(files: Mapping[str, bytes], size: int = 700) -> AsyncIterator[Chunk]:
    for name, data in files.items():
        for offset in range(0, len(data), size):
            yield Chunk(name, offset, data[offset : offset + size])


def blobs(artifacts: FileArtifactStore) -> set[str]:
    return {
        p.name for p in artifacts.root.glob("??/*") if p.is_file() and p.parent.name != ".incoming"
    }


async def test_a_registration_stores_files_and_metadata_and_announces_it(
    registry: ModelRegistry, artifacts: FileArtifactStore, sink: RecordingSink
) -> None:
    files = artifact_files("one")
    new = new_version(
        "mlp", files=files, metrics={"acc": 0.9}, aliases=("canary",), actor="trainer"
    )
    record = await registry.register(new, chunks_of(files))
    assert (record.name, record.version, record.aliases) == ("mlp", 1, ("canary",))
    assert blobs(artifacts) == {f.sha256 for f in new.files}
    subjects = [s for s, _ in sink.events]
    assert subjects == ["events.model.mlp.registered", "events.model.mlp.promoted"]
    registered = sink.events[0][1]
    assert registered["version"] == 1 and registered["metrics"] == {"acc": 0.9}
    assert registered["actor"] == "trainer" and registered["id"] and registered["timestamp"]
    promoted = sink.events[1][1]
    assert (promoted["alias"], promoted["from_version"], promoted["to_version"]) == ("canary", 0, 1)


async def test_a_file_with_another_sha256_stores_nothing(
    registry: ModelRegistry, artifacts: FileArtifactStore, sink: RecordingSink
) -> None:
    files = artifact_files("x")
    tampered = {**files, "model.pt2": files["model.pt2"][:-1] + b"?"}
    with pytest.raises(IntegrityError, match=r"'model\.pt2' arrived with sha256"):
        await registry.register(new_version("mlp", files=files), chunks_of(tampered))
    assert blobs(artifacts) == set()
    assert list((artifacts.root / ".incoming").iterdir()) == []
    assert sink.events == []
    with pytest.raises(Exception, match="no model"):
        await registry.get(VersionRef("mlp", version=1))


async def test_an_upload_that_stops_early_stores_nothing(
    registry: ModelRegistry, artifacts: FileArtifactStore
) -> None:
    files = artifact_files("x")

    async def only_the_model() -> AsyncIterator[Chunk]:
        yield Chunk("model.pt2", 0, files["model.pt2"])

    with pytest.raises(IntegrityError, match=r"manifest\.json"):
        await registry.register(new_version("mlp", files=files), only_the_model())
    assert blobs(artifacts) == set()
    assert list((artifacts.root / ".incoming").iterdir()) == []


async def test_a_chunk_out_of_order_is_invalid_and_leaves_no_temporary_files(
    registry: ModelRegistry, artifacts: FileArtifactStore
) -> None:
    files = artifact_files("x")

    async def skipping() -> AsyncIterator[Chunk]:
        yield Chunk("model.pt2", 0, files["model.pt2"][:10])
        yield Chunk("model.pt2", 20, files["model.pt2"][20:30])

    with pytest.raises(InvalidArgumentError) as err:
        await registry.register(new_version("mlp", files=files), skipping())
    assert err.value.field == "chunk.chunk.offset"
    assert list((artifacts.root / ".incoming").iterdir()) == []


async def test_identical_files_are_stored_once_and_removed_with_their_last_version(
    registry: ModelRegistry, artifacts: FileArtifactStore
) -> None:
    files = artifact_files("shared")
    for _ in range(2):
        await registry.register(new_version("mlp", files=files), chunks_of(files))
    assert len(blobs(artifacts)) == 2
    await registry.delete_version("mlp", 1)
    assert len(blobs(artifacts)) == 2
    await registry.delete_version("mlp", 2)
    assert blobs(artifacts) == set()


async def test_a_download_is_verified_and_streams_from_the_offset(
    registry: ModelRegistry,
) -> None:
    files = {**artifact_files("d"), "model.pt2": os.urandom(10_000)}
    await registry.register(
        new_version("mlp", files=files, aliases=("production",)), chunks_of(files)
    )
    download = await registry.download(
        VersionRef("mlp", alias="production"), "model.pt2", offset=1000, chunk_size=4096
    )
    pieces = [piece async for piece in download.chunks()]
    assert [offset for offset, _ in pieces] == [1000, 5096, 9192]
    assert b"".join(data for _, data in pieces) == files["model.pt2"][1000:]


async def test_a_damaged_artifact_is_refused_and_reported(
    registry: ModelRegistry, artifacts: FileArtifactStore, sink: RecordingSink
) -> None:
    files = artifact_files("d")
    record = await registry.register(new_version("mlp", files=files), chunks_of(files))
    digest = record.files[0].sha256
    path = artifacts.path(digest)
    os.chmod(path, 0o644)
    path.write_bytes(b"x" + path.read_bytes()[1:])
    with pytest.raises(IntegrityError, match="damaged"):
        await registry.download(VersionRef("mlp", version=1), "model.pt2")
    assert len(sink.errors) == 1 and "model.pt2" in sink.errors[0]


async def test_alias_changes_announce_promoted_and_rolled_back(
    registry: ModelRegistry, sink: RecordingSink
) -> None:
    files = artifact_files("a")
    for _ in range(2):
        await registry.register(new_version("mlp", files=files), chunks_of(files))
    sink.events.clear()
    await registry.set_alias("mlp", "production", 1, actor="cli:alice")
    await registry.set_alias("mlp", "production", 1)  # no change, no event
    await registry.set_alias("mlp", "production", 2, reason="better")
    await registry.rollback("mlp", "production", actor="router", reason="errors")
    await registry.delete_alias("mlp", "production")
    assert [(s, p["from_version"], p["to_version"]) for s, p in sink.events] == [
        ("events.model.mlp.promoted", 0, 1),
        ("events.model.mlp.promoted", 1, 2),
        ("events.model.mlp.rolled_back", 2, 1),
    ]
    assert sink.events[2][1]["actor"] == "router"


async def test_a_failed_registration_removes_only_its_own_new_files(
    registry: ModelRegistry, artifacts: FileArtifactStore
) -> None:
    files = artifact_files("p")
    await registry.register(new_version("mlp", files=files), chunks_of(files))
    before = blobs(artifacts)
    other = {**files, "model.pt2": b"a different model"}
    # parent version 5 does not exist: the store refuses after the files were committed
    with pytest.raises(InvalidArgumentError):
        await registry.register(new_version("mlp", files=other, parent=5), chunks_of(other))
    assert blobs(artifacts) == before


async def test_sweep_at_start_removes_files_no_version_refers_to(
    registry: ModelRegistry, artifacts: FileArtifactStore
) -> None:
    files = artifact_files("s")
    await registry.register(new_version("mlp", files=files), chunks_of(files))
    orphan = artifacts.begin()
    orphan.write(b"left by a crash between file and metadata commit")
    artifacts.commit(orphan)
    artifacts.begin().write(b"interrupted upload")
    assert registry.sweep() == 2
    assert len(blobs(artifacts)) == 2


async def test_deleting_an_aliased_version_keeps_its_files(
    registry: ModelRegistry, artifacts: FileArtifactStore
) -> None:
    files = artifact_files("k")
    await registry.register(
        new_version("mlp", files=files, aliases=("production",)), chunks_of(files)
    )
    with pytest.raises(FailedPreconditionError):
        await registry.delete_version("mlp", 1)
    assert len(blobs(artifacts)) == 2


async def test_a_slow_disk_holds_the_upload_back_without_reordering_it(
    sqlite_store: SqlRegistryStore, artifacts: FileArtifactStore, sink: RecordingSink
) -> None:
    small_buffer = ModelRegistry(sqlite_store, artifacts, sink, upload_buffer_bytes=4096)
    files = {**artifact_files("q"), "model.pt2": os.urandom(300_000)}
    record = await small_buffer.register(new_version("mlp", files=files), chunks_of(files, 1000))
    download = await small_buffer.download(VersionRef("mlp", version=record.version), "model.pt2")
    assert b"".join([data async for _, data in download.chunks()]) == files["model.pt2"]
