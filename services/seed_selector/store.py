"""Where the seed selector keeps its state across restarts: the `SelectorStore` boundary.

The store holds opaque JSON documents and knows nothing of bandits:

- one job document per job (scope) id;
- one arm document per `(job_id, slot_id, blueprint)`;
- one decision document per decision id, kept for a TTL.

`SelectorStore` is the whole of that surface. `InMemorySelectorStore` keeps the
documents in the process (tests, a mesh without Redis); `RedisSelectorStore` keeps
them in Redis under a key prefix (default `graftmesh:selector:`):

```
<prefix>jobs                          SET    ids of the jobs stored
<prefix>job:<job_id>                  STRING job document (JSON)
<prefix>arms:<job_id>                 SET    the keys of the job's arm documents
<prefix>arm:<job_id>:<slot>:<bp>      STRING arm document (JSON)
<prefix>decision:<decision_id>        STRING decision document (JSON), with a TTL
```

In key names, `%` and `:` inside ids are written `%25` and `%3A`, so any ids map to
distinct keys. One store is written by one selector process at a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from common.errors import UnavailableError

__all__ = [
    "DEFAULT_KEY_PREFIX",
    "InMemorySelectorStore",
    "RedisSelectorStore",
    "SelectorStore",
    "StoreWrite",
    "StoredJob",
]

DEFAULT_KEY_PREFIX = "graftmesh:selector:"

ArmDocKey = tuple[str, str, str]  # (job_id, slot_id, blueprint)


@dataclass(frozen=True, slots=True)
class StoredJob:
    """A job as stored: its job document and its arms' documents (in no set order)."""

    job: str
    arms: list[str]


@dataclass(slots=True)
class StoreWrite:
    """One batch of changes, applied in order: deletions first, then puts.

    `delete_all_jobs` deletes every stored job (its job and arm documents);
    `delete_jobs` the named ones. Decision documents are never deleted here: they
    expire `decision_ttl_s` after they were last put.
    """

    delete_all_jobs: bool = False
    delete_jobs: set[str] = field(default_factory=set)
    jobs: dict[str, str] = field(default_factory=dict)
    arms: dict[ArmDocKey, str] = field(default_factory=dict)
    decisions: dict[str, str] = field(default_factory=dict)
    decision_ttl_s: float = 86400.0

    def is_empty(self) -> bool:
        """Whether applying this batch would change nothing."""
        return not (
            self.delete_all_jobs or self.delete_jobs or self.jobs or self.arms or self.decisions
        )

    def size(self) -> int:
        """How many documents or deletions the batch holds."""
        return (
            int(self.delete_all_jobs)
            + len(self.delete_jobs)
            + len(self.jobs)
            + len(self.arms)
            + len(self.decisions)
        )


class SelectorStore(Protocol):
    """The seed selector's persistence, the whole of that surface.

    Every method raises `UnavailableError` when the backend cannot be reached.
    """

    async def apply(self, write: StoreWrite) -> None:
        """Apply one batch; a backend with transactions applies it all or nothing."""

    async def load_job(self, job_id: str) -> StoredJob | None:
        """The job's documents, or None when no job document is stored for it."""

    async def get_decision(self, decision_id: str) -> str | None:
        """The decision document, or None when unknown or expired."""

    async def aclose(self) -> None:
        """Release connections; the stored documents stay."""


