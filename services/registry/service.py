"""The registry agent: `RegistryService` over gRPC, on `ModelRegistry`.

The servicer only turns messages into calls and records into messages; errors
are raised as the mesh's errors and mapped to statuses by the gRPC server.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any, cast

import grpc

from common.agent import AgentContext
from common.errors import InvalidArgumentError
from common.grpc_server import Context
from common.logging import get_logger
from common.register_wire import RawChunk, parse_register_request
from common.stubs import common_pb2, registry_pb2, registry_pb2_grpc
from services.registry.artifacts import FileArtifactStore
from services.registry.convert import (
    check_actor,
    check_reason,
    check_version,
    entry_to_proto,
    model_ref_from_proto,
    new_version_from_metadata,
    search_query_from_request,
    summary_to_proto,
    version_to_proto,
)
from services.registry.database import redact
from services.registry.paging import page_size
from services.registry.registry import Chunk, ModelRegistry
from services.registry.settings import RegistrySettings
from services.registry.sql_store import SqlRegistryStore
from services.registry.validation import check_alias, check_file_name, check_model_name, check_text

__all__ = ["MAX_CHUNK_SIZE", "RegistryAgent", "RegistryServicer", "add_to_server", "build"]

_log = get_logger(__name__)

# Download chunks stay well below the gRPC message limit.
MAX_CHUNK_SIZE = 16 * 1024 * 1024
SERVICE_NAME = registry_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name


RegisterRequest = registry_pb2.RegisterModelRequest | RawChunk


async def _chunks(requests: AsyncIterator[RegisterRequest]) -> AsyncIterator[Chunk]:
    async for request in requests:
        if isinstance(request, RawChunk):
            yield Chunk(request.file_name, request.offset, request.data)
            continue
        if request.WhichOneof("part") != "chunk":
            raise InvalidArgumentError(
                "the metadata comes once, in the first message; then only chunks",
                field="metadata",
            )
        yield Chunk(request.chunk.file_name, request.chunk.chunk.offset, request.chunk.chunk.data)


class RegistryServicer(registry_pb2_grpc.RegistryServiceServicer):
    """`graftmesh.v1.RegistryService` (see proto/graftmesh/v1/registry.proto)."""

    def __init__(self, registry: ModelRegistry, *, max_file_bytes: int) -> None:
        self._registry = registry
        self._max_file_bytes = max_file_bytes

    async def RegisterModel(
        self,
        request_iterator: AsyncIterator[RegisterRequest],
        context: Context,
    ) -> registry_pb2.RegisterModelResponse:
        """Requests come parsed by `parse_register_request` (see `add_to_server`)."""
        first = await anext(request_iterator, None)
        if first is None or isinstance(first, RawChunk) or first.WhichOneof("part") != "metadata":
            raise InvalidArgumentError(
                "the first message must carry the version's metadata", field="metadata"
            )
        new = new_version_from_metadata(first.metadata, max_file_bytes=self._max_file_bytes)
        record = await self._registry.register(new, _chunks(request_iterator))
        return registry_pb2.RegisterModelResponse(model_version=version_to_proto(record))

    async def GetModelVersion(
        self, request: registry_pb2.GetModelVersionRequest, context: Context
    ) -> registry_pb2.GetModelVersionResponse:
        record = await self._registry.get(model_ref_from_proto(request.model))
        return registry_pb2.GetModelVersionResponse(model_version=version_to_proto(record))

    async def ListModels(
        self, request: registry_pb2.ListModelsRequest, context: Context
    ) -> registry_pb2.ListModelsResponse:
        check_text(request.name_prefix, "name_prefix", max_length=128)
        page = await self._registry.list_models(
            request.name_prefix, page_size(request.page.page_size), request.page.page_token
        )
        return registry_pb2.ListModelsResponse(
            models=[summary_to_proto(m) for m in page.items],
            page=common_pb2.PageInfo(
                next_page_token=page.next_page_token, total_size=page.total_size
            ),
        )

    async def SearchModelVersions(
        self, request: registry_pb2.SearchModelVersionsRequest, context: Context
    ) -> registry_pb2.SearchModelVersionsResponse:
        query = search_query_from_request(request)
        page = await self._registry.search(
            query, page_size(request.page.page_size), request.page.page_token
        )
        return registry_pb2.SearchModelVersionsResponse(
            model_versions=[version_to_proto(v) for v in page.items],
            page=common_pb2.PageInfo(
                next_page_token=page.next_page_token, total_size=page.total_size
            ),
        )

    async def SetAlias(
        self, request: registry_pb2.SetAliasRequest, context: Context
    ) -> registry_pb2.SetAliasResponse:
        name = check_model_name(request.name, "name")
        alias = check_alias(request.alias, "alias")
        version = check_version(request.version, "version")
        expected = request.expected_version if request.HasField("expected_version") else None
        if expected is not None and expected < 0:
            raise InvalidArgumentError(
                "a version (>= 1), or 0 for 'only if the alias does not exist'",
                field="expected_version",
            )
        change = await self._registry.set_alias(
            name,
            alias,
            version,
            expected_version=expected,
            actor=check_actor(request.actor),
            reason=check_reason(request.reason),
        )
        return registry_pb2.SetAliasResponse(
            model_version=version_to_proto(change.version), entry=entry_to_proto(change.entry)
        )

    async def DeleteAlias(
        self, request: registry_pb2.DeleteAliasRequest, context: Context
    ) -> registry_pb2.DeleteAliasResponse:
        entry = await self._registry.delete_alias(
            check_model_name(request.name, "name"),
            check_alias(request.alias, "alias"),
            actor=check_actor(request.actor),
            reason=check_reason(request.reason),
        )
        return registry_pb2.DeleteAliasResponse(entry=entry_to_proto(entry))

    async def Rollback(
        self, request: registry_pb2.RollbackRequest, context: Context
    ) -> registry_pb2.RollbackResponse:
        change = await self._registry.rollback(
            check_model_name(request.name, "name"),
            check_alias(request.alias, "alias"),
            actor=check_actor(request.actor),
            reason=check_reason(request.reason),
        )
        return registry_pb2.RollbackResponse(
            model_version=version_to_proto(change.version), entry=entry_to_proto(change.entry)
        )

    async def GetAliasHistory(
        self, request: registry_pb2.GetAliasHistoryRequest, context: Context
    ) -> registry_pb2.GetAliasHistoryResponse:
        name = check_model_name(request.name, "name")
        alias = check_alias(request.alias, "alias") if request.alias else ""
        page = await self._registry.alias_history(
            name, alias, page_size(request.page.page_size), request.page.page_token
        )
        return registry_pb2.GetAliasHistoryResponse(
            entries=[entry_to_proto(e) for e in page.items],
            page=common_pb2.PageInfo(
                next_page_token=page.next_page_token, total_size=page.total_size
            ),
        )

    async def DownloadArtifact(
        self, request: registry_pb2.DownloadArtifactRequest, context: Context
    ) -> AsyncIterator[registry_pb2.DownloadArtifactResponse]:
        ref = model_ref_from_proto(request.model)
        file_name = check_file_name(request.file_name, "file_name")
        if not 0 <= request.chunk_size <= MAX_CHUNK_SIZE:
            raise InvalidArgumentError(
                f"between 1 and {MAX_CHUNK_SIZE} bytes, or 0 for the default",
                field="chunk_size",
            )
        if request.offset < 0:
            raise InvalidArgumentError("must not be negative", field="offset")
        download = await self._registry.download(
            ref, file_name, offset=request.offset, chunk_size=request.chunk_size
        )
        try:
            file = download.file
            yield registry_pb2.DownloadArtifactResponse(
                header=registry_pb2.ArtifactHeader(
                    model_name=download.version.name,
                    version=download.version.version,
                    file=registry_pb2.ArtifactFile(
                        name=file.name, sha256=file.sha256, size_bytes=file.size_bytes
                    ),
                )
            )
            async for offset, data in download.chunks():
                yield registry_pb2.DownloadArtifactResponse(
                    chunk=common_pb2.ArtifactChunk(data=data, offset=offset)
                )
        finally:
            download.close()

    async def DeleteModelVersion(
        self, request: registry_pb2.DeleteModelVersionRequest, context: Context
    ) -> registry_pb2.DeleteModelVersionResponse:
        await self._registry.delete_version(
            check_model_name(request.name, "name"),
            check_version(request.version, "version"),
            force=request.force,
            actor=check_actor(request.actor),
            reason=check_reason(request.reason),
        )
        return registry_pb2.DeleteModelVersionResponse()


class _HandlerRecorder:
    """Takes the place of a server to collect the handlers the generated code registers."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Iterable[object]) -> None:
        pass  # the same handlers come through add_registered_method_handlers

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: Mapping[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self.handlers.update(method_handlers)


def add_to_server(servicer: RegistryServicer, server: grpc.aio.Server) -> None:
    """Serve `servicer` on `server`, `RegisterModel` with its own request parser.

    The handlers are the generated ones, except that `RegisterModel`'s requests
    are parsed by `parse_register_request`: an upload's chunks then reach the
    hash and the disk without being copied out of the received messages.
    """
    recorder = _HandlerRecorder()
    registry_pb2_grpc.add_RegistryServiceServicer_to_server(
        servicer, cast(grpc.aio.Server, recorder)
    )
    handlers = dict(recorder.handlers)
    generated = handlers["RegisterModel"]
    handlers["RegisterModel"] = grpc.stream_unary_rpc_method_handler(
        servicer.RegisterModel,
        request_deserializer=parse_register_request,
        response_serializer=generated.response_serializer,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


class RegistryAgent:
    """The registry as an `AgentService`: its database and artifacts are ready once built."""

    service_names: Sequence[str] = (SERVICE_NAME,)

    def __init__(self, ctx: AgentContext, settings: RegistrySettings) -> None:
        self._ctx = ctx
        self._settings = settings
        self._url = settings.resolved_database_url()
        # Migrations and the sweep run before the server accepts calls.
        self._store = SqlRegistryStore.open(self._url)
        self.registry = ModelRegistry(
            self._store, FileArtifactStore(settings.artifacts_dir), ctx.bus
        )
        self.registry.sweep()

    def add_to_server(self, server: grpc.aio.Server) -> None:
        add_to_server(
            RegistryServicer(self.registry, max_file_bytes=self._settings.max_file_bytes), server
        )

    async def start(self) -> None:
        self._ctx.health.update_details(
            database=self._store.backend,
            database_url=redact(self._url),
            artifacts=str(self._settings.artifacts_dir),
        )
        _log.info("registry serving", database=redact(self._url))

    async def stop(self) -> None:
        self._store.close()


def build(ctx: AgentContext) -> RegistryAgent:
    """The registry agent for `ctx` (settings from the environment, see `settings`)."""
    return RegistryAgent(ctx, RegistrySettings.from_environ(ctx.env.run_dir))
