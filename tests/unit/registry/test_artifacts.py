"""`FileArtifactStore`: content-addressed, atomic, verified before it is handed out."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from common.errors import IntegrityError
from services.registry import FileArtifactStore


def put(store: FileArtifactStore, data: bytes, pieces: int = 3) -> str:
    writer = store.begin()
    step = max(1, len(data) // pieces)
    for i in range(0, len(data), step):
        writer.write(data[i : i + step])
    return store.commit(writer)


def damage(path: Path, data: bytes) -> None:
    os.chmod(path, 0o644)
    path.write_bytes(data)


def test_a_committed_file_lives_under_its_digest_read_only(tmp_path: Path) -> None:
    store = FileArtifactStore(tmp_path / "artifacts")
    data = os.urandom(5000)
    digest = put(store, data)
    assert digest == hashlib.sha256(data).hexdigest()
    path = tmp_path / "artifacts" / digest[:2] / digest
    assert path.read_bytes() == data
    assert not os.access(path, os.W_OK) or os.geteuid() == 0
    assert path.stat().st_mode & 0o222 == 0
    assert list((tmp_path / "artifacts" / ".incoming").iterdir()) == []


def test_open_verified_hands_out_the_file_from_its_start(tmp_path: Path) -> None:
    store = FileArtifactStore(tmp_path)
    data = b"weights" * 1000
    digest = put(store, data)
    with store.open_verified(digest, len(data)) as handle:
        assert handle.read() == data


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda data: data[:-1],  # truncated
        lambda data: data[:10] + bytes([data[10] ^ 1]) + data[11:],  # one bit flipped
        lambda data: data + b"\0",  # grown
    ],
    ids=["truncated", "bit-flip", "grown"],
)
def test_a_damaged_file_is_refused(tmp_path: Path, corrupt: object) -> None:
    store = FileArtifactStore(tmp_path)
    data = os.urandom(3000)
    digest = put(store, data)
    damage(store.path(digest), corrupt(data))  # type: ignore[operator]
    with pytest.raises(IntegrityError, match="damaged"):
        store.open_verified(digest, len(data))


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    store = FileArtifactStore(tmp_path)
    digest = put(store, b"abc")
    store.path(digest).unlink()
    with pytest.raises(IntegrityError, match="missing"):
        store.open_verified(digest, 3)


def test_committing_the_same_content_again_heals_a_damaged_copy(tmp_path: Path) -> None:
    store = FileArtifactStore(tmp_path)
    data = b"model" * 100
    digest = put(store, data)
    damage(store.path(digest), b"garbage")
    assert put(store, data) == digest
    with store.open_verified(digest, len(data)) as handle:
        assert handle.read() == data


def test_an_aborted_upload_leaves_nothing(tmp_path: Path) -> None:
    store = FileArtifactStore(tmp_path)
    writer = store.begin()
    writer.write(b"partial")
    writer.abort()
    writer.abort()  # idempotent
    assert list((tmp_path / ".incoming").iterdir()) == []
    assert [p for p in tmp_path.iterdir() if p.name != ".incoming"] == []


def test_sweep_removes_interrupted_uploads_and_unreferenced_files(tmp_path: Path) -> None:
    store = FileArtifactStore(tmp_path)
    kept, dropped = put(store, b"kept"), put(store, b"dropped")
    store.begin().write(b"interrupted")  # never committed nor aborted: a crash
    assert store.sweep({kept}) == 2
    assert store.path(kept).exists() and not store.path(dropped).exists()
    assert list((tmp_path / ".incoming").iterdir()) == []


def test_remove_is_quiet_for_a_file_that_is_gone(tmp_path: Path) -> None:
    store = FileArtifactStore(tmp_path)
    digest = put(store, b"x")
    store.remove(digest)
    store.remove(digest)
    assert not store.path(digest).exists()


def test_a_large_upload_flushed_while_written_is_stored_whole(tmp_path: Path) -> None:
    store = FileArtifactStore(tmp_path)
    data = os.urandom(20 * 1024 * 1024)  # past several background flushes
    digest = put(store, data, pieces=40)
    assert digest == hashlib.sha256(data).hexdigest()
    with store.open_verified(digest, len(data)) as handle:
        assert handle.read() == data


def test_small_and_large_writes_are_hashed_in_their_order(tmp_path: Path) -> None:
    # Large writes are hashed on another thread while they are written, small ones inline.
    store = FileArtifactStore(tmp_path)
    pieces = [os.urandom(size) for size in (10, 300_000, 5, 65_536, 65_535, 1 << 20, 1)]
    writer = store.begin()
    for piece in pieces:
        writer.write(memoryview(piece))
    data = b"".join(pieces)
    assert writer.size == len(data)
    digest = store.commit(writer)
    assert digest == hashlib.sha256(data).hexdigest()
    with store.open_verified(digest, len(data)) as handle:
        assert handle.read() == data


def test_an_upload_aborted_while_flushing_leaves_nothing(tmp_path: Path) -> None:
    store = FileArtifactStore(tmp_path)
    writer = store.begin()
    for _ in range(9):
        writer.write(memoryview(os.urandom(1024 * 1024)))
    writer.abort()
    assert list((tmp_path / ".incoming").iterdir()) == []


def test_commit_all_stores_every_file_under_its_digest(tmp_path: Path) -> None:
    store = FileArtifactStore(tmp_path)
    contents = [b"model" * 1000, b'{"manifest": 1}', b"model" * 1000]
    writers = [store.begin() for _ in contents]
    for writer, data in zip(writers, contents, strict=True):
        writer.write(data)
    digests = store.commit_all(writers)
    assert digests == [hashlib.sha256(d).hexdigest() for d in contents]
    for digest, data in zip(digests, contents, strict=True):
        assert store.path(digest).read_bytes() == data
    assert list((tmp_path / ".incoming").iterdir()) == []
    with pytest.raises(ValueError, match="each once"):
        store.commit(writers[0])
