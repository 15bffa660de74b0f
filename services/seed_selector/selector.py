"""The seed selector: which (slot, blueprint) a job should grow next, and learning from it.

Two layers:

- `SelectorCore` is synchronous and does no I/O. `decide` filters the offered arms
  (`check_eligibility`), lets a strategy (`choose`) pick one from the job's evidence
  and remembers the decision as pending; `record` adds a reported reward to the
  evidence. It marks what changed, and `take_writes` turns that into a `StoreWrite`.
- `SeedSelector` is the asynchronous edge around it: it loads a job's state from the
  `SelectorStore` on first use, calls the core, and persists the changes. With
  `write_behind_s = 0` (the default) it writes them through before answering
  (awaited, bounded by `store_timeout_s`), so a returned decision survives any
  restart. With `write_behind_s > 0` it answers at once and a background flush
  writes what changed meanwhile, coalesced into one batch, within `write_behind_s`:
  after half of it, as soon as the next call has been answered (the caller is busy
  reading the answer then, so the batch does not hold up its next request), or
  after the other half when no call comes (and on `aclose`). A graceful stop loses
  nothing; a crash loses what was decided or reported in the last `write_behind_s`
  plus one store round trip: a decision from then is unknown after the restart (its
  Report is `NotFoundError`), and a reward from then is not counted. Either way, a
  Report for a decision made before a restart still counts once the decision reached
  the store.

When the store cannot be reached the selector goes on deciding from memory: changes
stay queued (coalesced per document) and are written on the next successful flush,
tried again at most every `store_retry_interval_s`; `degraded_reason` says why
meanwhile. A job first used while the store was away starts from empty evidence;
its reported outcomes are journaled, and once the store answers again they are
replayed onto the stored state of the job, so neither side's outcomes are lost.

Decisions and reports:

- Every eligible arm gets a score (`Decision.scores`); arms never reported score
  `+inf` and are tried first. Ties and random draws come from one seeded generator
  per job (`numpy` PCG64, seed from `SelectorConfig.seed` and the job id, or
  `JobSettings.seed`), persisted with the job, so the same seed and history give the
  same decisions, across restarts too.
- No eligible arm: the decision has `arm=None` and a reason naming each rule broken;
  nothing is chosen by default and nothing is pending (reporting it: `NotFoundError`).
- `report` on an unknown (or expired, or reset) decision id raises `NotFoundError`.
  Reporting a decision again with the same reward is idempotent (answers
  `duplicate=True`, counts once), so a client may retry; with a different reward it
  raises `FailedPreconditionError`. Reported decisions are remembered for the
  decision TTL for that purpose.
- Every outcome updates every model of the arm (means, Beta counts and the LinUCB
  regression on the slot's context at decision time), so the strategy may change
  from one request to the next.
- The job's feature names are fixed once: by `JobSettings.features`, else
  `SelectorConfig.features`, else the sorted names in the job's first context. A
  context naming another feature is `InvalidArgumentError`; a missing one counts 0.
- An empty job id is the shared scope `GLOBAL_SCOPE` ("global").
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import os
import random
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from common.errors import (
    FailedPreconditionError,
    GraftmeshError,
    IntegrityError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from common.logging import get_logger
from services.seed_selector.eligibility import (
    ArmOffer,
    Budget,
    Concurrency,
    Ineligibility,
    check_eligibility,
)
from services.seed_selector.store import SelectorStore, StoredJob, StoreWrite
from services.seed_selector.strategies import Strategy, StrategyParams, choose
from services.seed_selector.tracker import GLOBAL_SCOPE, Arm, ArmStats, DecayConfig, JobTracker

__all__ = [
    "ArmSummary",
    "Decision",
    "JobSettings",
    "JobStats",
    "ReportOutcome",
    "SeedSelector",
    "SelectorConfig",
    "SelectorCore",
]

_FORMAT_VERSION = 1
_T = TypeVar("_T")
_log = get_logger(__name__)
_UNBOUNDED_BUDGET = Budget()
_UNBOUNDED_CONCURRENCY = Concurrency()


class SelectorConfig(BaseModel):
    """Settings of a seed selector (every job), validated on construction."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    strategy: Strategy = Field(
        Strategy.THOMPSON, description="strategy when neither the request nor the job names one"
    )
    params: StrategyParams = StrategyParams()
    decay: DecayConfig = DecayConfig()
    features: tuple[str, ...] = Field(
        (), description="context feature names of every job; empty: from the first context"
    )
    linucb_ridge: float = Field(1.0, gt=0, description="LinUCB ridge regulariser lambda")
    linucb_intercept: bool = Field(True, description="prepend a constant 1 to context vectors")
    seed: int = Field(0, ge=0, description="seed of every job's generator (mixed with the job id)")
    decision_ttl_s: float = Field(86400.0, gt=0, description="how long a decision can be reported")
    max_pending_decisions: int = Field(
        100_000, ge=1, description="decisions remembered in memory; the oldest go first"
    )
    store_timeout_s: float = Field(1.0, gt=0, description="limit of one store round trip")
    store_retry_interval_s: float = Field(
        1.0, ge=0, description="while the store is away, try it at most this often"
    )
    max_journal: int = Field(
        10_000, ge=0, description="outcomes kept per job started while the store was away"
    )
    write_behind_s: float = Field(
        0.0,
        ge=0,
        le=60,
        description="0: every call waits for its writes; > 0: calls answer at once and a "
        "background flush writes their changes about this long later (see the module "
        "docstring for what a crash then loses)",
    )


