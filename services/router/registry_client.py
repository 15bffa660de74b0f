"""The router's side of `graftmesh.v1.RegistryService`: look-ups, downloads, alias changes.

The registry is reached over gRPC only. Its address comes from `address()`
(the settings, else its Redis ready key, else the config) each time a channel
is opened; a call that finds the registry unreachable drops the channel, so the
next call looks the address up again (a restarted registry may have moved).

Errors come back as the mesh's errors (`common.errors.from_rpc_error`):
NOT_FOUND is `NotFoundError`, an unreachable registry `UnavailableError`, and
so on. `reachable` and `last_error` say how the last call went (health).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from common.channels import open_channel
from common.errors import (
    GraftmeshError,
    IntegrityError,
    NotFoundError,
    UnavailableError,
    from_rpc_error,
)
from common.logging import get_logger
from common.stubs import common_pb2, registry_pb2, registry_pb2_grpc

__all__ = ["RegistryClient"]

_log = get_logger(__name__)
T = TypeVar("T")
_UNREACHABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
_DOWNLOAD_CHUNK = 1024 * 1024


class RegistryClient:
    """Calls to the registry with a per-call timeout; `close()` releases the channel."""

    def __init__(self, address: Callable[[], Awaitable[str]], *, timeout_s: float = 10.0) -> None:
        self._address = address
        self._timeout_s = timeout_s
        self._channel: grpc.aio.Channel | None = None
        self._stub: registry_pb2_grpc.RegistryServiceAsyncStub | None = None
        self.reachable = True
        self.last_error: str | None = None

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        self._channel = self._stub = None

    async def _get_stub(self) -> registry_pb2_grpc.RegistryServiceAsyncStub:
        if self._stub is None:
            try:
                target = await self._address()
            except GraftmeshError as exc:
                self._mark_down(str(exc))
                raise UnavailableError(f"registry address unknown: {exc}") from exc
            self._channel = open_channel(target)
            self._stub = registry_pb2_grpc.RegistryServiceStub(self._channel)
        return self._stub

    def _mark_down(self, why: str) -> None:
        self.reachable = False
        self.last_error = why

    async def _call(
        self, what: str, fn: Callable[[registry_pb2_grpc.RegistryServiceAsyncStub], Awaitable[T]]
    ) -> T:
        stub = await self._get_stub()
        try:
            result = await fn(stub)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _UNREACHABLE:
                self._mark_down(f"{what}: {exc.code().name}: {exc.details()}")
                await self.close()
                raise UnavailableError(f"registry unreachable ({what}): {exc.details()}") from exc
            self.reachable, self.last_error = True, None
            raise from_rpc_error(exc) from exc
        self.reachable, self.last_error = True, None
        return result

    async def aliases(self, name: str) -> dict[str, int]:
        """The aliases of model `name` (alias -> version); NotFoundError for an unknown model."""
        request = registry_pb2.ListModelsRequest(
            name_prefix=name, page=common_pb2.PageRequest(page_size=1000)
        )
        response = await self._call(
            "ListModels", lambda stub: stub.ListModels(request, timeout=self._timeout_s)
        )
        for summary in response.models:
            if summary.name == name:
                return dict(summary.aliases)
        raise NotFoundError(f"no model {name!r} in the registry")

    async def ping(self) -> None:
        """One cheap call, to learn whether the registry answers."""
        request = registry_pb2.ListModelsRequest(page=common_pb2.PageRequest(page_size=1))
        await self._call(
            "ListModels", lambda stub: stub.ListModels(request, timeout=self._timeout_s)
        )

    async def get_version(
        self, name: str, *, alias: str | None = None, version: int | None = None
    ) -> registry_pb2.ModelVersion:
        """A version's metadata by alias or number; NotFoundError for an unknown one."""
        ref = common_pb2.ModelRef(name=name)
        if version is not None:
            ref.version = version
        elif alias is not None:
            ref.alias = alias
        request = registry_pb2.GetModelVersionRequest(model=ref)
        response = await self._call(
            "GetModelVersion", lambda stub: stub.GetModelVersion(request, timeout=self._timeout_s)
        )
        return response.model_version

    async def alias_history(
        self, name: str, alias: str, limit: int
    ) -> list[registry_pb2.AliasHistoryEntry]:
        """The newest `limit` changes of an alias, newest first."""
        request = registry_pb2.GetAliasHistoryRequest(
            name=name, alias=alias, page=common_pb2.PageRequest(page_size=limit)
        )
        response = await self._call(
            "GetAliasHistory", lambda stub: stub.GetAliasHistory(request, timeout=self._timeout_s)
        )
        return list(response.entries)

    async def download(self, name: str, version: int, file_name: str, sha256: str) -> bytes:
        """One artifact file, checked against `sha256` (the version's record of it).

        IntegrityError when the header names another digest, the chunks do not
        follow each other, or the bytes do not hash to `sha256`.
        """
        request = registry_pb2.DownloadArtifactRequest(
            model=common_pb2.ModelRef(name=name, version=version),
            file_name=file_name,
            chunk_size=_DOWNLOAD_CHUNK,
        )

        async def fetch(stub: registry_pb2_grpc.RegistryServiceAsyncStub) -> bytes:
            parts: list[bytes] = []
            offset = 0
            header: registry_pb2.ArtifactHeader | None = None
            call = stub.DownloadArtifact(request, timeout=self._timeout_s)
            async for message in call:
                if message.WhichOneof("part") == "header":
                    header = message.header
                    continue
                if header is None:
                    raise IntegrityError(f"{file_name}: a chunk came before the header")
                if message.chunk.offset != offset:
                    raise IntegrityError(
                        f"{file_name}: chunk at offset {message.chunk.offset}, expected {offset}"
                    )
                parts.append(message.chunk.data)
                offset += len(message.chunk.data)
            if header is None:
                raise IntegrityError(f"{file_name}: the download carried no header")
            if not hmac.compare_digest(header.file.sha256, sha256):
                raise IntegrityError(
                    f"{file_name}: the registry's header says sha256 {header.file.sha256}, "
                    f"the version lists {sha256}"
                )
            return b"".join(parts)

        data = await self._call("DownloadArtifact", fetch)
        actual = hashlib.sha256(data).hexdigest()
        if not hmac.compare_digest(actual, sha256):
            raise IntegrityError(
                f"{name} v{version} {file_name}: checksum mismatch: expected sha256 {sha256}, "
                f"got {actual}"
            )
        return data

    async def set_alias(
        self,
        name: str,
        alias: str,
        version: int,
        *,
        expected_version: int | None,
        actor: str,
        reason: str,
    ) -> None:
        """Point `alias` at `version` (only if it points at `expected_version`, when given)."""
        request = registry_pb2.SetAliasRequest(
            name=name, alias=alias, version=version, actor=actor, reason=reason
        )
        if expected_version is not None:
            request.expected_version = expected_version
        await self._call("SetAlias", lambda stub: stub.SetAlias(request, timeout=self._timeout_s))

    async def delete_alias(self, name: str, alias: str, *, actor: str, reason: str) -> None:
        request = registry_pb2.DeleteAliasRequest(
            name=name, alias=alias, actor=actor, reason=reason
        )
        await self._call(
            "DeleteAlias", lambda stub: stub.DeleteAlias(request, timeout=self._timeout_s)
        )
