"""Agent-to-agent channels: found through the ready key or the config, with trace context."""

from __future__ import annotations

from typing import Any

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.channels import agent_channel, open_channel
from common.config import parse_config
from common.grpc_server import GrpcServer
from tests.ports import free_port

pytestmark = pytest.mark.integration


def _config(port: int, redis_url: str) -> Any:
    return parse_config(
        {
            "version": 1,
            "machine": "mainpc",
            "infra": {"redis_url": redis_url},
            "machines": {"mainpc": {"host": "127.0.0.1"}},
            "agent_groups": {
                "core": {
                    "machine": "mainpc",
                    "agents": {
                        "registry": {"module": "x", "port": port, "health_check_port": free_port()},
                    },
                }
            },
        }
    )


async def test_agent_channel_falls_back_to_the_config_and_reaches_the_server(
    system_redis_url: str,
) -> None:
    server = GrpcServer("127.0.0.1", free_port())
    await server.start()
    try:
        cfg = _config(server.port, system_redis_url)
        async with await agent_channel(cfg, "registry") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(0.5)


async def test_open_channel_to_nothing_fails_with_unavailable() -> None:
    import grpc

    async with open_channel(f"127.0.0.1:{free_port()}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=2
            )
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
