"""One loaded version: its replicas, its request queue and batching, ejection and statistics.

A request submitted to a `ServedVersion` waits in the version's `BatchQueue`;
the version sends batches to replicas whenever the batching policy says so
(`batching`), choosing among the free, routable replicas by power of two
choices (`routing.pick_replica`). When a batch fails on a replica, the replica's
failure counts towards its ejection (`ejection`) and each request of the batch
goes back to the front of the queue to be retried on another replica, until it
has had `max_attempts` attempts; then it fails with UNAVAILABLE, so the caller
may fall back to another version.

Everything here runs on the event loop except the replicas' own threads; the
queue is pumped synchronously on each event (a request arrives, a batch ends, a
wait runs out), so a request to an idle version reaches a replica thread in the
same loop iteration it arrived in.

A one-request batch runs on the event loop itself, on its replica's module,
when that is cheaper: when the replica's compute time (EWMA) is below what the
hand-over to its thread and back costs (EWMA of the time a threaded batch takes
beyond its compute), and below `inline_max_us`, which bounds how long the loop
may be held. Small models then skip two thread wake-ups per request; larger
ones always compute on their threads, in parallel.

Cost: a batch costs `price_per_s(device) * compute seconds`, shared among its
requests by their rows. A version's cost per request (for routing) is the
smallest cost EWMA among its routable replicas; its latency is the EWMA of the
time requests spend at the version, queueing included.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import torch

from common.errors import (
    DeadlineExceededError,
    ResourceExhaustedError,
    UnavailableError,
)
from common.logging import get_logger
from common.stubs import common_pb2
from services.router.artifacts import LoadedModel
from services.router.batching import BatchPolicy, BatchQueue
from services.router.drift import DriftAccumulator, DriftReport
from services.router.ejection import EjectionPolicy, OutlierDetector
from services.router.replicas import BatchOutcome, Inputs, Replica
from services.router.routing import ReplicaLoad, pick_replica
from services.router.settings import RouterSettings
from services.router.window import Ewma, SlidingWindow

__all__ = ["Served", "ServedVersion", "VersionState", "ejection_policy"]

_log = get_logger(__name__)


class VersionState(StrEnum):
    LOADING = "loading"
    SERVING = "serving"
    DRAINING = "draining"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class Served:
    """A request's result at one version: outputs as tensors and in wire form."""

    outputs: tuple[torch.Tensor, ...]
    wire: tuple[common_pb2.Tensor, ...]
    replica_id: str
    cost: float


@dataclass(eq=False, slots=True)
class _Pending:
    inputs: Inputs
    rows: int
    key: Hashable
    future: asyncio.Future[Served]
    max_cost: float | None
    attempts: int = 0
    tried: set[str] = field(default_factory=set)
    last_error: str = ""


def ejection_policy(settings: RouterSettings) -> EjectionPolicy:
    """The ejection policy the settings describe."""
    e = settings.ejection
    return EjectionPolicy(
        consecutive_failures=e.consecutive_failures,
        base_ejection_s=e.base_ejection_s,
        multiplier=e.multiplier,
        max_ejection_s=e.max_ejection_s,
        jitter=e.jitter,
        max_ejected_share=e.max_ejected_share,
        panic_threshold=e.panic_threshold,
    )


def _batch_key(inputs: Inputs) -> Hashable:
    return tuple((tuple(t.shape[1:]), t.dtype) for t in inputs)


