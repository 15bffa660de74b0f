"""Where artifact bytes live: content-addressed files, written atomically, read verified.

Layout under `root` (by default `<run_dir>/registry/artifacts`):

    <root>/<sha[:2]>/<sha>     one file per distinct content, read-only
    <root>/.incoming/          uploads in progress (removed at start)

An upload is written to a temporary file in `.incoming/`, hashed as it
arrives and flushed to disk in the background every 4 MiB (then dropped from
the page cache); `commit` fsyncs it, renames it to its digest's path and
fsyncs the folder, so a file under its digest is always complete. Identical
content is stored once, whichever versions refer to it. `open_verified` checks
size and sha256 before handing out a file: a corrupt or missing artifact raises
`IntegrityError` (DATA_LOSS) and is never served.

`ArtifactStore` is the whole surface the registry uses; `FileArtifactStore` is
its one implementation. Its methods block (file I/O): call them from a worker
thread in async code.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, Protocol

from common.errors import IntegrityError, ResourceExhaustedError
from common.logging import get_logger
from services.registry.validation import is_digest

__all__ = ["ArtifactStore", "ArtifactWriter", "FileArtifactStore"]

_log = get_logger(__name__)

_INCOMING = ".incoming"
# Bytes of an upload written between two flushes to disk.
_SYNC_EVERY = 4 * 1024 * 1024
# Writes at least this large are hashed on another thread while they are written.
_HASH_APART = 64 * 1024
_SHARD = re.compile(r"[0-9a-f]{2}")


class ArtifactWriter(Protocol):
    """One file being received: its bytes so far, hashed as they come."""

    @property
    def size(self) -> int:
        """Bytes written so far."""
        ...

    def write(self, data: bytes | memoryview) -> None:
        """Append `data`."""
        ...

    def digest(self) -> str:
        """sha256 (hex) of the bytes written so far."""
        ...

    def abort(self) -> None:
        """Drop the file (idempotent; a no-op after it was committed)."""
        ...


class ArtifactStore(Protocol):
    """The whole surface the registry needs from artifact storage."""

    def begin(self) -> ArtifactWriter:
        """Start receiving a file."""
        ...

    def commit(self, writer: ArtifactWriter) -> str:
        """Make a received file durable under its digest (atomically); the digest."""
        ...

    def commit_all(self, writers: Sequence[ArtifactWriter]) -> list[str]:
        """`commit` each of `writers`, in one go; their digests, in order.

        On failure none of them is left in progress (each is committed or dropped).
        """
        ...

    def open_verified(self, digest: str, size: int) -> BinaryIO:
        """The stored file, positioned at 0, after checking its size and sha256.

        Raises `IntegrityError` when it is missing or does not match.
        """
        ...

    def remove(self, digest: str) -> None:
        """Delete the file stored under `digest` (no error when there is none)."""
        ...

    def sweep(self, keep: set[str]) -> int:
        """Delete interrupted uploads and every file whose digest is not in `keep`.

        Returns the number of files deleted.
        """
        ...


@contextlib.contextmanager
def _disk_space() -> Iterator[None]:
    """A full disk (or quota) is RESOURCE_EXHAUSTED, not a bug."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ResourceExhaustedError(f"no space left for artifacts: {exc}") from exc
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _flush(fd: int, upto: int) -> None:
    """Write the file's first `upto` bytes to disk, then drop them from the page cache.

    Artifacts are written once and read rarely (a download re-reads and checks
    the whole file anyway), so keeping their pages cached only grows the cache:
    dropped pages are reused by the rest of the upload, which then writes into
    memory already in use instead of fresh pages.
    """
    os.fdatasync(fd)
    _drop_cached(fd, upto)


def _drop_cached(fd: int, upto: int) -> None:
    """Drop the clean cached pages of the file's first `upto` bytes (0: all of it)."""
    with contextlib.suppress(OSError):  # only advice: the bytes are on disk either way
        os.posix_fadvise(fd, 0, upto, os.POSIX_FADV_DONTNEED)


def _drop_and_close(fd: int) -> None:
    _drop_cached(fd, 0)
    os.close(fd)


