"""A built-in-style agent on `common.agent`, for the runtime's own tests.

It serves a small part of `CompilerService` with behaviour chosen by the request,
so that the runtime's error mapping, draining and crash reporting are exercised
through a real gRPC server:

- ListBlueprints: sleeps `slot_kind` x 0.5 s, then answers (in-flight work to drain);
- GetKernel: NOT_FOUND (a mesh error, mapped to its code);
- ListKernels: raises RuntimeError (a bug: INTERNAL, reported to the error bus).

SAMPLE_FAIL_AT_START=1 makes the service's start raise (exit 1, critical report).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import grpc

from common.agent import AgentContext, run
from common.errors import NotFoundError
from common.grpc_server import Context
from common.stubs import compiler_pb2, compiler_pb2_grpc


class SampleServicer(compiler_pb2_grpc.CompilerServiceServicer):
    async def ListBlueprints(
        self,
        request: compiler_pb2.ListBlueprintsRequest,
        context: Context,
    ) -> compiler_pb2.ListBlueprintsResponse:
        await asyncio.sleep(0.5 * request.slot_kind)
        return compiler_pb2.ListBlueprintsResponse()

    async def GetKernel(
        self, request: compiler_pb2.GetKernelRequest, context: Context
    ) -> AsyncIterator[compiler_pb2.GetKernelResponse]:
        raise NotFoundError(f"no kernel {request.kernel_id!r}")
        yield  # pragma: no cover - makes this an async generator

    async def ListKernels(
        self, request: compiler_pb2.ListKernelsRequest, context: Context
    ) -> compiler_pb2.ListKernelsResponse:
        raise RuntimeError("sample bug")


class SampleService:
    service_names = [compiler_pb2.DESCRIPTOR.services_by_name["CompilerService"].full_name]

    def __init__(self, ctx: AgentContext) -> None:
        self.ctx = ctx

    def add_to_server(self, server: grpc.aio.Server) -> None:
        compiler_pb2_grpc.add_CompilerServiceServicer_to_server(SampleServicer(), server)

    async def start(self) -> None:
        if os.environ.get("SAMPLE_FAIL_AT_START") == "1":
            raise RuntimeError("sample start failure")
        self.ctx.health.update_details(sample=True)

    async def stop(self) -> None:
        return None


if __name__ == "__main__":
    run(SampleService)
