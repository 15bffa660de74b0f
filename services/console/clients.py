"""The console's side of the mesh's gRPC contracts: one client per agent it shows.

Channels come from `common.channels` (the supervisor's control port on loopback;
every other agent through its ready key, falling back to the config) and are kept
open between requests. A failed call becomes `CallFailed`, which names the agent
and says why in words the pages can show; a channel whose agent went away is
dropped, so the next call finds the agent again (it may have restarted elsewhere).
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final, TypeVar

import grpc

from common.channels import agent_channel, open_channel
from common.config import StartupConfig
from common.errors import NotFoundError
from common.stubs import (
    common_pb2,
    compiler_pb2,
    compiler_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
    supervisor_pb2,
    supervisor_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)
from services.console.settings import ConsoleSettings

__all__ = ["SUPERVISOR", "CallFailed", "MeshClients", "actor"]

SUPERVISOR: Final = "supervisor"
_TIMEOUT_S: Final = 10.0
# Compiling a custom blueprint exports and validates it: seconds, not milliseconds.
_COMPILE_TIMEOUT_S: Final = 120.0
_PAGE_SIZE: Final = 500
# Bounds every paging loop: 20 pages of 500 is far beyond what a page can show.
_MAX_PAGES: Final = 20

T = TypeVar("T")


def actor() -> str:
    """Who the console says made a change (alias history, routes): `console:<user>`."""
    try:
        return f"console:{getpass.getuser()}"
    except (KeyError, OSError):  # no login name (a container without a passwd entry)
        return "console"


class CallFailed(Exception):
    """A call to an agent failed: which agent, the status code, and the server's words."""

    def __init__(self, agent: str, code: grpc.StatusCode, details: str) -> None:
        self.agent = agent
        self.code = code
        self.details = details
        super().__init__(f"{agent}: {code.name}: {details}")

    @property
    def unavailable(self) -> bool:
        return self.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)

    @property
    def field(self) -> str:
        """The field path an INVALID_ARGUMENT names (`spec.growth.blend_steps`), else ''."""
        if self.code != grpc.StatusCode.INVALID_ARGUMENT:
            return ""
        head, sep, _ = self.details.partition(": ")
        return head if sep and " " not in head else ""

    @property
    def message(self) -> str:
        """The server's message without the field path it starts with."""
        field = self.field
        return self.details[len(field) + 2 :] if field else self.details

    def describe(self) -> str:
        """One sentence for a page or a JSON error."""
        if self.unavailable:
            return f"the {self.agent} is not reachable right now ({self.details})"
        return self.details or self.code.name


async def _all_pages(
    fetch: Callable[[common_pb2.PageRequest], Awaitable[tuple[Any, str]]],
) -> list[Any]:
    """Every item of a paginated listing (`fetch(page)` -> items, next page token),
    at most `_MAX_PAGES` pages."""
    found: list[Any] = []
    token = ""
    for _ in range(_MAX_PAGES):
        items, token = await fetch(common_pb2.PageRequest(page_size=_PAGE_SIZE, page_token=token))
        found.extend(items)
        if not token:
            break
    return found


