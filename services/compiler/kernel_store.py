"""Content-addressed, size-bounded, crash-safe store of compiled kernels.

Layout under `root`:

    <root>/<id[:2]>/<id>.pt2     the kernel archive
    <root>/<id[:2]>/<id>.json    {"kernel_id", "sha256", "size", "created", "metadata"}
    <root>/index.sqlite3         size, created, last access and hits of each kernel (WAL)

Every file is written atomically (temporary file in the same folder, fsync,
`os.replace`, fsync of the folder). Every read checks the artifact's sha256: a
corrupted or truncated file is removed and reported as a miss (the caller
compiles again), never returned. Opening a root reconciles the index with the
files (after a crash, a lost or corrupt index, files removed by hand), so the
store survives restarts. Past `max_bytes` the least recently used kernels are
evicted.

The synchronous methods are thread-safe; `get_or_compile` runs file work and the
compile function in worker threads so the event loop stays responsive, and
compiles each kernel id once however many callers ask for it at the same time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from common.errors import InvalidArgumentError, ResourceExhaustedError
from common.kernels import sha256_hex
from common.logging import get_logger

__all__ = [
    "CompiledArtifact",
    "FileKernelStore",
    "KernelEntry",
    "KernelStore",
    "StoreStats",
    "StoredKernel",
]

_log = get_logger(__name__)

_KERNEL_ID = re.compile(r"[0-9a-f]{64}")
_INDEX_FILE = "index.sqlite3"
_TMP_PREFIX = ".tmp-"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS kernels (
    kernel_id   TEXT PRIMARY KEY,
    sha256      TEXT NOT NULL,
    size        INTEGER NOT NULL,   -- artifact bytes
    stored      INTEGER NOT NULL,   -- artifact + metadata bytes: what eviction counts
    created     REAL NOT NULL,
    last_access REAL NOT NULL,
    access_seq  INTEGER NOT NULL,   -- orders LRU exactly, whatever the clock does
    hits        INTEGER NOT NULL DEFAULT 0
)
"""


@dataclass(frozen=True)
class CompiledArtifact:
    """What a compile function hands the store: the archive bytes and their metadata."""

    artifact: bytes
    metadata: Mapping[str, Any]


@dataclass(frozen=True)
class StoredKernel:
    """A kernel read back from the store; `artifact` has been checked against `sha256`."""

    kernel_id: str
    artifact: bytes
    sha256: str
    size: int
    created: float
    metadata: Mapping[str, Any]


@dataclass(frozen=True)
class KernelEntry:
    """One kernel in the index (without its bytes)."""

    kernel_id: str
    sha256: str
    size: int
    created: float
    last_access: float
    hits: int


@dataclass
class StoreStats:
    """Counters since this store was opened; `bytes` and `kernels` are what it holds now."""

    hits: int = 0
    misses: int = 0
    compiles: int = 0
    evictions: int = 0
    corrupt_detected: int = 0
    coalesced: int = 0
    bytes: int = 0
    kernels: int = 0


class KernelStore(Protocol):
    """The whole surface the compiler needs from a kernel store."""

    def get(self, kernel_id: str) -> StoredKernel | None:
        """The verified kernel, or None (a corrupt one is removed and is also None)."""
        ...

    def put(self, kernel_id: str, compiled: CompiledArtifact) -> StoredKernel:
        """Store a kernel atomically (replacing any copy) and evict past the size bound."""
        ...

    async def get_or_compile(
        self, kernel_id: str, compile_fn: Callable[[], CompiledArtifact]
    ) -> tuple[StoredKernel, bool]:
        """The kernel and whether it was a cache hit; compiles (once) on a miss."""
        ...

    def entries(self) -> list[KernelEntry]:
        """Every stored kernel, most recently used first."""
        ...

    def stats(self) -> StoreStats:
        """A snapshot of the counters."""
        ...

    def close(self) -> None:
        """Release the index; the store is unusable afterwards."""
        ...


