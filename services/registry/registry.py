"""`ModelRegistry`: registration, lookups, aliases and downloads, over the two stores.

It ties a `RegistryStore` (metadata) and an `ArtifactStore` (bytes) together and
publishes the registry's events:

- `events.model.<name>.registered` when a version is stored;
- `events.model.<name>.promoted` when an alias is set or moved (also the aliases
  set by a registration);
- `events.model.<name>.rolled_back` on a rollback.

Events are published after the change is committed; they never undo it.

Files and metadata stay consistent under one lock: a registration makes its
files durable and then commits its metadata while holding it, and a deletion
commits and then removes the files no version refers to any more while holding
it, so a deletion never removes a file a registration is about to refer to.
Files left behind by a crash between the two steps are removed at the next
start (`sweep`). One registry process owns a database and artifact folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, BinaryIO, Protocol

from common.errors import IntegrityError, InvalidArgumentError, NotFoundError
from common.logging import get_logger
from services.registry.artifacts import ArtifactStore, ArtifactWriter
from services.registry.convert import VersionRef
from services.registry.records import (
    AliasChange,
    AliasEntry,
    DeletedVersion,
    FileRecord,
    ModelSummaryRecord,
    ModelVersionRecord,
    NewVersion,
    Page,
    Registered,
)
from services.registry.search import SearchQuery
from services.registry.store import RegistryStore
from services.registry.upload import UploadTracker

__all__ = ["DEFAULT_CHUNK_SIZE", "Chunk", "Download", "EventSink", "ModelRegistry", "event_subject"]

_log = get_logger(__name__)

DEFAULT_CHUNK_SIZE = 1024 * 1024
# Received upload bytes that may wait for the disk and the hash, per upload.
UPLOAD_BUFFER_BYTES = 4 * 1024 * 1024


class EventSink(Protocol):
    """Where the registry's events and errors go (the agent's `ErrorBus`)."""

    async def publish_event(self, subject: str, payload: Mapping[str, Any]) -> None: ...

    def report_error(
        self,
        message: str,
        *,
        severity: Any = "error",
        error_type: str | None = None,
        details: Mapping[str, Any] | None = None,
        exc: BaseException | None = None,
    ) -> None: ...


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of one file of an upload: `data` starts at byte `offset` of `file_name`."""

    file_name: str
    offset: int
    data: bytes | memoryview


class Download:
    """A verified artifact file, ready to stream from `offset` (close it when done)."""

    def __init__(
        self,
        version: ModelVersionRecord,
        file: FileRecord,
        handle: BinaryIO,
        offset: int,
        chunk_size: int,
    ) -> None:
        self.version = version
        self.file = file
        self._handle = handle
        self._offset = offset
        self._chunk_size = chunk_size

    async def chunks(self) -> AsyncIterator[tuple[int, bytes]]:
        """(offset, bytes) pieces from the start offset to the end; closes the file after."""
        try:
            await asyncio.to_thread(self._handle.seek, self._offset)
            offset = self._offset
            while offset < self.file.size_bytes:
                data = await asyncio.to_thread(self._handle.read, self._chunk_size)
                if not data:
                    raise IntegrityError(f"artifact {self.file.sha256[:12]} ended early")
                yield offset, data
                offset += len(data)
        finally:
            self.close()

    def close(self) -> None:
        self._handle.close()


