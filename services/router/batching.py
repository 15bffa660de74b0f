"""Dynamic micro-batching: when the queued requests of one version go to a replica, and how
many together. Pure: times are given in microseconds.

Requests are batched only with requests of the same *batch key* (the shapes
after the batch dimension and the dtypes of every input), since only those can
be concatenated along the batch dimension. Within a key, requests leave in
arrival order. The policy (`BatchPolicy.decide`), for the key whose oldest
request waited longest:

- nothing queued, or no replica free: wait for an arrival or a replica;
- `max_batch_size` requests queued: send a full batch;
- no batch of this version running anywhere (all its replicas idle): send what
  is queued now. Waiting would only add latency: a lone request on an idle
  server is served at once, so batching costs nothing at low load;
- the oldest request has waited `max_wait_us`: send what is queued;
- otherwise wait until the oldest has waited `max_wait_us` (or the batch fills).

Under load the replicas are busy, requests pile up while they work, and each
replica that frees up takes a batch of what accumulated: batches grow with the
load by themselves, and `max_wait_us` bounds what any request pays for them.
`max_batch_size = 1` turns batching off; `max_wait_us = 0` never waits.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["BatchDecision", "BatchPolicy", "BatchQueue"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class BatchDecision:
    """`take` requests now (0: none), else wait `wait_us` (None: until something happens)."""

    take: int
    wait_us: float | None = None


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    """Batch size and wait limits (see the module docstring)."""

    max_batch_size: int = 32
    max_wait_us: float = 500.0

    def decide(
        self, queued: int, oldest_wait_us: float, free_replicas: int, busy_replicas: int
    ) -> BatchDecision:
        """What to do with a key's `queued` requests, the oldest having waited `oldest_wait_us`."""
        if queued <= 0 or free_replicas <= 0:
            return BatchDecision(0)
        size = min(queued, self.max_batch_size)
        if queued >= self.max_batch_size or busy_replicas == 0:
            return BatchDecision(size)
        if oldest_wait_us >= self.max_wait_us:
            return BatchDecision(size)
        return BatchDecision(0, self.max_wait_us - oldest_wait_us)


@dataclass(slots=True)
class _Queued(Generic[T]):
    item: T
    enqueued_us: float


class BatchQueue(Generic[T]):
    """The queued requests of one version, by batch key, each key in arrival order."""

    def __init__(self, policy: BatchPolicy) -> None:
        self.policy = policy
        self._by_key: dict[Hashable, deque[_Queued[T]]] = {}
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def push(self, key: Hashable, item: T, now_us: float, *, front: bool = False) -> None:
        """Queue `item` under `key`; `front` puts a retried request before the others."""
        queue = self._by_key.setdefault(key, deque())
        if front:
            queue.appendleft(_Queued(item, now_us))
        else:
            queue.append(_Queued(item, now_us))
        self._size += 1

    def items(self) -> list[T]:
        """Every queued item (any order)."""
        return [q.item for queue in self._by_key.values() for q in queue]

    def remove_if(self, predicate: Callable[[T], bool]) -> list[T]:
        """Take out and return the items for which `predicate(item)` is true."""
        removed: list[T] = []
        for key in list(self._by_key):
            queue = self._by_key[key]
            kept = deque(q for q in queue if not predicate(q.item))
            removed.extend(q.item for q in queue if predicate(q.item))
            if kept:
                self._by_key[key] = kept
            else:
                del self._by_key[key]
        self._size -= len(removed)
        return removed

    def next_batch(
        self, now_us: float, free_replicas: int, busy_replicas: int
    ) -> tuple[list[T], float | None]:
        """The batch to send now (may be empty), and how long to wait when it is empty."""
        if not self._by_key:
            return [], None
        key, queue = min(self._by_key.items(), key=lambda kv: kv[1][0].enqueued_us)
        decision = self.policy.decide(
            len(queue), now_us - queue[0].enqueued_us, free_replicas, busy_replicas
        )
        if decision.take == 0:
            return [], decision.wait_us
        batch = [queue.popleft().item for _ in range(decision.take)]
        if not queue:
            del self._by_key[key]
        self._size -= len(batch)
        return batch, None