class MeshClients:
    """Async clients of the supervisor, trainer, registry, router and compiler."""

    def __init__(self, cfg: StartupConfig | None, settings: ConsoleSettings) -> None:
        self._cfg = cfg
        self._settings = settings
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._lock = asyncio.Lock()

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            with contextlib.suppress(Exception):
                await channel.close()

    async def _channel(self, agent: str) -> grpc.aio.Channel:
        async with self._lock:
            found = self._channels.get(agent)
            if found is not None:
                return found
            if self._cfg is None:
                raise CallFailed(
                    agent,
                    grpc.StatusCode.UNAVAILABLE,
                    "the console runs without a mesh config (GRAFTMESH_CONFIG)",
                )
            if agent == SUPERVISOR:
                channel = open_channel(f"127.0.0.1:{self._cfg.supervisor.control_port}")
            else:
                try:
                    channel = await agent_channel(self._cfg, agent)
                except NotFoundError as exc:
                    raise CallFailed(agent, grpc.StatusCode.UNAVAILABLE, str(exc)) from None
            self._channels[agent] = channel
            return channel

    async def _forget(self, agent: str, channel: grpc.aio.Channel) -> None:
        async with self._lock:
            if self._channels.get(agent) is channel:
                del self._channels[agent]
        with contextlib.suppress(Exception):
            await channel.close()

    async def _call(self, agent: str, call: Callable[[grpc.aio.Channel], Awaitable[T]]) -> T:
        channel = await self._channel(agent)
        try:
            return await call(channel)
        except grpc.aio.AioRpcError as exc:
            failed = CallFailed(agent, exc.code(), exc.details() or "")
            if failed.unavailable:
                await self._forget(agent, channel)
            raise failed from None

    # ------------------------------------------------------------------ supervisor

    async def status(self) -> supervisor_pb2.GetStatusResponse:
        async def call(ch: grpc.aio.Channel) -> supervisor_pb2.GetStatusResponse:
            stub = supervisor_pb2_grpc.SupervisorServiceStub(ch)
            reply: supervisor_pb2.GetStatusResponse = await stub.GetStatus(
                supervisor_pb2.GetStatusRequest(), timeout=_TIMEOUT_S
            )
            return reply

        return await self._call(SUPERVISOR, call)

    # ------------------------------------------------------------------ trainer

    @property
    def trainer(self) -> str:
        return self._settings.agent("trainer")

    async def list_jobs(self, limit: int = 100) -> list[trainer_pb2.Job]:
        async def call(ch: grpc.aio.Channel) -> list[trainer_pb2.Job]:
            stub = trainer_pb2_grpc.TrainerServiceStub(ch)
            reply = await stub.ListJobs(
                trainer_pb2.ListJobsRequest(page=common_pb2.PageRequest(page_size=limit)),
                timeout=_TIMEOUT_S,
            )
            return list(reply.jobs)

        return await self._call(self.trainer, call)

    async def get_job(self, job_id: str) -> trainer_pb2.Job:
        async def call(ch: grpc.aio.Channel) -> trainer_pb2.Job:
            stub = trainer_pb2_grpc.TrainerServiceStub(ch)
            reply = await stub.GetJob(trainer_pb2.GetJobRequest(job_id=job_id), timeout=_TIMEOUT_S)
            return reply.job

        return await self._call(self.trainer, call)

    async def submit_job(self, spec: trainer_pb2.JobSpec, request_id: str) -> trainer_pb2.Job:
        async def call(ch: grpc.aio.Channel) -> trainer_pb2.Job:
            stub = trainer_pb2_grpc.TrainerServiceStub(ch)
            reply = await stub.SubmitJob(
                trainer_pb2.SubmitJobRequest(spec=spec, request_id=request_id), timeout=_TIMEOUT_S
            )
            return reply.job

        return await self._call(self.trainer, call)

    async def cancel_job(self, job_id: str, reason: str) -> trainer_pb2.Job:
        async def call(ch: grpc.aio.Channel) -> trainer_pb2.Job:
            stub = trainer_pb2_grpc.TrainerServiceStub(ch)
            reply = await stub.CancelJob(
                trainer_pb2.CancelJobRequest(job_id=job_id, reason=reason), timeout=_TIMEOUT_S
            )
            return reply.job

        return await self._call(self.trainer, call)

    async def watch_job(self, job_id: str, after: int) -> AsyncIterator[trainer_pb2.JobEvent]:
        """The job's retained events after `after`, then live ones until it ends."""
        channel = await self._channel(self.trainer)
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        stream = stub.WatchJob(trainer_pb2.WatchJobRequest(job_id=job_id, after_sequence=after))
        try:
            async for reply in stream:
                yield reply.event
        except grpc.aio.AioRpcError as exc:
            failed = CallFailed(self.trainer, exc.code(), exc.details() or "")
            if failed.unavailable:
                await self._forget(self.trainer, channel)
            raise failed from None
        finally:
            stream.cancel()

    # ------------------------------------------------------------------ registry

    @property
    def registry(self) -> str:
        return self._settings.agent("registry")

    async def list_models(self) -> list[registry_pb2.ModelSummary]:
        async def call(ch: grpc.aio.Channel) -> list[registry_pb2.ModelSummary]:
            stub = registry_pb2_grpc.RegistryServiceStub(ch)

            async def page(request: common_pb2.PageRequest) -> Any:
                reply = await stub.ListModels(
                    registry_pb2.ListModelsRequest(page=request), timeout=_TIMEOUT_S
                )
                return reply.models, reply.page.next_page_token

            return await _all_pages(page)

        return await self._call(self.registry, call)

    async def versions(self, name: str, limit: int = 100) -> list[registry_pb2.ModelVersion]:
        """The newest `limit` versions of `name` (empty when it is not registered)."""

        async def call(ch: grpc.aio.Channel) -> list[registry_pb2.ModelVersion]:
            stub = registry_pb2_grpc.RegistryServiceStub(ch)
            reply = await stub.SearchModelVersions(
                registry_pb2.SearchModelVersionsRequest(
                    name=name, page=common_pb2.PageRequest(page_size=limit)
                ),
                timeout=_TIMEOUT_S,
            )
            return list(reply.model_versions)

        return await self._call(self.registry, call)

    async def alias_history(
        self, name: str, limit: int = 50
    ) -> list[registry_pb2.AliasHistoryEntry]:
        async def call(ch: grpc.aio.Channel) -> list[registry_pb2.AliasHistoryEntry]:
            stub = registry_pb2_grpc.RegistryServiceStub(ch)
            reply = await stub.GetAliasHistory(
                registry_pb2.GetAliasHistoryRequest(
                    name=name, page=common_pb2.PageRequest(page_size=limit)
                ),
                timeout=_TIMEOUT_S,
            )
            return list(reply.entries)

        return await self._call(self.registry, call)

    async def set_alias(
        self, name: str, alias: str, version: int, expected: int, reason: str
    ) -> registry_pb2.AliasHistoryEntry:
        """Move `alias` to `version` if it points at `expected` now (0: does not exist)."""

        async def call(ch: grpc.aio.Channel) -> registry_pb2.AliasHistoryEntry:
            stub = registry_pb2_grpc.RegistryServiceStub(ch)
            reply = await stub.SetAlias(
                registry_pb2.SetAliasRequest(
                    name=name,
                    alias=alias,
                    version=version,
                    expected_version=expected,
                    actor=actor(),
                    reason=reason,
                ),
                timeout=_TIMEOUT_S,
            )
            return reply.entry

        return await self._call(self.registry, call)

    async def rollback(self, name: str, alias: str, reason: str) -> registry_pb2.RollbackResponse:
        async def call(ch: grpc.aio.Channel) -> registry_pb2.RollbackResponse:
            stub = registry_pb2_grpc.RegistryServiceStub(ch)
            reply: registry_pb2.RollbackResponse = await stub.Rollback(
                registry_pb2.RollbackRequest(name=name, alias=alias, actor=actor(), reason=reason),
                timeout=_TIMEOUT_S,
            )
            return reply

        return await self._call(self.registry, call)

    # ------------------------------------------------------------------ router

    @property
    def router(self) -> str:
        return self._settings.agent("router")

    async def routes(self, name: str = "") -> list[router_pb2.Route]:
        async def call(ch: grpc.aio.Channel) -> list[router_pb2.Route]:
            stub = router_pb2_grpc.RouterServiceStub(ch)
            reply = await stub.GetRoutes(
                router_pb2.GetRoutesRequest(model_name=name), timeout=_TIMEOUT_S
            )
            return list(reply.routes)

        return await self._call(self.router, call)

    async def router_stats(self, name: str = "") -> router_pb2.RouterServiceGetStatsResponse:
        async def call(ch: grpc.aio.Channel) -> router_pb2.RouterServiceGetStatsResponse:
            stub = router_pb2_grpc.RouterServiceStub(ch)
            reply: router_pb2.RouterServiceGetStatsResponse = await stub.GetStats(
                router_pb2.RouterServiceGetStatsRequest(model_name=name), timeout=_TIMEOUT_S
            )
            return reply

        return await self._call(self.router, call)

    # ------------------------------------------------------------------ compiler

    @property
    def compiler(self) -> str:
        return self._settings.agent("compiler")

    async def blueprints(self) -> list[compiler_pb2.BlueprintInfo]:
        async def call(ch: grpc.aio.Channel) -> list[compiler_pb2.BlueprintInfo]:
            stub = compiler_pb2_grpc.CompilerServiceStub(ch)
            reply = await stub.ListBlueprints(
                compiler_pb2.ListBlueprintsRequest(), timeout=_TIMEOUT_S
            )
            return list(reply.blueprints)

        return await self._call(self.compiler, call)

    async def kernels(self) -> list[compiler_pb2.KernelInfo]:
        async def call(ch: grpc.aio.Channel) -> list[compiler_pb2.KernelInfo]:
            stub = compiler_pb2_grpc.CompilerServiceStub(ch)

            async def page(request: common_pb2.PageRequest) -> Any:
                reply = await stub.ListKernels(
                    compiler_pb2.ListKernelsRequest(page=request), timeout=_TIMEOUT_S
                )
                return reply.kernels, reply.page.next_page_token

            return await _all_pages(page)

        return await self._call(self.compiler, call)

    async def compile(self, request: compiler_pb2.CompileRequest) -> compiler_pb2.CompileResponse:
        async def call(ch: grpc.aio.Channel) -> compiler_pb2.CompileResponse:
            stub = compiler_pb2_grpc.CompilerServiceStub(ch)
            reply: compiler_pb2.CompileResponse = await stub.Compile(
                request, timeout=_COMPILE_TIMEOUT_S
            )
            return reply

        return await self._call(self.compiler, call)
