"""Ready signals and discovery through Redis.

An agent that serves announces itself with `graftmesh:ready:<agent>`, a JSON
object set with a TTL (default 15 s) and refreshed every 5 s, so the key of an
agent that dies expires by itself. Clients find an agent's address through that
key and fall back to `startup_config.yaml` when it is absent.

Redis being down never stops an agent from serving: `ReadyHeartbeat` keeps
retrying in the background and reports its state through `connected`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from datetime import UTC, datetime
from typing import Literal

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from common.config import StartupConfig
from common.errors import InvalidArgumentError, NotFoundError
from common.infra import InfraUnavailableError, redact_url
from common.logging import get_logger

__all__ = [
    "DEFAULT_READY_INTERVAL_S",
    "DEFAULT_READY_TTL_S",
    "READY_KEY_PREFIX",
    "ReadyHeartbeat",
    "ReadyInfo",
    "discover",
    "ready_key",
    "resolve_address",
]

_log = get_logger(__name__)

READY_KEY_PREFIX = "graftmesh:ready:"
DEFAULT_READY_TTL_S = 15.0
DEFAULT_READY_INTERVAL_S = 5.0

# First retry delay after a failed refresh; it doubles up to the refresh interval.
_RETRY_INITIAL_S = 0.1
# No single Redis call may hold the heartbeat (or a lookup) longer than this.
_MAX_CALL_TIMEOUT_S = 2.0


def ready_key(agent: str) -> str:
    """The Redis key of `agent`'s ready signal: `graftmesh:ready:<agent>`."""
    return READY_KEY_PREFIX + agent


