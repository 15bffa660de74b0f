"""Where artifact bytes live: content-addressed files, written atomically, read verified.

Layout under `root` (by default `<run_dir>/registry/artifacts`):

    <root>/<sha[:2]>/<sha>     one file per distinct content, read-only
    <root>/.incoming/          uploads in progress (removed at start)

An upload is written to a temporary file in `.incoming/`, hashed as it
arrives and flushed to disk every 8 MiB; `commit` fsyncs it, renames it to its
digest's path and fsyncs the folder, so a file under its digest is always
complete. Identical content is stored once, whichever versions refer to it.
`open_verified` checks size and sha256 before handing out a file: a corrupt or
missing artifact raises `IntegrityError` (DATA_LOSS) and is never served.

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
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

from common.errors import IntegrityError, ResourceExhaustedError
from common.logging import get_logger
from services.registry.validation import is_digest

__all__ = ["ArtifactStore", "ArtifactWriter", "FileArtifactStore"]

_log = get_logger(__name__)

_INCOMING = ".incoming"
# Bytes of an upload written between two flushes to disk.
_SYNC_EVERY = 8 * 1024 * 1024
_SHARD = re.compile(r"[0-9a-f]{2}")


class ArtifactWriter(Protocol):
    """One file being received: its bytes so far, hashed as they come."""

    @property
    def size(self) -> int:
        """Bytes written so far."""
        ...

    def write(self, data: bytes) -> None:
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


class _FileWriter:
    """`ArtifactWriter` over a temporary file in the store's incoming folder."""

    def __init__(self, folder: Path) -> None:
        fd, name = tempfile.mkstemp(dir=folder, prefix="upload-")
        self.path = Path(name)
        self.file: BinaryIO = os.fdopen(fd, "wb")
        self._hash = hashlib.sha256()
        self._size = 0
        self._unsynced = 0
        self.done = False

    @property
    def size(self) -> int:
        return self._size

    def write(self, data: bytes) -> None:
        with _disk_space():
            self.file.write(data)
        self._hash.update(data)
        self._size += len(data)
        self._unsynced += len(data)
        if self._unsynced >= _SYNC_EVERY:
            # Flush while the upload goes on, so the fsync at commit has little left to do.
            with _disk_space():
                self.file.flush()
                os.fdatasync(self.file.fileno())
            self._unsynced = 0

    def digest(self) -> str:
        return self._hash.hexdigest()

    def abort(self) -> None:
        if self.done:
            return
        self.done = True
        with contextlib.suppress(OSError):
            self.file.close()
        self.path.unlink(missing_ok=True)


class FileArtifactStore:
    """`ArtifactStore` in a local folder; see the module docstring for the layout."""

    def __init__(self, root: Path | str) -> None:
        self._root = Path(root)
        self._incoming = self._root / _INCOMING
        self._incoming.mkdir(parents=True, exist_ok=True)

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
        return _FileWriter(self._incoming)

    def commit(self, writer: ArtifactWriter) -> str:
        if not isinstance(writer, _FileWriter) or writer.done:
            raise ValueError("commit takes a writer from this store's begin(), once")
        digest = writer.digest()
        target = self.path(digest)
        try:
            with _disk_space():
                writer.file.flush()
                os.fsync(writer.file.fileno())
                writer.file.close()
            os.chmod(writer.path, 0o444)  # content-addressed: never written in place
            shard = target.parent
            if not shard.is_dir():
                shard.mkdir(exist_ok=True)
                _fsync_dir(self._root)
            # Replacing an existing copy is harmless (same content) and heals a damaged one.
            os.replace(writer.path, target)
            writer.done = True
            _fsync_dir(shard)
        except BaseException:
            writer.abort()
            raise
        return digest

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