class FileKernelStore:
    """`KernelStore` on the local file system with an SQLite index; see the module doc."""

    def __init__(self, root: Path | str, *, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise InvalidArgumentError("must be positive", field="max_bytes")
        self._root = Path(root)
        self._max_bytes = max_bytes
        self._lock = threading.RLock()
        self._stats = StoreStats()
        self._flights: dict[str, asyncio.Task[tuple[StoredKernel, bool]]] = {}
        self._root.mkdir(parents=True, exist_ok=True)
        self._db = self._open_index()
        self._seq = self._db.execute("SELECT COALESCE(MAX(access_seq), 0) FROM kernels").fetchone()[
            0
        ]
        self._reconcile()
        with self._lock:
            self._evict(keep=None)

    @property
    def root(self) -> Path:
        """The folder the store lives in."""
        return self._root

    # --- reading and writing ------------------------------------------------------------------

    def get(self, kernel_id: str) -> StoredKernel | None:
        """The verified kernel, or None; see `KernelStore.get`."""
        _check_id(kernel_id)
        with self._lock:
            found = self._read(kernel_id)
            if found is None:
                self._stats.misses += 1
                return None
            self._touch(kernel_id, hit=True)
            self._stats.hits += 1
            return found

    def put(self, kernel_id: str, compiled: CompiledArtifact) -> StoredKernel:
        """Write the kernel and its metadata atomically, index it, evict past `max_bytes`.

        Raises `ResourceExhaustedError` when the kernel alone is larger than the
        store (it is then not stored).
        """
        _check_id(kernel_id)
        artifact = compiled.artifact
        created = time.time()
        sha = sha256_hex(artifact)
        document = {
            "kernel_id": kernel_id,
            "sha256": sha,
            "size": len(artifact),
            "created": created,
            "metadata": dict(compiled.metadata),
        }
        meta_bytes = json.dumps(document, sort_keys=True, indent=1).encode()
        stored = len(artifact) + len(meta_bytes)
        if stored > self._max_bytes:
            raise ResourceExhaustedError(
                f"kernel {kernel_id[:12]} needs {stored} bytes, more than the store's "
                f"max_bytes of {self._max_bytes}"
            )
        with self._lock:
            shard = self._root / kernel_id[:2]
            if not shard.is_dir():
                shard.mkdir(exist_ok=True)
                _fsync_dir(self._root)
            # The artifact first: a metadata file never names bytes that are not there yet.
            _write_atomic(shard / f"{kernel_id}.pt2", artifact)
            _write_atomic(shard / f"{kernel_id}.json", meta_bytes)
            self._seq += 1
            self._db.execute(
                "INSERT OR REPLACE INTO kernels "
                "(kernel_id, sha256, size, stored, created, last_access, access_seq, hits) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, 0)",
                (kernel_id, sha, len(artifact), stored, created, created, self._seq),
            )
            self._db.commit()
            self._evict(keep=kernel_id)
        return StoredKernel(kernel_id, artifact, sha, len(artifact), created, compiled.metadata)

    async def get_or_compile(
        self, kernel_id: str, compile_fn: Callable[[], CompiledArtifact]
    ) -> tuple[StoredKernel, bool]:
        """The kernel and whether it came from the store without compiling.

        On a miss `compile_fn` runs in a worker thread and its result is stored.
        Concurrent calls for one id share a single lookup and compile (they all
        get its result, or its exception); a caller that is cancelled does not
        cancel the compile the others wait for.
        """
        _check_id(kernel_id)
        task = self._flights.get(kernel_id)
        if task is None:
            task = asyncio.create_task(self._fetch_or_compile(kernel_id, compile_fn))
            self._flights[kernel_id] = task
            task.add_done_callback(partial(self._land, kernel_id))
        else:
            with self._lock:
                self._stats.coalesced += 1
        return await asyncio.shield(task)

    def _land(self, kernel_id: str, task: asyncio.Task[tuple[StoredKernel, bool]]) -> None:
        if self._flights.get(kernel_id) is task:
            del self._flights[kernel_id]
        if not task.cancelled():
            task.exception()  # retrieved here so an error nobody awaited is not logged as lost

    async def _fetch_or_compile(
        self, kernel_id: str, compile_fn: Callable[[], CompiledArtifact]
    ) -> tuple[StoredKernel, bool]:
        found = await asyncio.to_thread(self.get, kernel_id)
        if found is not None:
            return found, True
        compiled = await asyncio.to_thread(compile_fn)
        with self._lock:
            self._stats.compiles += 1
        return await asyncio.to_thread(self.put, kernel_id, compiled), False

    # --- listing and stats --------------------------------------------------------------------

    def entries(self) -> list[KernelEntry]:
        """Every stored kernel, most recently used first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT kernel_id, sha256, size, created, last_access, hits FROM kernels "
                "ORDER BY access_seq DESC"
            ).fetchall()
        return [KernelEntry(*row) for row in rows]

    def stats(self) -> StoreStats:
        """A snapshot of the counters, with the bytes and kernels held now."""
        with self._lock:
            total, count = self._db.execute(
                "SELECT COALESCE(SUM(size), 0), COUNT(*) FROM kernels"
            ).fetchone()
            snapshot = StoreStats(**vars(self._stats))
        snapshot.bytes, snapshot.kernels = int(total), int(count)
        return snapshot

    def close(self) -> None:
        """Close the index."""
        with self._lock:
            self._db.close()

    # --- internals ----------------------------------------------------------------------------

    def _paths(self, kernel_id: str) -> tuple[Path, Path]:
        shard = self._root / kernel_id[:2]
        return shard / f"{kernel_id}.pt2", shard / f"{kernel_id}.json"

    def _read(self, kernel_id: str) -> StoredKernel | None:
        row = self._db.execute(
            "SELECT sha256, size, created FROM kernels WHERE kernel_id = ?", (kernel_id,)
        ).fetchone()
        if row is None:
            return None
        sha, size, created = row
        artifact_path, meta_path = self._paths(kernel_id)
        try:
            artifact = artifact_path.read_bytes()
            document = json.loads(meta_path.read_bytes())
        except FileNotFoundError:
            _log.warning("kernel file vanished; dropping it from the index", kernel_id=kernel_id)
            self._remove(kernel_id)
            return None
        except ValueError:
            return self._corrupt(kernel_id, "metadata is not valid JSON")
        actual = sha256_hex(artifact)
        if actual != sha or len(artifact) != size:
            return self._corrupt(
                kernel_id,
                f"sha256 {actual[:12]} ({len(artifact)} bytes), index says {sha[:12]} ({size})",
            )
        if not isinstance(document, dict) or document.get("sha256") != sha:
            return self._corrupt(kernel_id, "metadata does not match the artifact")
        return StoredKernel(kernel_id, artifact, sha, size, created, document.get("metadata", {}))

    def _corrupt(self, kernel_id: str, why: str) -> StoredKernel | None:
        """Remove a kernel that failed its checks; None, for the caller's miss."""
        _log.warning(
            "corrupt kernel removed; it will be compiled again", kernel_id=kernel_id, why=why
        )
        self._stats.corrupt_detected += 1
        self._remove(kernel_id)
        return None

    def _remove(self, kernel_id: str) -> None:
        for path in self._paths(kernel_id):
            path.unlink(missing_ok=True)
        self._db.execute("DELETE FROM kernels WHERE kernel_id = ?", (kernel_id,))
        self._db.commit()

    def _touch(self, kernel_id: str, *, hit: bool) -> None:
        self._seq += 1
        self._db.execute(
            "UPDATE kernels SET last_access = ?, access_seq = ?, hits = hits + ? "
            "WHERE kernel_id = ?",
            (time.time(), self._seq, 1 if hit else 0, kernel_id),
        )
        self._db.commit()

    def _evict(self, keep: str | None) -> None:
        total = self._db.execute("SELECT COALESCE(SUM(stored), 0) FROM kernels").fetchone()[0]
        if total <= self._max_bytes:
            return
        rows = self._db.execute(
            "SELECT kernel_id, stored FROM kernels ORDER BY access_seq ASC"
        ).fetchall()
        for kernel_id, stored in rows:
            if total <= self._max_bytes:
                break
            if kernel_id == keep:
                continue
            self._remove(kernel_id)
            total -= stored
            self._stats.evictions += 1
            _log.info("kernel evicted", kernel_id=kernel_id, bytes=stored)

    def _open_index(self) -> sqlite3.Connection:
        path = self._root / _INDEX_FILE
        try:
            return _connect(path)
        except sqlite3.DatabaseError as exc:
            # The index only caches what the files say; rebuild it from them.
            _log.warning("kernel index unreadable; rebuilding it", path=str(path), error=str(exc))
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
            return _connect(path)

    def _reconcile(self) -> None:
        """Make the index and the files agree: drop what is half-written or gone."""
        with self._lock:
            on_disk: dict[str, set[str]] = {}
            for shard in self._root.iterdir():
                if not shard.is_dir() or not re.fullmatch(r"[0-9a-f]{2}", shard.name):
                    continue
                for path in shard.iterdir():
                    if path.name.startswith(_TMP_PREFIX):
                        path.unlink(missing_ok=True)  # an interrupted write
                        continue
                    stem, suffix = path.stem, path.suffix
                    if (
                        _KERNEL_ID.fullmatch(stem)
                        and stem[:2] == shard.name
                        and suffix in (".pt2", ".json")
                    ):
                        on_disk.setdefault(stem, set()).add(suffix)
            indexed = {row[0] for row in self._db.execute("SELECT kernel_id FROM kernels")}
            for kernel_id in indexed - {k for k, s in on_disk.items() if s == {".pt2", ".json"}}:
                self._remove(kernel_id)
            for kernel_id, suffixes in on_disk.items():
                if suffixes != {".pt2", ".json"}:
                    self._remove(kernel_id)
                elif kernel_id not in indexed:
                    self._adopt(kernel_id)

    def _adopt(self, kernel_id: str) -> None:
        """Index a kernel found on disk from its metadata file; its bytes are checked on read."""
        artifact_path, meta_path = self._paths(kernel_id)
        try:
            document = json.loads(meta_path.read_bytes())
            sha, created = str(document["sha256"]), float(document["created"])
            size = artifact_path.stat().st_size
            stored = size + meta_path.stat().st_size
        except (OSError, ValueError, KeyError, TypeError):
            self._remove(kernel_id)
            return
        self._seq += 1
        self._db.execute(
            "INSERT OR REPLACE INTO kernels "
            "(kernel_id, sha256, size, stored, created, last_access, access_seq, hits) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, 0)",
            (kernel_id, sha, size, stored, created, created, self._seq),
        )
        self._db.commit()


def _check_id(kernel_id: str) -> None:
    if not _KERNEL_ID.fullmatch(kernel_id):
        raise InvalidArgumentError("must be 64 lowercase hex digits (a sha256)", field="kernel_id")


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, check_same_thread=False, isolation_level="DEFERRED")
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(_SCHEMA)
        db.execute("SELECT COUNT(*) FROM kernels").fetchone()
        db.commit()
    except sqlite3.DatabaseError:
        db.close()
        raise
    return db


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_TMP_PREFIX, suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