class ReadyInfo(BaseModel):
    """The value of a ready key. Unknown fields are ignored, so newer writers stay readable."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    status: Literal["ready"] = "ready"
    agent: str = Field(min_length=1)
    machine: str
    host: str = Field(min_length=1)
    port: int | None = Field(None, ge=1, le=65535)
    health_check_port: int = Field(ge=1, le=65535)
    pid: int = Field(ge=1)
    timestamp: datetime


def _client(url: str, timeout_s: float) -> aioredis.Redis:
    # Callers here do their own retrying; redis-py's own retries would only hide the delay.
    return aioredis.Redis.from_url(
        url,
        socket_connect_timeout=timeout_s,
        socket_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
    )


class ReadyHeartbeat:
    """Keeps `graftmesh:ready:<agent>` set while the agent serves.

    `start()` sets the key at once when Redis answers, then refreshes it every
    `interval_s` with a TTL of `ttl_s`. While Redis is away it retries in the
    background with exponential backoff and jitter (never slower than
    `interval_s`); it never raises for Redis trouble. `stop()` deletes the key.
    """

    def __init__(
        self,
        redis_url: str,
        agent: str,
        *,
        machine: str,
        host: str,
        port: int | None,
        health_check_port: int,
        ttl_s: float = DEFAULT_READY_TTL_S,
        interval_s: float = DEFAULT_READY_INTERVAL_S,
    ) -> None:
        if interval_s <= 0 or ttl_s <= interval_s:
            raise InvalidArgumentError(
                f"need 0 < interval_s < ttl_s so the key never lapses between refreshes "
                f"(got interval_s={interval_s:g}, ttl_s={ttl_s:g})",
                "ttl_s",
            )
        self.redis_url = redis_url
        self.agent = agent
        self.machine = machine
        self.host = host
        self.port = port
        self.health_check_port = health_check_port
        self.ttl_s = ttl_s
        self.interval_s = interval_s
        self.key = ready_key(agent)
        self._call_timeout_s = min(_MAX_CALL_TIMEOUT_S, interval_s)
        self._redis: aioredis.Redis | None = None
        self._task: asyncio.Task[None] | None = None
        self._connected = False
        self._last_error: str | None = None
        self._consecutive_failures = 0
        self._stopping = False

    @property
    def connected(self) -> bool:
        """Whether the last attempt to set the key succeeded."""
        return self._connected

    @property
    def last_error(self) -> str | None:
        """Why the last attempt failed; None after a success."""
        return self._last_error

    @property
    def consecutive_failures(self) -> int:
        """Failed attempts since the last success."""
        return self._consecutive_failures

    def payload(self) -> ReadyInfo:
        """The ready signal as it is written now (fresh timestamp)."""
        return ReadyInfo(
            agent=self.agent,
            machine=self.machine,
            host=self.host,
            port=self.port,
            health_check_port=self.health_check_port,
            pid=os.getpid(),
            timestamp=datetime.now(UTC),
        )

    async def start(self) -> None:
        """Set the key now if Redis answers, and keep it fresh in the background."""
        if self._task is not None:
            return
        self._redis = _client(self.redis_url, self._call_timeout_s)
        await self._beat()
        self._task = asyncio.create_task(self._run(), name=f"ready-heartbeat:{self.agent}")

    async def stop(self) -> None:
        """Stop refreshing and delete the key (best effort: Redis may be down)."""
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._stopping = False
        client, self._redis = self._redis, None
        if client is None:
            return
        try:
            async with asyncio.timeout(self._call_timeout_s):
                await client.delete(self.key)
        except (RedisError, OSError, TimeoutError) as err:
            _log.warning("ready key not deleted", key=self.key, error=_describe(err))
        finally:
            self._connected = False
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()

    async def _beat(self) -> bool:
        assert self._redis is not None
        value = self.payload().model_dump_json()
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel from stop().
            async with asyncio.timeout(self._call_timeout_s):
                await self._redis.set(self.key, value, px=round(self.ttl_s * 1000))
        except (RedisError, OSError, TimeoutError) as err:
            self._record_failure(_describe(err))
            return False
        if not self._connected:
            _log.info(
                "ready key set",
                key=self.key,
                redis=redact_url(self.redis_url),
                after_failures=self._consecutive_failures,
            )
        self._connected = True
        self._last_error = None
        self._consecutive_failures = 0
        return True

    def _record_failure(self, error: str) -> None:
        self._consecutive_failures += 1
        if self._connected or error != self._last_error:
            _log.warning(
                "ready key not set; retrying",
                key=self.key,
                redis=redact_url(self.redis_url),
                error=error,
                failures=self._consecutive_failures,
            )
        self._connected = False
        self._last_error = error

    def _next_delay(self) -> float:
        if self._connected:
            return self.interval_s
        exponent = min(self._consecutive_failures - 1, 30)
        ceiling = min(self.interval_s, _RETRY_INITIAL_S * 2**exponent)
        # Jitter keeps a mesh of agents from hammering a Redis that just came back in step.
        return random.uniform(ceiling / 2, ceiling)

    async def _run(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self._next_delay())
            try:
                await self._beat()
            except Exception as err:
                # Anything unexpected is a bug, but it must not end the heartbeat.
                self._record_failure(_describe(err))


def _describe(err: BaseException) -> str:
    text = str(err)
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


async def discover(
    redis: str | aioredis.Redis, agent: str, timeout_s: float = 1.0
) -> ReadyInfo | None:
    """`agent`'s ready signal, or None when it has none (a malformed value counts as none).

    `redis` is a URL or a client (left open). Raises InfraUnavailableError when
    Redis does not answer within `timeout_s`.
    """
    key = ready_key(agent)
    client = _client(redis, timeout_s) if isinstance(redis, str) else redis
    try:
        async with asyncio.timeout(timeout_s):
            raw = await client.get(key)
    except (RedisError, OSError, TimeoutError) as err:
        where = redact_url(redis) if isinstance(redis, str) else "the given client"
        raise InfraUnavailableError(
            f"Redis at {where} did not answer for {key}: {_describe(err)}"
        ) from err
    finally:
        if isinstance(redis, str):
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()
    if raw is None:
        return None
    try:
        info = ReadyInfo.model_validate_json(raw)
    except ValidationError as err:
        _log.warning("malformed ready key ignored", key=key, error=str(err), value=repr(raw)[:200])
        return None
    if info.agent != agent:
        _log.warning("ready key names another agent; ignored", key=key, agent=info.agent)
        return None
    return info


async def resolve_address(
    cfg: StartupConfig, agent: str, redis: str | aioredis.Redis | None = None
) -> tuple[str, int]:
    """Where `agent` serves gRPC: its ready key first, else its machine's host and port.

    `redis` defaults to `cfg.infra.redis_url`; when Redis is down the config is
    used. Raises NotFoundError when the agent has no gRPC port or is unknown.
    """
    try:
        info = await discover(redis if redis is not None else cfg.infra.redis_url, agent)
    except InfraUnavailableError as err:
        _log.warning("ready key lookup failed; using the config", agent=agent, error=str(err))
        info = None
    if info is not None:
        if info.port is None:
            raise NotFoundError(f"agent {agent!r} serves no gRPC port (its ready key has none)")
        return info.host, info.port
    agents = cfg.agents()
    if agent not in agents:
        raise NotFoundError(
            f"agent {agent!r} has no ready key and is not in the config "
            f"(known: {', '.join(sorted(agents)) or 'none'})"
        )
    found = agents[agent]
    if found.spec.port is None:
        raise NotFoundError(f"agent {agent!r} has no gRPC port in the config")
    return found.host, found.spec.port
