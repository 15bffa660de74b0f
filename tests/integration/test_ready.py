"""Ready keys, the heartbeat and discovery, against real Redis servers."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from common.config import StartupConfig, parse_config
from common.errors import InvalidArgumentError, NotFoundError
from common.infra import EmbeddedServer, InfraUnavailableError
from common.ready import (
    DEFAULT_READY_INTERVAL_S,
    DEFAULT_READY_TTL_S,
    READY_KEY_PREFIX,
    ReadyHeartbeat,
    ReadyInfo,
    discover,
    ready_key,
    resolve_address,
)
from tests.ports import free_port
from tests.wait import eventually

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    # Timeouts make a stuck call fail the test with a reason instead of hanging it.
    client = aioredis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
    yield client
    await client.aclose()


def _heartbeat(redis_url: str, agent: str, **kwargs: Any) -> ReadyHeartbeat:
    return ReadyHeartbeat(
        redis_url,
        agent,
        machine="mainpc",
        host="127.0.0.1",
        port=50051,
        health_check_port=50151,
        **kwargs,
    )


def _config(agent: str, port: int | None, host: str = "127.0.0.9") -> StartupConfig:
    spec: dict[str, Any] = {"module": "services.registry", "health_check_port": 50151}
    if port is not None:
        spec["port"] = port
    return parse_config(
        {
            "version": 1,
            "machine": "mainpc",
            "machines": {"mainpc": {"host": host}},
            "agent_groups": {"core": {"machine": "mainpc", "agents": {agent: spec}}},
        }
    )


def _payload(agent: str, **overrides: Any) -> str:
    value = {
        "status": "ready",
        "agent": agent,
        "machine": "pc2",
        "host": "127.0.0.5",
        "port": 40001,
        "health_check_port": 40101,
        "pid": 4242,
        "timestamp": "2026-01-02T03:04:05+00:00",
        **overrides,
    }
    return json.dumps(value)


def test_ready_key_has_the_contract_prefix() -> None:
    assert READY_KEY_PREFIX == "graftmesh:ready:"
    assert ready_key("trainer") == "graftmesh:ready:trainer"


def test_heartbeat_defaults_follow_the_contract() -> None:
    assert (DEFAULT_READY_TTL_S, DEFAULT_READY_INTERVAL_S) == (15.0, 5.0)
    hb = _heartbeat("redis://127.0.0.1:1/0", "a")
    assert (hb.ttl_s, hb.interval_s) == (15.0, 5.0)


@pytest.mark.parametrize(("ttl_s", "interval_s"), [(5.0, 5.0), (1.0, 2.0), (1.0, 0.0)])
def test_heartbeat_refuses_a_ttl_that_would_lapse_between_refreshes(
    ttl_s: float, interval_s: float
) -> None:
    with pytest.raises(InvalidArgumentError, match="interval_s < ttl_s"):
        _heartbeat("redis://127.0.0.1:1/0", "a", ttl_s=ttl_s, interval_s=interval_s)


async def test_heartbeat_sets_the_key_with_ttl_at_start(
    redis_url: str, redis: aioredis.Redis, unique_name: str
) -> None:
    hb = _heartbeat(redis_url, unique_name, ttl_s=15.0)
    await hb.start()
    try:
        assert hb.connected
        assert hb.last_error is None
        raw = await redis.get(ready_key(unique_name))
        assert raw is not None
        value = json.loads(raw)
        assert set(value) == {
            "status",
            "agent",
            "machine",
            "host",
            "port",
            "health_check_port",
            "pid",
            "timestamp",
        }
        assert value["status"] == "ready"
        assert value["agent"] == unique_name
        assert (value["host"], value["port"], value["health_check_port"]) == (
            "127.0.0.1",
            50051,
            50151,
        )
        assert 0 < await redis.pttl(ready_key(unique_name)) <= 15_000
    finally:
        await hb.stop()


async def test_heartbeat_refreshes_the_key(
    redis_url: str, redis: aioredis.Redis, unique_name: str
) -> None:
    hb = _heartbeat(redis_url, unique_name, ttl_s=0.5, interval_s=0.1)
    await hb.start()
    try:
        key = ready_key(unique_name)
        raw = await redis.get(key)
        assert raw is not None
        first = json.loads(raw)["timestamp"]

        async def timestamp_changed() -> bool:
            raw = await redis.get(key)
            return raw is not None and json.loads(raw)["timestamp"] != first

        await eventually(timestamp_changed, 3.0, "a refresh of the ready key")
        # Outliving the first TTL shows the refreshes also renew the expiry.
        outlived = time.monotonic() + 0.7

        async def outlived_first_ttl() -> bool:
            assert await redis.exists(key), "the ready key lapsed while the heartbeat ran"
            return time.monotonic() >= outlived

        await eventually(outlived_first_ttl, 3.0, "the key outliving its first TTL")
    finally:
        await hb.stop()


async def test_stop_deletes_the_key(
    redis_url: str, redis: aioredis.Redis, unique_name: str
) -> None:
    hb = _heartbeat(redis_url, unique_name)
    await hb.start()
    assert await redis.exists(ready_key(unique_name))
    await hb.stop()
    assert not await redis.exists(ready_key(unique_name))
    assert not hb.connected


_DYING_AGENT = textwrap.dedent(
    """
    import asyncio, sys
    from common.ready import ReadyHeartbeat

    async def main() -> None:
        hb = ReadyHeartbeat(sys.argv[1], sys.argv[2], machine="mainpc", host="127.0.0.1",
                            port=None, health_check_port=50151, ttl_s=0.5, interval_s=0.1)
        await hb.start()
        print("connected" if hb.connected else "not connected", flush=True)
        await asyncio.sleep(120)

    asyncio.run(main())
    """
)


async def test_dead_agents_key_expires_by_itself(
    redis_url: str, redis: aioredis.Redis, unique_name: str
) -> None:
    key = ready_key(unique_name)
    agent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _DYING_AGENT, redis_url, unique_name, cwd=REPO_ROOT
    )
    try:

        async def key_set() -> bool:
            assert agent.returncode is None, f"agent exited with {agent.returncode}"
            return bool(await redis.exists(key))

        await eventually(key_set, 20.0, "the agent's ready key appearing")
        agent.send_signal(signal.SIGKILL)
        await asyncio.wait_for(agent.wait(), 5)

        async def key_gone() -> bool:
            return not await redis.exists(key)

        await eventually(key_gone, 5.0, "the dead agent's key expiring")
    finally:
        if agent.returncode is None:
            agent.kill()
            await agent.wait()


async def test_heartbeat_survives_redis_down_and_sets_key_once_it_is_up(
    tmp_path: Path, unique_name: str
) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    hb = _heartbeat(url, unique_name, ttl_s=2.0, interval_s=0.5)
    await hb.start()
    server = EmbeddedServer.redis("127.0.0.1", port, tmp_path)
    try:
        assert not hb.connected
        assert hb.last_error is not None

        async def retried() -> bool:
            return hb.consecutive_failures >= 3

        await eventually(retried, 5.0, "three failed attempts")
        assert not hb.connected

        await server.start()
        client = aioredis.Redis.from_url(url)
        try:

            async def key_set() -> bool:
                return bool(await client.exists(ready_key(unique_name)))

            await eventually(key_set, 5.0, "the ready key appearing once Redis is up")
            assert hb.connected
            assert hb.consecutive_failures == 0
            assert hb.last_error is None
        finally:
            await client.aclose()
    finally:
        await hb.stop()
        await server.stop()


async def test_heartbeat_stop_with_redis_down_does_not_raise(unique_name: str) -> None:
    hb = _heartbeat(f"redis://127.0.0.1:{free_port()}/0", unique_name)
    await hb.start()
    await hb.stop()
    assert not hb.connected


async def test_discover_returns_the_ready_info(
    redis_url: str, redis: aioredis.Redis, unique_name: str
) -> None:
    hb = _heartbeat(redis_url, unique_name)
    await hb.start()
    try:
        info = await discover(redis_url, unique_name)
        assert isinstance(info, ReadyInfo)
        assert (info.agent, info.machine, info.host, info.port) == (
            unique_name,
            "mainpc",
            "127.0.0.1",
            50051,
        )
        assert info.pid > 0
        # A client passed in works the same, and is left open.
        assert await discover(redis, unique_name) == info
        assert await redis.ping()
    finally:
        await hb.stop()


async def test_discover_returns_none_without_a_key(redis_url: str, unique_name: str) -> None:
    assert await discover(redis_url, unique_name) is None


@pytest.mark.parametrize(
    "value",
    [
        "not json",
        json.dumps(["ready"]),
        _payload("AGENT", status="starting"),
        _payload("AGENT", port="x"),
        json.dumps({"status": "ready", "agent": "AGENT"}),
        _payload("someone-else"),
    ],
    ids=["not-json", "not-object", "bad-status", "bad-port", "missing-fields", "other-agent"],
)
async def test_malformed_ready_value_counts_as_absent(
    redis_url: str, redis: aioredis.Redis, unique_name: str, value: str
) -> None:
    key = ready_key(unique_name)
    await redis.set(key, value.replace("AGENT", unique_name), ex=30)
    try:
        assert await discover(redis_url, unique_name) is None
    finally:
        await redis.delete(key)


async def test_discover_accepts_unknown_extra_fields(
    redis_url: str, redis: aioredis.Redis, unique_name: str
) -> None:
    key = ready_key(unique_name)
    await redis.set(key, _payload(unique_name, zone="b"), ex=30)
    try:
        info = await discover(redis_url, unique_name)
        assert info is not None
        assert info.port == 40001
    finally:
        await redis.delete(key)


async def test_discover_with_redis_down_raises_unavailable(unique_name: str) -> None:
    with pytest.raises(InfraUnavailableError, match="did not answer"):
        await discover(f"redis://127.0.0.1:{free_port()}/0", unique_name, timeout_s=0.5)


async def test_resolve_address_prefers_the_ready_key(
    redis_url: str, redis: aioredis.Redis, unique_name: str
) -> None:
    key = ready_key(unique_name)
    await redis.set(key, _payload(unique_name), ex=30)
    try:
        cfg = _config(unique_name, port=50051)
        assert await resolve_address(cfg, unique_name, redis=redis_url) == ("127.0.0.5", 40001)
    finally:
        await redis.delete(key)


async def test_resolve_address_falls_back_to_the_config(redis_url: str, unique_name: str) -> None:
    cfg = _config(unique_name, port=50051)
    assert await resolve_address(cfg, unique_name, redis=redis_url) == ("127.0.0.9", 50051)


async def test_resolve_address_uses_the_config_when_redis_is_down(unique_name: str) -> None:
    cfg = _config(unique_name, port=50051)
    dead = f"redis://127.0.0.1:{free_port()}/0"
    assert await resolve_address(cfg, unique_name, redis=dead) == ("127.0.0.9", 50051)


async def test_resolve_address_reads_the_configs_redis_by_default(
    redis_url: str, redis: aioredis.Redis, unique_name: str
) -> None:
    key = ready_key(unique_name)
    await redis.set(key, _payload(unique_name), ex=30)
    try:
        cfg = _config(unique_name, port=50051)
        cfg = cfg.model_copy(
            update={"infra": cfg.infra.model_copy(update={"redis_url": redis_url})}
        )
        assert await resolve_address(cfg, unique_name) == ("127.0.0.5", 40001)
    finally:
        await redis.delete(key)


async def test_resolve_address_of_an_agent_without_port_is_not_found(
    redis_url: str, redis: aioredis.Redis, unique_name: str
) -> None:
    cfg = _config(unique_name, port=None)
    with pytest.raises(NotFoundError, match="no gRPC port in the config"):
        await resolve_address(cfg, unique_name, redis=redis_url)
    key = ready_key(unique_name)
    await redis.set(key, _payload(unique_name, port=None), ex=30)
    try:
        with pytest.raises(NotFoundError, match="serves no gRPC port"):
            await resolve_address(cfg, unique_name, redis=redis_url)
    finally:
        await redis.delete(key)


async def test_resolve_address_of_an_unknown_agent_is_not_found(
    redis_url: str, unique_name: str
) -> None:
    cfg = _config("registry", port=50051)
    with pytest.raises(NotFoundError, match="not in the config"):
        await resolve_address(cfg, unique_name, redis=redis_url)