class InMemorySelectorStore:
    """A `SelectorStore` in this process's memory; what it holds dies with it.

    `clock` (monotonic seconds) decides decision expiry, so tests can move time.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._jobs: dict[str, str] = {}
        self._arms: dict[str, dict[tuple[str, str], str]] = {}
        self._decisions: dict[str, tuple[str, float]] = {}

    async def apply(self, write: StoreWrite) -> None:
        """See `SelectorStore.apply`."""
        if write.delete_all_jobs:
            self._jobs.clear()
            self._arms.clear()
        for job_id in write.delete_jobs:
            self._jobs.pop(job_id, None)
            self._arms.pop(job_id, None)
        self._jobs.update(write.jobs)
        for (job_id, slot_id, blueprint), doc in write.arms.items():
            self._arms.setdefault(job_id, {})[(slot_id, blueprint)] = doc
        expires = self._clock() + write.decision_ttl_s
        for decision_id, doc in write.decisions.items():
            self._decisions[decision_id] = (doc, expires)

    async def load_job(self, job_id: str) -> StoredJob | None:
        """See `SelectorStore.load_job`."""
        job = self._jobs.get(job_id)
        if job is None:
            return None
        return StoredJob(job, list(self._arms.get(job_id, {}).values()))

    async def get_decision(self, decision_id: str) -> str | None:
        """See `SelectorStore.get_decision`."""
        entry = self._decisions.get(decision_id)
        if entry is None:
            return None
        if self._clock() >= entry[1]:
            del self._decisions[decision_id]
            return None
        return entry[0]

    async def aclose(self) -> None:
        """See `SelectorStore.aclose`; nothing to release."""


class RedisSelectorStore:
    """A `SelectorStore` in Redis (redis.asyncio), keys as in the module docstring.

    Each `apply` is one MULTI/EXEC transaction. Failed commands are not retried
    here: the selector queues the batch and writes it again later.
    """

    def __init__(
        self, client: aioredis.Redis, *, prefix: str = DEFAULT_KEY_PREFIX, owns_client: bool = False
    ) -> None:
        self._redis = client
        self._prefix = prefix
        self._owns_client = owns_client

    @classmethod
    def from_url(
        cls, url: str, *, prefix: str = DEFAULT_KEY_PREFIX, timeout_s: float = 1.0
    ) -> RedisSelectorStore:
        """A store on its own client for `url`, with socket timeouts and no retries."""
        client = aioredis.Redis.from_url(
            url,
            socket_connect_timeout=timeout_s,
            socket_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
            decode_responses=True,
        )
        return cls(client, prefix=prefix, owns_client=True)

    @property
    def prefix(self) -> str:
        """The prefix of every key this store uses."""
        return self._prefix

    def _job_key(self, job_id: str) -> str:
        return f"{self._prefix}job:{_part(job_id)}"

    def _arms_key(self, job_id: str) -> str:
        return f"{self._prefix}arms:{_part(job_id)}"

    def _arm_key(self, job_id: str, slot_id: str, blueprint: str) -> str:
        return f"{self._prefix}arm:{_part(job_id)}:{_part(slot_id)}:{_part(blueprint)}"

    def _decision_key(self, decision_id: str) -> str:
        return f"{self._prefix}decision:{_part(decision_id)}"

    async def apply(self, write: StoreWrite) -> None:
        """See `SelectorStore.apply`."""
        jobs_key = f"{self._prefix}jobs"
        try:
            doomed = set(write.delete_jobs)
            if write.delete_all_jobs:
                doomed.update(_text(m) for m in await self._redis.smembers(jobs_key))
            doomed_keys: list[str] = []
            if doomed:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for job_id in doomed:
                        pipe.smembers(self._arms_key(job_id))
                    arm_sets: list[set[Any]] = await pipe.execute()
                for job_id, members in zip(doomed, arm_sets, strict=True):
                    doomed_keys += [self._job_key(job_id), self._arms_key(job_id)]
                    doomed_keys += [_text(m) for m in members]
            async with self._redis.pipeline(transaction=True) as pipe:
                if doomed_keys:
                    pipe.delete(*doomed_keys)
                    pipe.srem(jobs_key, *doomed)
                for job_id, doc in write.jobs.items():
                    pipe.set(self._job_key(job_id), doc)
                    pipe.sadd(jobs_key, job_id)
                for (job_id, slot_id, blueprint), doc in write.arms.items():
                    key = self._arm_key(job_id, slot_id, blueprint)
                    pipe.set(key, doc)
                    pipe.sadd(self._arms_key(job_id), key)
                ttl_ms = max(1, round(write.decision_ttl_s * 1000))
                for decision_id, doc in write.decisions.items():
                    pipe.set(self._decision_key(decision_id), doc, px=ttl_ms)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise UnavailableError(f"redis: {type(exc).__name__}: {exc}") from exc

    async def load_job(self, job_id: str) -> StoredJob | None:
        """See `SelectorStore.load_job`."""
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.get(self._job_key(job_id))
                pipe.smembers(self._arms_key(job_id))
                job, members = await pipe.execute()
            if job is None:
                return None
            keys = sorted(_text(m) for m in members)
            docs = await self._redis.mget(keys) if keys else []
        except (RedisError, OSError) as exc:
            raise UnavailableError(f"redis: {type(exc).__name__}: {exc}") from exc
        return StoredJob(_text(job), [_text(d) for d in docs if d is not None])

    async def get_decision(self, decision_id: str) -> str | None:
        """See `SelectorStore.get_decision`."""
        try:
            doc = await self._redis.get(self._decision_key(decision_id))
        except (RedisError, OSError) as exc:
            raise UnavailableError(f"redis: {type(exc).__name__}: {exc}") from exc
        return None if doc is None else _text(doc)

    async def aclose(self) -> None:
        """See `SelectorStore.aclose`; closes the client only when this store made it."""
        if self._owns_client:
            await self._redis.aclose()


def _part(name: str) -> str:
    return name.replace("%", "%25").replace(":", "%3A")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