class JobSettings(BaseModel):
    """Per-job overrides; None keeps the selector's setting."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    strategy: Strategy | None = None
    features: tuple[str, ...] | None = None
    seed: int | None = Field(None, ge=0)


@dataclass(slots=True)
class Decision:
    """A selection: the arm to grow (None: none eligible), why, and every arm's standing.

    `scores` has every eligible arm's score (`+inf`: never reported, tried first);
    `ineligible` every other offered arm with each rule it broke. Read-only by
    convention: results built on every decision are not frozen dataclasses, which
    cost four times as much to build.
    """

    decision_id: str
    job_id: str
    arm: Arm | None
    reason: str
    strategy: Strategy
    scores: dict[Arm, float]
    ineligible: dict[Arm, tuple[Ineligibility, ...]]
    created_at: float


@dataclass(slots=True)
class ReportOutcome:
    """What a report did; `duplicate` when the same report had been counted already."""

    decision_id: str
    job_id: str
    arm: Arm
    reward: float
    duplicate: bool


@dataclass(frozen=True, slots=True)
class ArmSummary:
    """One arm's evidence, discounted to the time of the query."""

    slot_id: str
    blueprint: str
    pulls: int
    weight: float
    mean: float
    successes: float
    failures: float
    last_update: float | None


@dataclass(frozen=True, slots=True)
class JobStats:
    """A job's standing: decisions made, outcomes reported, and each arm's evidence."""

    job_id: str
    strategy: Strategy
    decisions: int
    reports: int
    features: tuple[str, ...]
    arms: tuple[ArmSummary, ...]


class _Job:
    __slots__ = (
        "decisions",
        "features_fixed",
        "generation",
        "journal",
        "rng",
        "scope",
        "seed",
        "strategy",
        "synced",
        "tracker",
    )

    def __init__(
        self,
        scope: str,
        tracker: JobTracker,
        seed: int,
        *,
        generation: str,
        synced: bool,
        max_journal: int,
    ) -> None:
        self.scope = scope
        self.tracker = tracker
        self.seed = seed
        self.generation = generation
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.strategy: Strategy | None = None
        self.decisions = 0
        self.features_fixed = False
        self.synced = synced
        # (arm, reward, context, time) of outcomes recorded while not synced
        self.journal: deque[tuple[Arm, float, tuple[float, ...] | None, float]] = deque(
            maxlen=max_journal
        )