class ServedVersion:
    """A version of a model being served (read the module docstring)."""

    def __init__(
        self,
        name: str,
        version: int,
        model: LoadedModel,
        settings: RouterSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        on_drift: Callable[[ServedVersion, DriftReport], None] | None = None,
    ) -> None:
        self.name = name
        self.version = version
        self.model = model
        self.signature = model.signature
        self.settings = settings
        self.state = VersionState.LOADING
        self._clock = clock
        self._rng = rng or random.Random()
        self.detector = OutlierDetector(ejection_policy(settings), clock, self._rng)
        max_batch = settings.batching.max_batch_size if self.signature.batchable else 1
        self.queue: BatchQueue[_Pending] = BatchQueue(
            BatchPolicy(max_batch, float(settings.batching.max_wait_us))
        )
        retention = max(settings.stats_window_s, settings.canary.window_s)
        self.stats = SlidingWindow(retention, clock)
        self.stats_window_s = settings.stats_window_s
        self.latency_us = Ewma()
        self.replicas: dict[str, Replica] = {}
        self._inline_max_us = settings.inline_max_us
        self.handoff_us = Ewma()
        self.loaded_at = clock()
        self.last_used = clock()
        self._timer: asyncio.TimerHandle | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._on_drift = on_drift
        self._drift: DriftAccumulator | None = None
        if settings.drift.enabled and model.reference:
            self._drift = DriftAccumulator(model.reference, settings.drift.window_rows)
        self._observed_batches = 0
        self.last_drift: DriftReport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def key(self) -> tuple[str, int]:
        return self.name, self.version

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Create the replicas (spread over the devices), warm each one up, and serve."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        devices = self.settings.devices
        observe = self._observe if self._drift is not None else None
        for i in range(self.settings.replicas):
            device = devices[i % len(devices)]
            module = await asyncio.to_thread(self.model.replica_module, device)
            replica = Replica(
                f"{self.name}-v{self.version}-r{i}",
                device,
                module,
                price_per_s=self.settings.price(device),
                loop=loop,
                stats_window_s=self.stats_window_s,
                clock=self._clock,
                observe=observe,
            )
            self.replicas[replica.replica_id] = replica
            self.detector.add(replica.replica_id)
        await asyncio.gather(*(self._warm_up(r) for r in self.replicas.values()))
        self.state = VersionState.SERVING

    async def _warm_up(self, replica: Replica) -> None:
        sample = [
            torch.zeros([d if d >= 0 else 1 for d in spec.shape], dtype=spec.dtype)
            for spec in self.signature.inputs
        ]
        outcome = BatchOutcome(None, None, 0.0)
        for _ in range(2):  # the first call pays one-off costs; measure the second
            outcome = await asyncio.to_thread(replica.run_now, [sample])
            if outcome.error is not None:
                _log.warning(
                    "warm-up failed; the replica starts unmeasured",
                    replica=replica.replica_id,
                    error=repr(outcome.error),
                )
                return
        replica.latency_us.add(outcome.compute_s * 1e6)
        replica.cost.add(outcome.compute_s * replica.price_per_s)

    def resume(self) -> None:
        """Serve again after `drain` began (the version is wanted again)."""
        if self.state is VersionState.DRAINING:
            self.state = VersionState.SERVING

    async def drain(self, timeout_s: float) -> None:
        """Take no new requests, finish the queued and running ones (up to `timeout_s`), stop.

        Requests still queued when the time is up fail with UNAVAILABLE (retryable:
        the caller falls back to another version).
        """
        if self.state is VersionState.STOPPED:
            return
        self.state = VersionState.DRAINING
        try:
            async with asyncio.timeout(timeout_s):
                while len(self.queue) or self._busy_replicas():
                    self._idle.clear()
                    await self._idle.wait()
                    if self.state is not VersionState.DRAINING:
                        return  # resumed while draining
        except TimeoutError:
            _log.warning("drain timed out", model=self.name, version=self.version)
        await self.stop()

    async def stop(self) -> None:
        """Fail what is queued, end the replica threads."""
        self.state = VersionState.STOPPED
        if self._timer is not None:
            self._timer.cancel()
        for pending in self.queue.remove_if(lambda p: True):
            if not pending.future.done():
                pending.future.set_exception(
                    UnavailableError(f"{self.name} v{self.version} was unloaded")
                )
        await asyncio.gather(*(r.close() for r in self.replicas.values()))

    # -- what routing reads ----------------------------------------------------------

    def routable_replicas(self) -> list[Replica]:
        return [self.replicas[r] for r in self.detector.routable(self.replicas)]

    @property
    def available(self) -> bool:
        """Whether it takes requests now (serving, with a routable replica)."""
        return self.state is VersionState.SERVING and bool(self.routable_replicas())

    def cost_estimate(self) -> float | None:
        """The cheapest routable replica's cost per request, None while unmeasured."""
        costs = [r.cost.value for r in self.routable_replicas() if r.cost.value is not None]
        return min(costs) if costs else None

    def latency_estimate_us(self) -> float | None:
        """Time a request spends here (EWMA); before any request, the replicas' compute time."""
        if self.latency_us.value is not None:
            return self.latency_us.value
        measured = [r.latency_us.value for r in self.replicas.values() if r.latency_us.value]
        return min(measured) if measured else None

    # -- requests --------------------------------------------------------------------

    async def infer(
        self,
        inputs: Inputs,
        *,
        deadline: float | None = None,
        max_cost: float | None = None,
    ) -> Served:
        """Run one request (inputs bound to this version's signature) on some replica.

        `deadline` is on this version's clock. Raises UnavailableError when the
        version is not serving or the request failed on `max_attempts` replicas,
        ResourceExhaustedError when the queue is full, DeadlineExceededError when
        the deadline passes while it waits.
        """
        if self.state is not VersionState.SERVING:
            raise UnavailableError(f"{self.name} v{self.version} is {self.state.value}")
        if len(self.queue) >= self.settings.batching.max_queue:
            self.stats.record(0.0, 0.0, ok=False)
            raise ResourceExhaustedError(
                f"{self.name} v{self.version}: {len(self.queue)} requests queued, the limit"
            )
        started = self._clock()
        self.last_used = started
        rows = inputs[0].shape[0] if self.signature.batchable else 1
        future: asyncio.Future[Served] = asyncio.get_running_loop().create_future()
        pending = _Pending(inputs, rows, _batch_key(inputs), future, max_cost)
        self.queue.push(pending.key, pending, started * 1e6)
        self._pump()
        try:
            if deadline is None or future.done():  # done: it ran inline, in `_pump`
                served = await future
            else:
                try:
                    async with asyncio.timeout(max(0.0, deadline - started)):
                        served = await future
                except TimeoutError:
                    raise DeadlineExceededError(
                        f"deadline passed at {self.name} v{self.version}"
                    ) from None
        except asyncio.CancelledError:
            raise
        except Exception:
            self.stats.record((self._clock() - started) * 1e6, 0.0, ok=False)
            raise
        elapsed_us = (self._clock() - started) * 1e6
        self.latency_us.add(elapsed_us)
        self.stats.record(elapsed_us, served.cost, ok=True)
        return served

    def _busy_replicas(self) -> int:
        return sum(1 for r in self.replicas.values() if r.in_flight_batches)

    def _pump(self) -> None:
        """Send every batch the policy allows now; arm a timer for the next wait."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while len(self.queue):
            now = self._clock()
            free = [r for r in self.routable_replicas() if r.in_flight_batches == 0]
            batch, wait_us = self.queue.next_batch(now * 1e6, len(free), self._busy_replicas())
            if not batch:
                if wait_us is not None:
                    self._timer = asyncio.get_running_loop().call_later(wait_us / 1e6, self._pump)
                break
            batch = [p for p in batch if not p.future.done()]
            if batch:
                self._launch(self._choose(free, batch), batch)
        if not len(self.queue) and not self._busy_replicas():
            self._idle.set()

    def _choose(self, free: list[Replica], batch: list[_Pending]) -> Replica:
        tried = set().union(*(p.tried for p in batch))
        ceiling = min((p.max_cost for p in batch if p.max_cost is not None), default=None)
        pool = [r for r in free if r.replica_id not in tried] or free
        if ceiling is not None:
            pool = [r for r in pool if (r.cost.value or 0.0) <= ceiling] or pool
        loads = [ReplicaLoad(r.replica_id, r.in_flight_requests, r.latency_us.value) for r in pool]
        chosen = pick_replica(loads, self._rng)
        assert chosen is not None
        return self.replicas[chosen.replica_id]

    def _launch(self, replica: Replica, batch: list[_Pending]) -> None:
        rows = sum(p.rows for p in batch)
        for pending in batch:
            pending.attempts += 1
            pending.tried.add(replica.replica_id)
        if len(batch) == 1 and self._cheaper_inline(replica):
            # The replica is idle, so its module is free to run here.
            self._finish(replica, batch, rows, replica.run_now([batch[0].inputs], observe=True))
            return
        replica.in_flight_batches += 1
        replica.in_flight_requests += len(batch)
        sent = time.perf_counter()

        def done(outcome: BatchOutcome) -> None:
            replica.in_flight_batches -= 1
            replica.in_flight_requests -= len(batch)
            if replica.in_flight_batches == 0:  # nothing queued ahead of it on the thread
                self.handoff_us.add((time.perf_counter() - sent - outcome.compute_s) * 1e6)
            self._finish(replica, batch, rows, outcome)
            self._pump()

        replica.submit([p.inputs for p in batch], done)

    def _cheaper_inline(self, replica: Replica) -> bool:
        compute, handoff = replica.latency_us.value, self.handoff_us.value
        if compute is None or handoff is None:
            return False
        return compute < handoff and compute < self._inline_max_us

    def _finish(
        self, replica: Replica, batch: list[_Pending], rows: int, outcome: BatchOutcome
    ) -> None:
        compute_us = outcome.compute_s * 1e6
        if outcome.outputs is not None:
            self.detector.record_success(replica.replica_id)
            replica.latency_us.add(compute_us)
            batch_cost = outcome.compute_s * replica.price_per_s
            for pending, outputs in zip(batch, outcome.outputs, strict=True):
                cost = batch_cost * pending.rows / rows
                replica.cost.add(cost)
                replica.stats.record(compute_us, cost, ok=True)
                if not pending.future.done():
                    pending.future.set_result(
                        Served(outputs.tensors, outputs.wire, replica.replica_id, cost)
                    )
        else:
            ejected = self.detector.record_failure(replica.replica_id)
            error = outcome.error
            text = f"replica {replica.replica_id} failed: {type(error).__name__}: {error}"
            _log.warning(
                "batch failed", replica=replica.replica_id, ejected=ejected, error=repr(error)
            )
            retry = self.state is VersionState.SERVING
            for pending in batch:
                replica.stats.record(compute_us, 0.0, ok=False)
                pending.last_error = text
                if pending.future.done():
                    continue
                if retry and pending.attempts < self.settings.max_attempts:
                    self.queue.push(pending.key, pending, self._clock() * 1e6, front=True)
                else:
                    pending.future.set_exception(
                        UnavailableError(
                            f"{self.name} v{self.version}: {pending.attempts} attempt(s) "
                            f"failed; last: {text}"
                        )
                    )

    # -- drift -----------------------------------------------------------------------

    def _observe(self, inputs: Sequence[torch.Tensor], rows: int) -> None:
        """On a replica thread: count the batch's inputs towards drift (every n-th batch)."""
        drift = self._drift
        if drift is None:
            return
        self._observed_batches += 1
        if self._observed_batches % self.settings.drift.sample_every:
            return
        names = [s.name for s in self.signature.inputs]
        report = drift.observe(dict(zip(names, inputs, strict=True)), rows)
        if report is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._report_drift, report)

    def _report_drift(self, report: DriftReport) -> None:
        self.last_drift = report
        if self._on_drift is not None:
            self._on_drift(self, report)