class _WriteQueue:
    """The writes of one upload, run in order on a thread of their own.

    Up to `max_bytes` of received chunks wait to be written and hashed, so the
    upload keeps arriving while the disk and the hash catch up; past that,
    `put` waits, and gRPC flow control slows the sender.
    """

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._executor: ThreadPoolExecutor | None = None
        self._pending: deque[tuple[asyncio.Future[None], int]] = deque()
        self._bytes = 0

    async def put(
        self, write: Callable[[bytes | memoryview], None], data: bytes | memoryview
    ) -> None:
        """Queue `write(data)` after the writes queued before; wait while too much is queued."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="registry-upload")
        future = asyncio.get_running_loop().run_in_executor(self._executor, write, data)
        self._pending.append((future, len(data)))
        self._bytes += len(data)
        while self._bytes > self._max_bytes:
            await self._oldest()

    async def drain(self) -> None:
        """Wait until every queued write is done; the first failure is raised."""
        while self._pending:
            await self._oldest()

    async def close(self) -> None:
        """Wait for queued writes, ignoring their failures, and release the thread."""
        if self._pending:
            await asyncio.shield(
                asyncio.gather(*(f for f, _ in self._pending), return_exceptions=True)
            )
            self._pending.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=False)

    async def _oldest(self) -> None:
        future, size = self._pending[0]
        try:
            # Shielded: a cancelled caller must not mark a write done that still runs.
            await asyncio.shield(future)
        finally:
            if future.done():
                self._pending.popleft()
                self._bytes -= size


def event_subject(model_name: str, event: str) -> str:
    """`events.model.<name>.<event>`."""
    return f"events.model.{model_name}.{event}"


def _iso(at_us: int) -> str:
    return datetime.fromtimestamp(at_us / 1e6, UTC).isoformat()


class ModelRegistry:
    """The registry's operations; async, with blocking work in worker threads."""

    def __init__(
        self,
        store: RegistryStore,
        artifacts: ArtifactStore,
        events: EventSink,
        *,
        upload_buffer_bytes: int = UPLOAD_BUFFER_BYTES,
    ) -> None:
        """`upload_buffer_bytes`: how much of an upload may wait for the disk and the hash."""
        self._store = store
        self._upload_buffer_bytes = upload_buffer_bytes
        self._artifacts = artifacts
        self._events = events
        # Orders file writes/removals with the metadata commits (see the module docstring).
        self._files_lock = threading.Lock()

    @property
    def store(self) -> RegistryStore:
        return self._store

    def sweep(self) -> int:
        """Remove interrupted uploads and files no version refers to (blocking; at start)."""
        with self._files_lock:
            removed = self._artifacts.sweep(self._store.digests())
        if removed:
            _log.info("removed leftover artifact files", count=removed)
        return removed

    # --- registering --------------------------------------------------------------------------

    async def register(self, new: NewVersion, chunks: AsyncIterator[Chunk]) -> ModelVersionRecord:
        """Receive `new`'s files from `chunks`, check them, store the version, announce it.

        Raises `InvalidArgumentError` for chunks out of order or of unlisted files
        and `IntegrityError` when a file arrives incomplete, too long, or with
        another sha256 than declared; nothing is stored then.
        """
        tracker = UploadTracker(new.files)
        writers: dict[str, ArtifactWriter] = {}
        queue = _WriteQueue(self._upload_buffer_bytes)
        try:
            async for chunk in chunks:
                tracker.accept(chunk.file_name, chunk.offset, len(chunk.data))
                writer = writers.get(chunk.file_name)
                if writer is None:
                    writer = writers[chunk.file_name] = await asyncio.to_thread(
                        self._artifacts.begin
                    )
                if chunk.data:
                    await queue.put(writer.write, chunk.data)
            await queue.drain()
            tracker.finish()
            for declared in new.files:
                if declared.name not in writers:  # an empty file: no chunk needed
                    writers[declared.name] = await asyncio.to_thread(self._artifacts.begin)
                actual = writers[declared.name].digest()
                if actual != declared.sha256:
                    raise IntegrityError(
                        f"file {declared.name!r} arrived with sha256 {actual}, "
                        f"but the metadata declared {declared.sha256}"
                    )
            registered = await asyncio.to_thread(self._commit, new, writers)
        finally:
            await queue.close()  # no write may still run on a file about to be dropped
            if writers:
                await asyncio.to_thread(_abort_all, writers.values())
        record = registered.version
        await self._publish(
            record.name,
            "registered",
            {
                "model": record.name,
                "version": record.version,
                "aliases": list(record.aliases),
                "metrics": dict(record.metrics),
                "tags": dict(record.tags),
                "job_id": record.lineage.job_id,
                "actor": new.actor,
            },
            at_us=record.created_us,
        )
        for entry in registered.entries:
            await self._publish_change("promoted", entry)
        return record

    def _commit(self, new: NewVersion, writers: Mapping[str, ArtifactWriter]) -> Registered:
        with self._files_lock:
            committed = self._artifacts.commit_all(list(writers.values()))
            try:
                return self._store.create_version(new)
            except BaseException:
                self._release(set(committed))
                raise

    def _release(self, digests: set[str]) -> None:
        """Remove the files of `digests` that no stored version refers to (files lock held)."""
        if not digests:
            return
        try:
            unused = digests - self._store.digests()
            for digest in unused:
                self._artifacts.remove(digest)
        except Exception:  # the sweep at the next start removes what is left
            _log.warning("could not remove unreferenced artifact files", exc_info=True)

    # --- reading ------------------------------------------------------------------------------

    async def get(self, ref: VersionRef) -> ModelVersionRecord:
        """The version `ref` names (by number or alias)."""
        if ref.version is not None:
            return await asyncio.to_thread(self._store.get_version, ref.name, ref.version)
        assert ref.alias is not None
        return await asyncio.to_thread(self._store.resolve_alias, ref.name, ref.alias)

    async def list_models(
        self, name_prefix: str, page_size: int, page_token: str
    ) -> Page[ModelSummaryRecord]:
        return await asyncio.to_thread(self._store.list_models, name_prefix, page_size, page_token)

    async def search(
        self, query: SearchQuery, page_size: int, page_token: str
    ) -> Page[ModelVersionRecord]:
        return await asyncio.to_thread(self._store.search_versions, query, page_size, page_token)

    async def alias_history(
        self, name: str, alias: str, page_size: int, page_token: str
    ) -> Page[AliasEntry]:
        return await asyncio.to_thread(
            self._store.alias_history, name, alias, page_size, page_token
        )

    async def aliases_at(self, name: str, at_us: int) -> dict[str, int]:
        """Alias -> version of `name` as they stood at `at_us`: what was live then."""
        return await asyncio.to_thread(self._store.aliases_at, name, at_us)

    async def download(
        self, ref: VersionRef, file_name: str, *, offset: int = 0, chunk_size: int = 0
    ) -> Download:
        """A download of one file of a version, after its size and sha256 were checked.

        A damaged or missing file raises `IntegrityError` (and is reported to the
        error bus); it is never served.
        """
        version = await self.get(ref)
        file = version.file(file_name)
        if file is None:
            raise NotFoundError(
                f"version {version.version} of {version.name!r} has no file {file_name!r} "
                f"(it has {', '.join(f.name for f in version.files)})"
            )
        if not 0 <= offset <= file.size_bytes:
            raise InvalidArgumentError(
                f"must be between 0 and the file's size, {file.size_bytes}", field="offset"
            )
        try:
            handle = await asyncio.to_thread(
                self._artifacts.open_verified, file.sha256, file.size_bytes
            )
        except IntegrityError as exc:
            self._events.report_error(
                f"refused to serve damaged artifact {file_name!r} of {version.name!r} "
                f"version {version.version}: {exc}",
                severity="error",
                exc=exc,
                details={"model": version.name, "version": version.version, "sha256": file.sha256},
            )
            raise
        return Download(version, file, handle, offset, chunk_size or DEFAULT_CHUNK_SIZE)

    # --- aliases ------------------------------------------------------------------------------

    async def set_alias(
        self,
        name: str,
        alias: str,
        version: int,
        *,
        expected_version: int | None = None,
        actor: str = "",
        reason: str = "",
    ) -> AliasChange:
        """Point `alias` at `version`; announces `promoted` when the alias moved."""
        change = await asyncio.to_thread(
            lambda: self._store.set_alias(
                name, alias, version, expected_version=expected_version, actor=actor, reason=reason
            )
        )
        if change.changed:
            await self._publish_change("promoted", change.entry)
        return change

    async def delete_alias(
        self, name: str, alias: str, *, actor: str = "", reason: str = ""
    ) -> AliasEntry:
        return await asyncio.to_thread(
            lambda: self._store.delete_alias(name, alias, actor=actor, reason=reason)
        )

    async def rollback(
        self, name: str, alias: str, *, actor: str = "", reason: str = ""
    ) -> AliasChange:
        """Move `alias` back to its previous version; announces `rolled_back`."""
        change = await asyncio.to_thread(
            lambda: self._store.rollback_alias(name, alias, actor=actor, reason=reason)
        )
        await self._publish_change("rolled_back", change.entry)
        return change

    # --- deleting -----------------------------------------------------------------------------

    async def delete_version(
        self, name: str, version: int, *, force: bool = False, actor: str = "", reason: str = ""
    ) -> DeletedVersion:
        """Delete a version, then the files no other version refers to."""
        return await asyncio.to_thread(self._delete, name, version, force, actor, reason)

    def _delete(
        self, name: str, version: int, force: bool, actor: str, reason: str
    ) -> DeletedVersion:
        with self._files_lock:
            deleted = self._store.delete_version(
                name, version, force=force, actor=actor, reason=reason
            )
            for digest in deleted.released_digests:
                self._artifacts.remove(digest)
        _log.info(
            "model version deleted",
            model=name,
            version=version,
            actor=actor,
            reason=reason,
            aliases_removed=[e.alias for e in deleted.entries],
        )
        return deleted

    # --- events -------------------------------------------------------------------------------

    async def _publish_change(self, event: str, entry: AliasEntry) -> None:
        await self._publish(
            entry.model_name,
            event,
            {
                "model": entry.model_name,
                "alias": entry.alias,
                "from_version": entry.from_version,
                "to_version": entry.to_version,
                "action": entry.action.value,
                "actor": entry.actor,
                "reason": entry.reason,
            },
            at_us=entry.at_us,
        )

    async def _publish(
        self, model_name: str, event: str, body: Mapping[str, Any], *, at_us: int
    ) -> None:
        payload = {"id": uuid.uuid4().hex, "timestamp": _iso(at_us), "event": event, **body}
        try:
            await self._events.publish_event(event_subject(model_name, event), payload)
        except Exception:  # the change is committed; a lost event must not fail the call
            _log.warning("could not publish registry event", kind=event, exc_info=True)


def _abort_all(writers: Iterable[ArtifactWriter]) -> None:
    for writer in writers:
        with contextlib.suppress(OSError):
            writer.abort()