@dataclass(slots=True)
class _Pending:
    decision_id: str
    job_id: str
    generation: str
    arm: Arm
    strategy: Strategy
    x: tuple[float, ...]  # the slot's context vector at decision time
    created_at: float
    reward: float | None = None
    reported_at: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {
                "v": _FORMAT_VERSION,
                "decision_id": self.decision_id,
                "job_id": self.job_id,
                "generation": self.generation,
                "slot_id": self.arm.slot_id,
                "blueprint": self.arm.blueprint,
                "strategy": self.strategy.value,
                "x": list(self.x),
                "created_at": self.created_at,
                "reward": self.reward,
                "reported_at": self.reported_at,
                "metrics": self.metrics,
            },
            separators=(",", ":"),
            allow_nan=False,
        )

    @classmethod
    def from_json(cls, text: str) -> _Pending:
        try:
            doc = json.loads(text)
            if doc["v"] != _FORMAT_VERSION:
                raise IntegrityError(f"unknown decision format version {doc['v']!r}")
            pending = cls(
                str(doc["decision_id"]),
                str(doc["job_id"]),
                str(doc["generation"]),
                Arm(str(doc["slot_id"]), str(doc["blueprint"])),
                Strategy(doc["strategy"]),
                tuple(float(v) for v in doc["x"]),
                float(doc["created_at"]),
            )
            if doc["reward"] is not None:
                pending.reward = float(doc["reward"])
                pending.reported_at = float(doc["reported_at"])
            pending.metrics = {str(k): float(v) for k, v in doc["metrics"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise IntegrityError(f"malformed decision document: {exc!r}") from exc
        return pending


# Decision ids need uniqueness, not secrecy: a generator seeded from os.urandom (again
# in every forked child) makes them ~3x cheaper than uuid.uuid4().
_ids = random.Random()
os.register_at_fork(after_in_child=_ids.seed)
_UUID4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)


def _new_decision_id() -> str:
    """A random (version 4) UUID string."""
    n = _ids.getrandbits(128) & _UUID4_CLEAR | _UUID4_SET
    h = f"{n:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _summary(st: ArmStats, scale: float) -> ArmSummary:
    arm = st.arm
    return ArmSummary(
        arm.slot_id,
        arm.blueprint,
        st.pulls,
        st.weight * scale,
        st.mean,
        st.successes * scale,
        st.failures * scale,
        st.last_update,
    )


def _scope(job_id: str | None) -> str:
    return job_id or GLOBAL_SCOPE


def _job_seed(base: int, scope: str) -> int:
    # A stable hash (not hash()), so the seed is the same in every process.
    digest = hashlib.sha256(scope.encode()).digest()
    return (base << 64) ^ int.from_bytes(digest[:8], "big")


class SelectorCore:
    """The seed selector's state and decisions, synchronous and without I/O.

    `now` arguments are clock seconds (the same clock as `ArmOffer.embargoed_until`
    and the tracker's half-life). See the module docstring for the rules.
    """

    def __init__(self, config: SelectorConfig | None = None) -> None:
        self._config = config or SelectorConfig()
        self._params = self._config.params
        self._jobs: dict[str, _Job] = {}
        self._pending: dict[str, _Pending] = {}
        self._dirty_jobs: set[str] = set()
        self._dirty_arms: set[tuple[str, Arm]] = set()
        self._dirty_decisions: set[str] = set()
        self._deleted_jobs: set[str] = set()
        self._delete_all = False

    @property
    def config(self) -> SelectorConfig:
        """The settings this core runs with."""
        return self._config

    # -- jobs -------------------------------------------------------------------------

    def has_job(self, job_id: str | None) -> bool:
        """Whether the job's state is in memory."""
        return _scope(job_id) in self._jobs

    def is_synced(self, job_id: str | None) -> bool:
        """False while the job's state has not been reconciled with the store."""
        job = self._jobs.get(_scope(job_id))
        return job is None or job.synced

    def unsynced_jobs(self) -> list[str]:
        """Jobs started while the store was away, waiting for `merge_stored`."""
        return [scope for scope, job in self._jobs.items() if not job.synced]

    def create_job(self, job_id: str | None, *, synced: bool = True) -> None:
        """Start the job with empty evidence (no-op when it is in memory already).

        `synced=False` marks a job started while the store could not say whether it
        knew the job: its outcomes are journaled for `merge_stored`.
        """
        scope = _scope(job_id)
        if scope in self._jobs:
            return
        cfg = self._config
        job = _Job(
            scope,
            self._tracker(scope, cfg.features),
            _job_seed(cfg.seed, scope),
            generation=uuid.uuid4().hex,
            synced=synced,
            max_journal=cfg.max_journal,
        )
        job.features_fixed = bool(cfg.features)
        self._jobs[scope] = job
        self._dirty_jobs.add(scope)

    def configure_job(self, job_id: str | None, settings: JobSettings) -> None:
        """Apply per-job settings, creating the job if needed.

        The strategy can change any time. Features and seed are fixed by the job's
        first decision: changing them later raises `FailedPreconditionError`.
        """
        scope = _scope(job_id)
        self.create_job(scope)
        job = self._jobs[scope]
        if settings.features is not None and tuple(settings.features) != job.tracker.features:
            if job.features_fixed and (job.decisions or job.tracker.step):
                raise FailedPreconditionError(
                    f"job {scope!r} has decided with features {list(job.tracker.features)}; "
                    "features are fixed per job"
                )
            try:
                job.tracker = self._tracker(scope, settings.features)
            except ValueError as exc:
                raise InvalidArgumentError(str(exc), "settings.features") from exc
        if settings.features is not None:
            job.features_fixed = True
        if settings.seed is not None and settings.seed != job.seed:
            if job.decisions:
                raise FailedPreconditionError(
                    f"job {scope!r} has made {job.decisions} decisions; its seed is fixed"
                )
            job.seed = settings.seed
            job.rng = np.random.Generator(np.random.PCG64(settings.seed))
        if settings.strategy is not None:
            job.strategy = settings.strategy
        self._dirty_jobs.add(scope)

    def _tracker(self, scope: str, features: Sequence[str]) -> JobTracker:
        cfg = self._config
        return JobTracker(
            scope,
            features,
            decay=cfg.decay,
            ridge=cfg.linucb_ridge,
            intercept=cfg.linucb_intercept,
        )

    def reset(self, job_id: str | None, *, all_jobs: bool = False) -> None:
        """Forget a job (or every job with `all_jobs=True`): evidence and decisions."""
        if all_jobs:
            self._jobs.clear()
            self._pending.clear()
            self._dirty_jobs.clear()
            self._dirty_arms.clear()
            self._dirty_decisions.clear()
            self._deleted_jobs.clear()
            self._delete_all = True
            return
        scope = _scope(job_id)
        self._jobs.pop(scope, None)
        for decision_id in [d for d, p in self._pending.items() if p.job_id == scope]:
            del self._pending[decision_id]
            self._dirty_decisions.discard(decision_id)
        self._dirty_jobs.discard(scope)
        self._dirty_arms = {key for key in self._dirty_arms if key[0] != scope}
        self._deleted_jobs.add(scope)

    # -- deciding ---------------------------------------------------------------------

    def decide(
        self,
        job_id: str | None,
        arms: Sequence[ArmOffer],
        *,
        strategy: Strategy | None = None,
        budget: Budget = _UNBOUNDED_BUDGET,
        concurrency: Concurrency = _UNBOUNDED_CONCURRENCY,
        context: Mapping[str, Mapping[str, float]] | None = None,
        now: float,
    ) -> Decision:
        """Choose an arm among `arms` for the job; `context` maps slot id to features.

        Raises `InvalidArgumentError` for malformed input (repeated arm, negative
        numbers, a feature name the job does not use).
        """
        scope = _scope(job_id)
        job = self._jobs.get(scope)
        if job is None:
            self.create_job(scope)
            job = self._jobs[scope]
        if not job.features_fixed:
            self._fix_features(job, context)
        strategy = strategy or job.strategy or self._config.strategy
        eligibility = check_eligibility(arms, budget, concurrency, now)
        tracker = job.tracker

        if context:
            self._check_context(tracker, context)
        decision_id = _new_decision_id()
        if not eligibility.eligible:
            return Decision(
                decision_id,
                scope,
                None,
                "no eligible arm: " + eligibility.summary(),
                strategy,
                {},
                eligibility.ineligible,
                now,
            )

        keys = eligibility.arms
        renormalizations = tracker.renormalizations
        stats, scale = tracker.refreshed(keys, now)
        contexts = None
        if strategy is Strategy.LINUCB:
            vectors: dict[str, tuple[float, ...]] = {}
            rows = []
            for key in keys:
                x = vectors.get(key.slot_id)
                if x is None:
                    x = vectors[key.slot_id] = tracker.context_vector(
                        context.get(key.slot_id) if context else None
                    )
                rows.append(x)
            contexts = np.array(rows)  # (K, d)
        choice = choose(
            strategy,
            stats,
            job.rng,
            self._params,
            scale=scale,
            decisions=job.decisions,
            contexts=contexts,
        )
        job.decisions += 1
        arm = keys[choice.index]
        pending = _Pending(
            decision_id,
            scope,
            job.generation,
            arm,
            strategy,
            tracker.context_vector(context.get(arm.slot_id) if context else None),
            now,
        )
        self._remember(pending, now)
        self._dirty_jobs.add(scope)
        if tracker.renormalizations != renormalizations:
            self._dirty_arms.update((scope, a) for a in tracker.arms)
        return Decision(
            decision_id,
            scope,
            arm,
            choice.reason,
            strategy,
            dict(zip(keys, choice.scores, strict=True)),
            eligibility.ineligible,
            now,
        )

    @staticmethod
    def _check_context(tracker: JobTracker, context: Mapping[str, Mapping[str, float]]) -> None:
        known = frozenset(tracker.features)
        for slot_id, features in context.items():
            if not known.issuperset(features):
                unknown = ", ".join(sorted(set(features) - known))
                raise InvalidArgumentError(
                    f"unknown feature(s) {unknown}; job {tracker.scope!r} uses "
                    f"{list(tracker.features)}",
                    f"context[{slot_id}]",
                )

    def _fix_features(self, job: _Job, context: Mapping[str, Mapping[str, float]] | None) -> None:
        names = sorted({name for features in (context or {}).values() for name in features})
        if names:
            job.tracker = self._tracker(job.scope, names)
        job.features_fixed = True

    def _remember(self, pending: _Pending, now: float) -> None:
        store = self._pending
        store[pending.decision_id] = pending
        self._dirty_decisions.add(pending.decision_id)
        ttl = self._config.decision_ttl_s
        cap = self._config.max_pending_decisions
        # Insertion order is decision order: expired or surplus ones are at the front.
        while store:
            oldest = next(iter(store.values()))
            if len(store) <= cap and now - oldest.created_at < ttl:
                break
            del store[oldest.decision_id]
            self._dirty_decisions.discard(oldest.decision_id)

    # -- reporting --------------------------------------------------------------------

    def has_decision(self, decision_id: str) -> bool:
        """Whether the decision is in memory (pending or reported)."""
        return decision_id in self._pending

    def restore_decision(self, document: str) -> str:
        """Take a decision document from the store into memory; returns its job id."""
        pending = _Pending.from_json(document)
        self._pending.setdefault(pending.decision_id, pending)
        return pending.job_id

    def record(
        self,
        decision_id: str,
        reward: float,
        metrics: Mapping[str, float] | None = None,
        *,
        now: float,
    ) -> ReportOutcome:
        """Count the reward of a decision's outcome; see the module docstring for repeats.

        Raises `NotFoundError` (unknown, expired or reset decision),
        `FailedPreconditionError` (reported before with another reward) or
        `InvalidArgumentError` (non-finite reward or metric).
        """
        reward = float(reward)
        if not math.isfinite(reward):
            raise InvalidArgumentError(f"must be finite, got {reward}", "reward")
        clean: dict[str, float] = {}
        for name, raw in (metrics or {}).items():
            value = float(raw)
            if not math.isfinite(value):
                raise InvalidArgumentError(f"must be finite, got {value}", f"metrics.{name}")
            clean[str(name)] = value
        pending = self._pending.get(decision_id)
        if pending is None:
            raise NotFoundError(f"unknown decision {decision_id!r}")
        if pending.reward is not None:
            if pending.reward == reward:
                return ReportOutcome(decision_id, pending.job_id, pending.arm, reward, True)
            raise FailedPreconditionError(
                f"decision {decision_id!r} was reported already with reward {pending.reward}"
            )
        if now - pending.created_at >= self._config.decision_ttl_s:
            raise NotFoundError(f"decision {decision_id!r} expired")
        job = self._jobs.get(pending.job_id)
        if job is None or job.generation != pending.generation:
            raise NotFoundError(
                f"decision {decision_id!r} belongs to state of job {pending.job_id!r} "
                "that was reset"
            )
        tracker = job.tracker
        renormalizations = tracker.renormalizations
        tracker.update(pending.arm, reward, pending.x, now)
        if tracker.renormalizations != renormalizations:
            self._dirty_arms.update((job.scope, a) for a in tracker.arms)
        if not job.synced:
            job.journal.append((pending.arm, reward, pending.x, now))
        pending.reward = reward
        pending.reported_at = now
        pending.metrics = clean
        self._dirty_jobs.add(job.scope)
        self._dirty_arms.add((job.scope, pending.arm))
        self._dirty_decisions.add(decision_id)
        return ReportOutcome(decision_id, job.scope, pending.arm, reward, False)

    # -- reading ----------------------------------------------------------------------

    def stats(self, job_id: str | None, *, now: float) -> JobStats:
        """The job's standing, discounted to `now`; `NotFoundError` when not in memory."""
        scope = _scope(job_id)
        job = self._jobs.get(scope)
        if job is None:
            raise NotFoundError(f"unknown job {scope!r}")
        tracker = job.tracker
        scale = tracker.scale(now)
        arms = [_summary(tracker.arms[arm], scale) for arm in sorted(tracker.arms)]
        return JobStats(
            scope,
            job.strategy or self._config.strategy,
            job.decisions,
            tracker.step,
            tracker.features,
            tuple(arms),
        )

    def summaries(
        self, job_id: str | None, arms: Iterable[Arm], *, now: float
    ) -> dict[Arm, ArmSummary]:
        """The evidence of those of `arms` that were ever reported, as in `stats`.

        `NotFoundError` when the job is not in memory.
        """
        scope = _scope(job_id)
        job = self._jobs.get(scope)
        if job is None:
            raise NotFoundError(f"unknown job {scope!r}")
        tracker = job.tracker
        scale = tracker.scale(now)
        known = tracker.arms
        return {arm: _summary(known[arm], scale) for arm in arms if arm in known}

    # -- persistence ------------------------------------------------------------------

    def queued(self) -> int:
        """How many document writes and deletions wait for the store."""
        return (
            len(self._dirty_jobs)
            + len(self._dirty_arms)
            + len(self._dirty_decisions)
            + len(self._deleted_jobs)
            + int(self._delete_all)
        )

    def take_writes(self) -> StoreWrite:
        """The queued changes as one batch (current documents); the queue is emptied.

        Changes of jobs not yet merged with the store stay queued.
        """
        write = StoreWrite(
            delete_all_jobs=self._delete_all,
            delete_jobs=self._deleted_jobs,
            decision_ttl_s=self._config.decision_ttl_s,
        )
        self._delete_all = False
        self._deleted_jobs = set()
        jobs = self._jobs
        held_jobs: set[str] = set()
        for scope in self._dirty_jobs:
            job = jobs.get(scope)
            if job is None:
                continue
            if not job.synced:
                held_jobs.add(scope)
                continue
            write.jobs[scope] = self._job_json(job)
        held_arms: set[tuple[str, Arm]] = set()
        for scope, arm in self._dirty_arms:
            job = jobs.get(scope)
            if job is None or arm not in job.tracker.arms:
                continue
            if not job.synced:
                held_arms.add((scope, arm))
                continue
            doc = json.dumps(
                job.tracker.arms[arm].to_dict(), separators=(",", ":"), allow_nan=False
            )
            write.arms[(scope, arm.slot_id, arm.blueprint)] = doc
        held_decisions: set[str] = set()
        for decision_id in self._dirty_decisions:
            pending = self._pending.get(decision_id)
            if pending is None:
                continue
            job = jobs.get(pending.job_id)
            if job is not None and not job.synced:
                held_decisions.add(decision_id)
                continue
            write.decisions[decision_id] = pending.to_json()
        self._dirty_jobs = held_jobs
        self._dirty_arms = held_arms
        self._dirty_decisions = held_decisions
        return write

    def requeue(self, write: StoreWrite) -> None:
        """Queue again a batch from `take_writes` that the store did not take."""
        self._delete_all = self._delete_all or write.delete_all_jobs
        self._deleted_jobs |= write.delete_jobs
        self._dirty_jobs.update(write.jobs)
        self._dirty_arms.update((job, Arm(slot, bp)) for job, slot, bp in write.arms)
        self._dirty_decisions.update(write.decisions)

    def _job_json(self, job: _Job) -> str:
        return json.dumps(
            {
                "v": _FORMAT_VERSION,
                "job_id": job.scope,
                "generation": job.generation,
                "seed": job.seed,
                "strategy": job.strategy.value if job.strategy else None,
                "decisions": job.decisions,
                "features_fixed": job.features_fixed,
                "rng": job.rng.bit_generator.state,
                "tracker": job.tracker.header_dict(),
            },
            separators=(",", ":"),
            allow_nan=False,
        )

    def _job_from_stored(self, stored: StoredJob) -> _Job:
        try:
            doc = json.loads(stored.job)
            if doc["v"] != _FORMAT_VERSION:
                raise IntegrityError(f"unknown job format version {doc['v']!r}")
            tracker = JobTracker.from_parts(
                doc["tracker"], [json.loads(a) for a in stored.arms], decay=self._config.decay
            )
            job = _Job(
                str(doc["job_id"]),
                tracker,
                int(doc["seed"]),
                generation=str(doc["generation"]),
                synced=True,
                max_journal=self._config.max_journal,
            )
            job.rng.bit_generator.state = doc["rng"]
            job.strategy = Strategy(doc["strategy"]) if doc["strategy"] else None
            job.decisions = int(doc["decisions"])
            job.features_fixed = bool(doc["features_fixed"])
        except (KeyError, TypeError, ValueError) as exc:
            raise IntegrityError(f"malformed job document: {exc!r}") from exc
        return job

    def restore_job(self, stored: StoredJob) -> None:
        """Take a job from the store into memory (no-op when it is in memory already)."""
        job = self._job_from_stored(stored)
        self._jobs.setdefault(job.scope, job)

    def merge_stored(self, job_id: str, stored: StoredJob | None) -> None:
        """Reconcile a job started while the store was away with what the store holds.

        The stored state wins; the outcomes recorded here meanwhile are replayed onto
        it (with all-zero features when the feature names differ), decisions made here
        count on top, and pending decisions are carried over to the merged state.
        """
        scope = _scope(job_id)
        local = self._jobs.get(scope)
        if local is None or local.synced:
            return
        if stored is None:
            merged = local
        else:
            merged = self._job_from_stored(stored)
            same_features = merged.tracker.features == local.tracker.features
            for arm, reward, x, at in local.journal:
                merged.tracker.update(arm, reward, x if same_features else None, at)
                self._dirty_arms.add((scope, arm))
            merged.decisions += local.decisions
            merged.rng = local.rng
            if local.strategy is not None:
                merged.strategy = local.strategy
            for pending in self._pending.values():
                if pending.job_id == scope and pending.generation == local.generation:
                    pending.generation = merged.generation
                    self._dirty_decisions.add(pending.decision_id)
            self._jobs[scope] = merged
        merged.synced = True
        merged.journal.clear()
        self._dirty_jobs.add(scope)
        self._dirty_arms.update((scope, arm) for arm in merged.tracker.arms)


class SeedSelector:
    """The seed selector with its store: async edge around `SelectorCore`.

    `clock` gives wall-clock seconds for decisions and decay; `monotonic` paces
    store retries. Close with `aclose()`, which writes what is queued if it can.
    """

    def __init__(
        self,
        store: SelectorStore,
        config: SelectorConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._core = SelectorCore(config)
        self._config = self._core.config
        self._clock = clock
        self._monotonic = monotonic
        self._flush_lock = asyncio.Lock()
        self._load_locks: dict[str, asyncio.Lock] = {}
        self._store_error: str | None = None
        self._store_down_since: float | None = None
        self._next_try = 0.0
        self._flusher: asyncio.Task[None] | None = None
        self._answered = asyncio.Event()  # set as each call ends (see `_write_behind`)
        self._closed = False

    @property
    def core(self) -> SelectorCore:
        """The synchronous core (for in-process callers that persist on their own)."""
        return self._core

    @property
    def degraded_reason(self) -> str | None:
        """Why the selector runs without its store (for health checks); None when fine."""
        if self._store_error is None:
            return None
        since = datetime.fromtimestamp(self._store_down_since or 0.0, UTC).isoformat()
        return (
            f"selector store unavailable since {since} ({self._store_error}); deciding from "
            f"memory, {self._core.queued()} writes queued"
        )

    async def configure_job(self, job_id: str | None, settings: JobSettings) -> None:
        """Apply per-job settings (see `SelectorCore.configure_job`) and persist them."""
        await self._load(job_id, create=True)
        self._core.configure_job(job_id, settings)
        await self._persist()

    async def select(
        self,
        job_id: str | None,
        arms: Sequence[ArmOffer],
        *,
        strategy: Strategy | None = None,
        budget: Budget = _UNBOUNDED_BUDGET,
        concurrency: Concurrency = _UNBOUNDED_CONCURRENCY,
        context: Mapping[str, Mapping[str, float]] | None = None,
    ) -> Decision:
        """Choose the arm to grow for the job (see `SelectorCore.decide`), then persist."""
        if not self._core.has_job(job_id):
            await self._load(job_id, create=True)
        decision = self._core.decide(
            job_id,
            arms,
            strategy=strategy,
            budget=budget,
            concurrency=concurrency,
            context=context,
            now=self._clock(),
        )
        await self._persist()
        return decision

    async def report(
        self, decision_id: str, reward: float, metrics: Mapping[str, float] | None = None
    ) -> ReportOutcome:
        """Count a decision's reward (see `SelectorCore.record`), then persist.

        A decision not in memory is looked up in the store (it may predate a
        restart); `UnavailableError` when the store cannot be asked.
        """
        core = self._core
        if not core.has_decision(decision_id):
            document = await self._store_call(
                lambda: self._store.get_decision(decision_id), patient=True
            )
            if document is None:
                raise NotFoundError(f"unknown decision {decision_id!r}")
            job_id = core.restore_decision(document)
            try:
                await self._load(job_id, create=False)
            except NotFoundError:
                raise NotFoundError(
                    f"decision {decision_id!r} belongs to job {job_id!r}, which was reset"
                ) from None
            if not core.is_synced(job_id):
                await self.flush(force=True)
        outcome = core.record(decision_id, reward, metrics, now=self._clock())
        await self._persist()
        return outcome

    async def stats(self, job_id: str | None) -> JobStats:
        """The job's standing; `NotFoundError` for a job neither in memory nor stored."""
        await self._load(job_id, create=False)
        return self._core.stats(job_id, now=self._clock())

    async def summaries(self, job_id: str | None, arms: Iterable[Arm]) -> dict[Arm, ArmSummary]:
        """The evidence of some of the job's arms (see `SelectorCore.summaries`)."""
        await self._load(job_id, create=False)
        return self._core.summaries(job_id, arms, now=self._clock())

    async def reset(self, job_id: str | None, *, all_jobs: bool = False) -> None:
        """Forget a job, or every job with `all_jobs=True`, here and in the store.

        Written through even with `write_behind_s`: resets are rare, and a job that
        came back after a crash would be a surprise.
        """
        self._core.reset(job_id, all_jobs=all_jobs)
        await self.flush()

    async def flush(self, *, force: bool = False) -> bool:
        """Write queued changes to the store; True when nothing is left queued.

        Never raises for an unreachable store: it records the degradation instead.
        While degraded it tries the store at most every `store_retry_interval_s`,
        unless `force`.
        """
        async with self._flush_lock:
            if self._store_error is not None and not force and self._monotonic() < self._next_try:
                return False
            core = self._core
            write: StoreWrite | None = None
            try:
                async with asyncio.timeout(self._config.store_timeout_s):
                    for scope in core.unsynced_jobs():
                        core.merge_stored(scope, await self._store.load_job(scope))
                    write = core.take_writes()
                    if not write.is_empty():
                        await self._store.apply(write)
            except (GraftmeshError, TimeoutError) as exc:
                if write is not None:
                    core.requeue(write)
                self._degrade(exc)
                return False
            except BaseException:
                # Cancelled (a closing caller) or a bug: whether the batch arrived is
                # unknown, so it is written again; its documents are idempotent puts.
                if write is not None:
                    core.requeue(write)
                raise
            self._store_error = None
            self._store_down_since = None
            return core.queued() == 0

    async def aclose(self) -> None:
        """Write what is queued (best effort) and close the store."""
        self._closed = True
        flusher = self._flusher
        if flusher is not None:
            # A batch cut off mid-write is requeued by `flush` and written below.
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher
        await self.flush(force=True)
        await self._store.aclose()

    async def _persist(self) -> None:
        if self._config.write_behind_s <= 0.0:
            await self.flush()
        else:
            self._answered.set()
            if self._flusher is None and not self._closed:
                self._flusher = asyncio.create_task(
                    self._write_behind(), name="selector-write-behind"
                )

    async def _write_behind(self) -> None:
        """Flush what is queued within `write_behind_s` of its queueing, until empty.

        Changes made while a batch is being written go in the next one; while the
        store is away, the retries are paced by `flush` and this task ends.
        """
        try:
            while True:
                # Half the delay, then the next call's end, or the other half if none
                # comes: a batch written in between calls holds up a request that
                # arrives meanwhile; one written just after an answer mostly does not.
                half = self._config.write_behind_s / 2
                await asyncio.sleep(half)
                self._answered.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(half):
                        await self._answered.wait()
                await self.flush()
                if self._store_error is not None or not self._core.queued():
                    return
        except asyncio.CancelledError:
            raise
        except Exception:
            # The next call starts another flush; a bug must not be lost silently.
            _log.exception("selector write-behind flush failed")
        finally:
            self._flusher = None

    async def _load(self, job_id: str | None, *, create: bool) -> None:
        scope = _scope(job_id)
        core = self._core
        if core.has_job(scope):
            return
        lock = self._load_locks.setdefault(scope, asyncio.Lock())
        try:
            async with lock:
                if core.has_job(scope):
                    return
                try:
                    stored = await self._store_call(
                        lambda: self._store.load_job(scope), patient=not create
                    )
                except UnavailableError:
                    if not create:
                        raise
                    core.create_job(scope, synced=False)
                    return
                if stored is not None:
                    core.restore_job(stored)
                elif create:
                    core.create_job(scope, synced=True)
                else:
                    raise NotFoundError(f"unknown job {scope!r}")
        finally:
            if not lock.locked():
                self._load_locks.pop(scope, None)

    async def _store_call(self, call: Callable[[], Awaitable[_T]], *, patient: bool = False) -> _T:
        # Impatient calls give up at once while a retry of the store is not due yet, so
        # a store that hangs costs one timeout per retry interval, not one per request.
        if not patient and self._store_error is not None and self._monotonic() < self._next_try:
            raise UnavailableError(f"selector store unavailable: {self._store_error}")
        try:
            async with asyncio.timeout(self._config.store_timeout_s):
                return await call()
        except (UnavailableError, TimeoutError) as exc:
            self._degrade(exc)
            raise UnavailableError(f"selector store unavailable: {self._store_error}") from exc

    def _degrade(self, exc: BaseException) -> None:
        if self._store_down_since is None:
            self._store_down_since = self._clock()
        self._store_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        self._next_try = self._monotonic() + self._config.store_retry_interval_s
