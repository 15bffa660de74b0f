"""Shared fixtures: real NATS (JetStream) and Redis, both the system ones and embedded ones.

`nats_url` and `redis_url` are parametrized over `system` and `embedded` through one
`infra_kind` parameter, so a test that uses either or both runs once against the
system servers (127.0.0.1:4222 / :6379, skipped when unreachable) and once against
bundled servers started once per session on free ports.

Servers are shared, so tests must not collide: use `unique_name` for agent names,
subjects and keys, and never flush a database.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ports import free_port

__all__ = ["free_port"]

SYSTEM_NATS_URL = os.environ.get("GRAFTMESH_TEST_NATS_URL", "nats://127.0.0.1:4222")
# A database of its own on the system Redis, away from db 0 that a running mesh uses.
TEST_REDIS_DB = int(os.environ.get("GRAFTMESH_TEST_REDIS_DB", "15"))
SYSTEM_REDIS_URL = os.environ.get(
    "GRAFTMESH_TEST_REDIS_URL", f"redis://127.0.0.1:6379/{TEST_REDIS_DB}"
)


@pytest.fixture(scope="session")
def system_nats_url() -> str:
    """The system NATS on the standard port (JetStream on); skips the test when unreachable."""
    from common.infra import probe_nats

    if not asyncio.run(probe_nats(SYSTEM_NATS_URL, timeout_s=2.0)):
        pytest.skip(f"system NATS with JetStream not reachable at {SYSTEM_NATS_URL}")
    return SYSTEM_NATS_URL


@pytest.fixture(scope="session")
def system_redis_url() -> str:
    """The system Redis on the standard port (test database); skips when unreachable."""
    from common.infra import probe_redis

    if not asyncio.run(probe_redis(SYSTEM_REDIS_URL, timeout_s=2.0)):
        pytest.skip(f"system Redis not reachable at {SYSTEM_REDIS_URL}")
    return SYSTEM_REDIS_URL


@pytest.fixture(scope="session")
def embedded_infra_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run dir (logs, data) of the session's embedded servers."""
    return tmp_path_factory.mktemp("embedded-infra")


@pytest.fixture(scope="session")
def embedded_nats_url(embedded_infra_dir: Path) -> Iterator[str]:
    """A bundled nats-server (JetStream on) on a free loopback port, started once per session."""
    from common.infra import EmbeddedServer

    server = EmbeddedServer.nats("127.0.0.1", free_port(), embedded_infra_dir)
    asyncio.run(server.start())
    try:
        yield server.url
    finally:
        asyncio.run(server.stop())


@pytest.fixture(scope="session")
def embedded_redis_url(embedded_infra_dir: Path) -> Iterator[str]:
    """A bundled redis-server on a free loopback port, started once per session (test db)."""
    from common.infra import EmbeddedServer

    port = free_port()
    server = EmbeddedServer.redis("127.0.0.1", port, embedded_infra_dir)
    asyncio.run(server.start())
    try:
        yield f"redis://127.0.0.1:{port}/{TEST_REDIS_DB}"
    finally:
        asyncio.run(server.stop())


@pytest.fixture(params=["system", "embedded"])
def infra_kind(request: pytest.FixtureRequest) -> str:
    """Which servers `nats_url` / `redis_url` point at in this run of the test."""
    kind: str = request.param
    return kind


@pytest.fixture
def nats_url(request: pytest.FixtureRequest, infra_kind: str) -> str:
    """A NATS URL with JetStream enabled: the system one or the session's embedded one."""
    url: str = request.getfixturevalue(f"{infra_kind}_nats_url")
    return url


@pytest.fixture
def redis_url(request: pytest.FixtureRequest, infra_kind: str) -> str:
    """A Redis URL (test database): the system one or the session's embedded one."""
    url: str = request.getfixturevalue(f"{infra_kind}_redis_url")
    return url


@pytest.fixture
def unique_name() -> str:
    """A name no other test uses (agent names, subjects, key prefixes): `t` + 12 hex digits."""
    return f"t{uuid.uuid4().hex[:12]}"
