"""The kernel store on real files and SQLite: integrity, eviction, restarts, single flight.

The store does not look inside artifacts, so these tests store small byte strings.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from common.errors import InvalidArgumentError, ResourceExhaustedError
from services.compiler.kernel_store import CompiledArtifact, FileKernelStore, StoredKernel

DEADLINE_S = 10.0


def kid(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def artifact(name: str, size: int = 1000) -> CompiledArtifact:
    body = (name.encode() * (size // max(1, len(name)) + 1))[:size]
    return CompiledArtifact(body, {"name": name})


@pytest.fixture
def store(tmp_path: Path) -> Iterator[FileKernelStore]:
    opened = FileKernelStore(tmp_path / "kernels", max_bytes=1 << 20)
    try:
        yield opened
    finally:
        opened.close()


class CountingCompile:
    """A compile function that records its calls and can be held until released."""

    def __init__(self, result: CompiledArtifact, *, hold: bool = False) -> None:
        self.result = result
        self.calls = 0
        self.entered = threading.Event()
        self.release = threading.Event()
        if not hold:
            self.release.set()

    def __call__(self) -> CompiledArtifact:
        self.calls += 1
        self.entered.set()
        if not self.release.wait(DEADLINE_S):
            raise TimeoutError("the test never released the compile")
        return self.result


async def wait_until(condition: Callable[[], bool], what: Callable[[], object]) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out; saw {what()!r}")
        await asyncio.sleep(0.001)


def artifact_path(store: FileKernelStore, kernel_id: str) -> Path:
    return store.root / kernel_id[:2] / f"{kernel_id}.pt2"


def test_put_then_get_returns_the_bytes_and_metadata(store: FileKernelStore) -> None:
    stored = store.put(kid("a"), artifact("a"))
    found = store.get(kid("a"))
    assert found is not None
    assert found.artifact == artifact("a").artifact
    assert found.sha256 == hashlib.sha256(found.artifact).hexdigest() == stored.sha256
    assert found.metadata == {"name": "a"}
    assert (store.root / kid("a")[:2] / f"{kid('a')}.json").is_file()
    stats = store.stats()
    assert (stats.hits, stats.misses, stats.kernels, stats.bytes) == (1, 0, 1, 1000)


def test_unknown_kernel_is_a_miss(store: FileKernelStore) -> None:
    assert store.get(kid("nothing")) is None
    assert store.stats().misses == 1


def test_malformed_kernel_id_is_invalid_argument(store: FileKernelStore) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        store.get("../../etc/passwd")
    assert caught.value.field == "kernel_id"


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
async def test_damaged_file_is_detected_removed_and_compiled_again(
    store: FileKernelStore, damage: str
) -> None:
    good = artifact("k")
    store.put(kid("k"), good)
    path = artifact_path(store, kid("k"))
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    elif damage == "truncate":
        del data[len(data) // 2 :]
    else:
        data.clear()
    path.write_bytes(bytes(data))

    compile_fn = CountingCompile(good)
    found, hit = await store.get_or_compile(kid("k"), compile_fn)

    assert not hit
    assert compile_fn.calls == 1
    assert found.artifact == good.artifact
    assert store.stats().corrupt_detected == 1
    assert path.read_bytes() == good.artifact  # rewritten from the new compile


def test_damaged_file_is_never_returned(store: FileKernelStore) -> None:
    store.put(kid("k"), artifact("k"))
    path = artifact_path(store, kid("k"))
    path.write_bytes(path.read_bytes()[:-1])
    assert store.get(kid("k")) is None
    assert not path.exists()
    assert store.entries() == []


def test_damaged_metadata_is_detected(store: FileKernelStore) -> None:
    store.put(kid("k"), artifact("k"))
    (store.root / kid("k")[:2] / f"{kid('k')}.json").write_text("{not json")
    assert store.get(kid("k")) is None
    assert store.stats().corrupt_detected == 1


def footprint(tmp_path: Path) -> int:
    """Bytes one `artifact(...)` takes in a store: the artifact and its metadata file."""
    scratch = FileKernelStore(tmp_path / "scratch", max_bytes=1 << 20)
    try:
        scratch.put(kid("z"), artifact("z"))
        return 1000 + (scratch.root / kid("z")[:2] / f"{kid('z')}.json").stat().st_size
    finally:
        scratch.close()


def test_least_recently_used_kernels_are_evicted_past_max_bytes(tmp_path: Path) -> None:
    # Room for three kernels and a half (metadata sizes vary by a few bytes).
    store = FileKernelStore(tmp_path / "kernels", max_bytes=footprint(tmp_path) * 7 // 2)
    try:
        for name in ("a", "b", "c"):
            store.put(kid(name), artifact(name))
        assert store.get(kid("a")) is not None  # a is now more recent than b
        store.put(kid("d"), artifact("d"))
        kept = {entry.kernel_id for entry in store.entries()}
        assert kept == {kid("a"), kid("c"), kid("d")}
        assert not artifact_path(store, kid("b")).exists()
        stats = store.stats()
        assert stats.evictions == 1
        assert stats.bytes == 3000
    finally:
        store.close()


def test_kernel_larger_than_the_store_is_refused(tmp_path: Path) -> None:
    store = FileKernelStore(tmp_path, max_bytes=500)
    try:
        with pytest.raises(ResourceExhaustedError, match="max_bytes"):
            store.put(kid("big"), artifact("big", size=1000))
        assert store.entries() == []
    finally:
        store.close()


def test_entries_survive_a_restart_with_their_hits(tmp_path: Path) -> None:
    first = FileKernelStore(tmp_path, max_bytes=1 << 20)
    first.put(kid("a"), artifact("a"))
    first.get(kid("a"))
    first.get(kid("a"))
    first.close()

    second = FileKernelStore(tmp_path, max_bytes=1 << 20)
    try:
        (entry,) = second.entries()
        assert entry.kernel_id == kid("a") and entry.hits == 2 and entry.size == 1000
        found = second.get(kid("a"))
        assert found is not None and found.artifact == artifact("a").artifact
    finally:
        second.close()


@pytest.mark.parametrize("index_damage", ["missing", "garbage"])
def test_lost_or_corrupt_index_is_rebuilt_from_the_files(tmp_path: Path, index_damage: str) -> None:
    first = FileKernelStore(tmp_path, max_bytes=1 << 20)
    for name in ("a", "b"):
        first.put(kid(name), artifact(name))
    first.close()
    index = tmp_path / "index.sqlite3"
    for suffix in ("-wal", "-shm"):
        Path(f"{index}{suffix}").unlink(missing_ok=True)
    if index_damage == "missing":
        index.unlink()
    else:
        index.write_bytes(b"this is not an sqlite database" * 100)

    second = FileKernelStore(tmp_path, max_bytes=1 << 20)
    try:
        assert {e.kernel_id for e in second.entries()} == {kid("a"), kid("b")}
        found = second.get(kid("b"))
        assert found is not None and found.metadata == {"name": "b"}
    finally:
        second.close()


def test_reopening_drops_vanished_files_and_leftovers_of_interrupted_writes(tmp_path: Path) -> None:
    first = FileKernelStore(tmp_path, max_bytes=1 << 20)
    for name in ("a", "b"):
        first.put(kid(name), artifact(name))
    first.close()
    artifact_path(first, kid("a")).unlink()  # removed by hand
    shard = tmp_path / kid("c")[:2]
    shard.mkdir(exist_ok=True)
    (shard / f"{kid('c')}.pt2").write_bytes(b"written, but its metadata never was")
    (shard / ".tmp-abc.pt2").write_bytes(b"half a write")

    second = FileKernelStore(tmp_path, max_bytes=1 << 20)
    try:
        assert [e.kernel_id for e in second.entries()] == [kid("b")]
        assert not (shard / f"{kid('c')}.pt2").exists()
        assert not (shard / ".tmp-abc.pt2").exists()
        assert not (tmp_path / kid("a")[:2] / f"{kid('a')}.json").exists()
    finally:
        second.close()


def test_reopening_with_a_smaller_bound_evicts(tmp_path: Path) -> None:
    first = FileKernelStore(tmp_path, max_bytes=1 << 20)
    for name in ("a", "b", "c"):
        first.put(kid(name), artifact(name))
    first.close()
    second = FileKernelStore(tmp_path, max_bytes=footprint(tmp_path / "other") * 5 // 2)
    try:
        assert [e.kernel_id for e in second.entries()] == [kid("c"), kid("b")]
    finally:
        second.close()


async def test_cache_hit_does_not_compile(store: FileKernelStore) -> None:
    store.put(kid("a"), artifact("a"))
    compile_fn = CountingCompile(artifact("a"))
    found, hit = await store.get_or_compile(kid("a"), compile_fn)
    assert hit and compile_fn.calls == 0
    assert found.artifact == artifact("a").artifact


async def test_concurrent_requests_for_one_kernel_compile_once(store: FileKernelStore) -> None:
    callers = 8
    compile_fn = CountingCompile(artifact("shared"), hold=True)
    tasks = [
        asyncio.create_task(store.get_or_compile(kid("shared"), compile_fn)) for _ in range(callers)
    ]
    # While the compile is held in its thread the loop keeps running the other callers.
    await wait_until(compile_fn.entered.is_set, lambda: compile_fn.calls)
    await wait_until(lambda: store.stats().coalesced == callers - 1, store.stats)
    compile_fn.release.set()
    results: list[tuple[StoredKernel, bool]] = await asyncio.gather(*tasks)

    assert compile_fn.calls == 1
    assert store.stats().compiles == 1
    assert {stored.sha256 for stored, _ in results} == {results[0][0].sha256}
    assert not any(hit for _, hit in results)
    _, hit = await store.get_or_compile(kid("shared"), compile_fn)
    assert hit and compile_fn.calls == 1


async def test_a_cancelled_caller_does_not_cancel_the_shared_compile(
    store: FileKernelStore,
) -> None:
    compile_fn = CountingCompile(artifact("x"), hold=True)
    first = asyncio.create_task(store.get_or_compile(kid("x"), compile_fn))
    second = asyncio.create_task(store.get_or_compile(kid("x"), compile_fn))
    await wait_until(compile_fn.entered.is_set, lambda: compile_fn.calls)
    first.cancel()
    compile_fn.release.set()
    stored, _ = await second
    assert stored.artifact == artifact("x").artifact
    assert first.cancelled()
    assert compile_fn.calls == 1


async def test_a_failed_compile_reaches_every_caller_and_is_not_remembered(
    store: FileKernelStore,
) -> None:
    release = threading.Event()

    def failing() -> CompiledArtifact:
        if not release.wait(DEADLINE_S):
            raise TimeoutError("never released")
        raise RuntimeError("export failed")

    tasks = [asyncio.create_task(store.get_or_compile(kid("bad"), failing)) for _ in range(3)]
    await wait_until(lambda: store.stats().coalesced == 2, store.stats)
    release.set()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(o, RuntimeError) for o in outcomes), outcomes
    assert store.entries() == []

    compile_fn = CountingCompile(artifact("bad"))
    _, hit = await store.get_or_compile(kid("bad"), compile_fn)
    assert not hit and compile_fn.calls == 1