class _FileWriter:
    """`ArtifactWriter` over a temporary file in the store's incoming folder.

    Bytes go straight to the file descriptor (no buffer to copy them into).
    A large write is hashed on `hasher` while it is written: both release the
    GIL, and hashing (about 1.5 GB/s with SHA extensions) is the slower of the
    two. Every `_SYNC_EVERY` bytes a flush to disk (`_flush`) starts on
    `flusher` and the writes go on meanwhile: the disk works while the rest of
    the upload arrives and is hashed, no write waits for it, and the fsync at
    commit has only the tail left.
    """

    def __init__(
        self, folder: Path, flusher: ThreadPoolExecutor, hasher: ThreadPoolExecutor
    ) -> None:
        fd, name = tempfile.mkstemp(dir=folder, prefix="upload-")
        self.path = Path(name)
        self._fd: int | None = fd
        self._flusher = flusher
        self._hasher = hasher
        self._flushing: Future[None] | None = None
        self._hash = hashlib.sha256()
        self._size = 0
        self._unsynced = 0
        self.done = False

    @property
    def size(self) -> int:
        return self._size

    def write(self, data: bytes | memoryview) -> None:
        fd = self._open_fd()
        hashing = self._hasher.submit(self._hash.update, data) if len(data) >= _HASH_APART else None
        try:
            with _disk_space():
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                if hashing is None:
                    self._hash.update(data)
                self._size += len(data)
                self._unsynced += len(data)
                flushing = self._flushing
                if self._unsynced >= _SYNC_EVERY and (flushing is None or flushing.done()):
                    self._wait_flushed()  # a failed flush fails the upload now, not at commit
                    self._flushing = self._flusher.submit(_flush, fd, self._size)
                    self._unsynced = 0
        finally:
            if hashing is not None:
                hashing.result()  # the caller may reuse `data` once this returns

    def digest(self) -> str:
        return self._hash.hexdigest()

    def sync_and_close(self) -> None:
        """Make every byte durable and close the file (the writer is then only a path)."""
        fd = self._open_fd()
        with _disk_space():
            # A writeback error is reported to one fsync only: the flush's, if it got it.
            self._wait_flushed()
            os.fsync(fd)
        self._fd = None
        # Freeing the pages of the tail takes a while: the commit need not wait for it.
        self._flusher.submit(_drop_and_close, fd)

    def abort(self) -> None:
        if self.done:
            return
        self.done = True
        with contextlib.suppress(OSError):
            self._wait_flushed()  # the fd must not be closed under a flush still to run
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        self.path.unlink(missing_ok=True)

    def _open_fd(self) -> int:
        if self._fd is None:
            raise ValueError("the file was already closed")
        return self._fd

    def _wait_flushed(self) -> None:
        flushing, self._flushing = self._flushing, None
        if flushing is not None:
            flushing.result()


class FileArtifactStore:
    """`ArtifactStore` in a local folder; see the module docstring for the layout."""

    def __init__(self, root: Path | str) -> None:
        self._root = Path(root)
        self._incoming = self._root / _INCOMING
        self._incoming.mkdir(parents=True, exist_ok=True)
        # Flushes and hashes of uploads in progress run here, beside the writes
        # (see `_FileWriter`).
        self._flusher = ThreadPoolExecutor(2, thread_name_prefix="artifact-flush")
        self._hasher = ThreadPoolExecutor(4, thread_name_prefix="artifact-hash")

    @property
    def root(self) -> Path:
        """The folder the store lives in."""
        return self._root

    def path(self, digest: str) -> Path:
        """Where the file with content `digest` is (or would be) stored."""
        if not is_digest(digest):
            raise ValueError(f"not a sha256 digest: {digest[:80]!r}")
        return self._root / digest[:2] / digest

    def begin(self) -> ArtifactWriter:
        return _FileWriter(self._incoming, self._flusher, self._hasher)

    def commit(self, writer: ArtifactWriter) -> str:
        return self.commit_all([writer])[0]

    def commit_all(self, writers: Sequence[ArtifactWriter]) -> list[str]:
        files = [w for w in writers if isinstance(w, _FileWriter) and not w.done]
        if len(files) != len(writers) or len({id(f) for f in files}) != len(files):
            raise ValueError("commit takes writers from this store's begin(), each once")
        try:
            for file in files:
                file.sync_and_close()
                os.chmod(file.path, 0o444)  # content-addressed: never written in place
            # Every file is on disk: now their names, with one folder fsync for all of them.
            folders = set()
            for file in files:
                shard = self.path(file.digest()).parent
                if not shard.is_dir():
                    shard.mkdir(exist_ok=True)
                    folders.add(self._root)
                # Replacing an existing copy is harmless (same content) and heals a damaged one.
                os.replace(file.path, shard / file.digest())
                file.done = True
                folders.add(shard)
            for folder in sorted(folders, key=lambda f: f != self._root):
                _fsync_dir(folder)
        except BaseException:
            for file in files:
                file.abort()
            raise
        return [file.digest() for file in files]

    def open_verified(self, digest: str, size: int) -> BinaryIO:
        path = self.path(digest)
        try:
            file = path.open("rb")
        except FileNotFoundError:
            raise IntegrityError(f"artifact {digest[:12]} is missing from the store") from None
        try:
            actual_size = os.fstat(file.fileno()).st_size
            if actual_size != size:
                raise IntegrityError(
                    f"artifact {digest[:12]} is damaged: {actual_size} bytes on disk, "
                    f"{size} registered"
                )
            actual = hashlib.file_digest(file, "sha256").hexdigest()
            if actual != digest:
                raise IntegrityError(
                    f"artifact {digest[:12]} is damaged: its content hashes to {actual[:12]}"
                )
            file.seek(0)
        except BaseException:
            file.close()
            raise
        return file

    def remove(self, digest: str) -> None:
        path = self.path(digest)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        _fsync_dir(path.parent)

    def sweep(self, keep: set[str]) -> int:
        removed = 0
        for leftover in self._incoming.iterdir():
            leftover.unlink(missing_ok=True)
            removed += 1
        for shard in self._root.iterdir():
            if not shard.is_dir() or not _SHARD.fullmatch(shard.name):
                continue
            for path in shard.iterdir():
                if path.name not in keep:
                    _log.info("removing unreferenced artifact", file=str(path))
                    path.unlink(missing_ok=True)
                    removed += 1
        return removed
