"""The trainer agent: `TrainerService` over the job store, jobs trained in worker threads.

- SubmitJob validates the proto `JobSpec` (mapped onto the core's `JobSpec`;
  a bad one is INVALID_ARGUMENT naming `spec.<field>` and creates nothing),
  honours `request_id` (a repeat returns the first job) and queues the job;
  a full queue is RESOURCE_EXHAUSTED.
- Jobs run first in, first out, `GRAFTMESH_TRAINER_MAX_JOBS` at once, each in
  its own thread (never on the event loop, so health and gRPC answer while a
  job trains). Growth calls from the thread run on the agent's event loop.
- WatchJob replays the retained events after `after_sequence` (the last
  `EVENT_LOG_SIZE` per job, in memory) and follows live ones until the event
  that ends the job. Sequences continue across restarts (persisted).
- A restarted trainer resumes its RUNNING jobs from their last checkpoint.
  On SIGTERM running jobs stop after their current step, checkpoint, and stay
  RUNNING in the store, so the next start resumes them.
- On success the model is exported to `<job dir>/model/` and, with
  `register_as`, uploaded to the registry agent. A registry that cannot be
  reached (down, or its machine cut off) is waited for, retrying with backoff,
  for up to `GRAFTMESH_TRAINER_REGISTER_WAIT_S`, while the job stays RUNNING.
- Every state change is published as `events.job.<job_id>.<state>`.

Settings (environment): `GRAFTMESH_TRAINER_MAX_JOBS` (1),
`GRAFTMESH_TRAINER_MAX_QUEUED` (100), `GRAFTMESH_TRAINER_SELECTOR`
(`seed_selector`), `GRAFTMESH_TRAINER_COMPILER` (`compiler`),
`GRAFTMESH_TRAINER_REGISTRY` (`registry`), `GRAFTMESH_TRAINER_TORCH_THREADS`
(1: tiny ops slow down many times over with more threads on a loaded machine),
`GRAFTMESH_TRAINER_REGISTER_WAIT_S` (600).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import grpc
import torch
from google.protobuf import json_format, struct_pb2, timestamp_pb2

from common.agent import AgentContext
from common.bus import Severity
from common.channels import agent_channel
from common.errors import (
    ConfigError,
    FailedPreconditionError,
    GraftmeshError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from common.grpc_server import Context
from common.logging import get_logger
from common.retry import rpc_retry
from common.stubs import common_pb2, trainer_pb2, trainer_pb2_grpc
from services.trainer.checkpoint import CheckpointStore
from services.trainer.clients import (
    AgentChannels,
    GrpcKernelSource,
    GrpcSeedSelectorClient,
    input_statistics,
    register_model,
)
from services.trainer.data import DATASETS
from services.trainer.events import (
    CheckpointSaved,
    GrowthStatus,
    SafetyEvent,
    SlotTransition,
    TrainingEvent,
    TrainingProgress,
)
from services.trainer.growth import GrowthController
from services.trainer.hardware import detect_hardware
from services.trainer.jobs import JobRecord, JobState, JobStore, recover, runnable
from services.trainer.loop import Trainer, TrainingResult
from services.trainer.models import TEMPLATES
from services.trainer.plugins import LOSSES, OPTIMIZERS, SCHEDULES
from services.trainer.spec import JobSpec, invalid_argument
from services.trainer.surgery import find_slots

__all__ = [
    "EVENT_LOG_SIZE",
    "TrainerAgent",
    "TrainerServicer",
    "TrainerSettings",
    "build",
    "job_to_proto",
    "spec_from_proto",
]

_log = get_logger(__name__)

EVENT_LOG_SIZE: Final = 2000
"""Events retained in memory per job for WatchJob replays."""

_SERVICE = trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name


# --- settings -------------------------------------------------------------------------------


def _env_int(environ: Mapping[str, str], key: str, default: int, problems: list[str]) -> int:
    raw = environ.get(key, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        problems.append(f"{key}={raw!r}: must be a positive integer")
        return default
    return value


@dataclass(frozen=True)
class TrainerSettings:
    """What the agent reads from its environment (see the module doc)."""

    max_jobs: int = 1
    max_queued: int = 100
    selector_agent: str = "seed_selector"
    compiler_agent: str = "compiler"
    registry_agent: str = "registry"
    torch_threads: int = 1
    register_wait_s: int = 600

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> TrainerSettings:
        """The settings in `environ`; `ConfigError` naming each bad variable."""
        problems: list[str] = []
        settings = cls(
            max_jobs=_env_int(environ, "GRAFTMESH_TRAINER_MAX_JOBS", 1, problems),
            max_queued=_env_int(environ, "GRAFTMESH_TRAINER_MAX_QUEUED", 100, problems),
            selector_agent=environ.get("GRAFTMESH_TRAINER_SELECTOR", "").strip() or "seed_selector",
            compiler_agent=environ.get("GRAFTMESH_TRAINER_COMPILER", "").strip() or "compiler",
            registry_agent=environ.get("GRAFTMESH_TRAINER_REGISTRY", "").strip() or "registry",
            torch_threads=_env_int(environ, "GRAFTMESH_TRAINER_TORCH_THREADS", 1, problems),
            register_wait_s=_env_int(environ, "GRAFTMESH_TRAINER_REGISTER_WAIT_S", 600, problems),
        )
        if problems:
            raise ConfigError(problems)
        return settings


# --- proto <-> core -------------------------------------------------------------------------

_PRECISIONS: Final = {
    trainer_pb2.PRECISION_FP32: "fp32",
    trainer_pb2.PRECISION_BF16: "bf16",
    trainer_pb2.PRECISION_FP16: "fp16",
}
_BLENDS: Final = {
    trainer_pb2.BLEND_SCHEDULE_LINEAR: "linear",
    trainer_pb2.BLEND_SCHEDULE_COSINE: "cosine",
    trainer_pb2.BLEND_SCHEDULE_SIGMOID: "sigmoid",
}
_KINDS: Final = {common_pb2.SLOT_KIND_LINEAR: "linear", common_pb2.SLOT_KIND_CONV2D: "conv2d"}
_STRATEGY_NAMES: Final = {
    1: "ucb1",
    2: "thompson",
    3: "epsilon_greedy",
    4: "linucb",
}


def _plain(value: Any) -> Any:
    """A Struct value as Python, whole floats as ints (a Struct has only doubles)."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _struct(message: struct_pb2.Struct) -> dict[str, Any]:
    plain: dict[str, Any] = _plain(json_format.MessageToDict(message))
    return plain


def _set(out: dict[str, Any], key: str, value: Any) -> None:
    """Unset (zero, empty) proto values are left out: the core's default applies."""
    if value or value is True:
        out[key] = value


def _enum(table: Mapping[Any, str], value: int, path: str) -> str | None:
    if value == 0:
        return None
    if value not in table:
        raise InvalidArgumentError(f"unknown enum value {value}", field=path)
    return table[value]


def _spec_dict(pb: trainer_pb2.JobSpec) -> dict[str, Any]:
    """The core spec's fields from the proto: zero values left to the core's defaults."""
    out: dict[str, Any] = {}
    _set(out, "name", pb.name)
    model: dict[str, Any] = {}
    source = pb.model.WhichOneof("source")
    if source is not None:
        model[source] = getattr(pb.model, source)
    _set(model, "params", _struct(pb.model.params))
    out["model"] = model
    slots = []
    for i, slot in enumerate(pb.slots):
        entry: dict[str, Any] = {"module_path": slot.module_path}
        kind = _enum(_KINDS, slot.kind, f"spec.slots.{i}.kind")
        if kind is not None:
            entry["kind"] = kind
        slots.append(entry)
    _set(out, "slots", slots)
    data: dict[str, Any] = {}
    data_source = pb.data.WhichOneof("source")
    if data_source is not None:
        data[data_source] = getattr(pb.data, data_source)
    _set(data, "batch_size", pb.data.batch_size)
    _set(data, "val_fraction", pb.data.val_fraction)
    _set(data, "num_workers", pb.data.num_workers)
    _set(data, "params", _struct(pb.data.params))
    out["data"] = data
    for key, message, fields in (
        ("optimizer", pb.optimizer, ("name", "lr", "weight_decay")),
        ("scheduler", pb.scheduler, ("name", "warmup_steps")),
        ("loss", pb.loss, ("name",)),
    ):
        part: dict[str, Any] = {}
        for name in fields:
            _set(part, name, getattr(message, name))
        extra = {"optimizer": "extra", "scheduler": "params", "loss": "params"}[key]
        _set(part, extra, _struct(getattr(message, extra)))
        _set(out, key, part)
    for name in ("epochs", "max_steps", "eval_every_steps", "seed", "checkpoint_every_steps"):
        _set(out, name, getattr(pb, name))
    growth: dict[str, Any] = {}
    g = pb.growth
    for name in (
        "enabled",
        "budget_params",
        "max_concurrent_seeds",
        "plateau_patience",
        "plateau_min_delta",
        "seed_training_steps",
        "blend_steps",
        "holding_steps",
        "embargo_steps",
    ):
        _set(growth, name, getattr(g, name))
    strategy = _enum(_STRATEGY_NAMES, g.strategy, "spec.growth.strategy")
    if strategy is not None:
        growth["strategy"] = strategy
    _set(growth, "strategy_params", dict(g.strategy_params))
    blend = _enum(_BLENDS, g.blend_schedule, "spec.growth.blend_schedule")
    if blend is not None:
        growth["blend_schedule"] = blend
    _set(growth, "blueprints", list(g.blueprints))
    _set(out, "growth", growth)
    safety: dict[str, Any] = {}
    for name in ("grad_clip_norm", "max_consecutive_bad_steps", "loss_spike_z_threshold"):
        _set(safety, name, getattr(pb.safety, name))
    _set(out, "safety", safety)
    precision = _enum(_PRECISIONS, pb.precision, "spec.precision")
    if precision is not None:
        out["precision"] = precision
    _set(out, "device", pb.device)
    _set(out, "deterministic", pb.deterministic)
    return out


def _check_names(spec: JobSpec) -> None:
    """Names the core resolves only when training starts, checked at submit time."""
    if spec.model.template is not None and spec.model.template not in TEMPLATES:
        raise InvalidArgumentError(
            f"unknown template {spec.model.template!r}; built-in: {', '.join(sorted(TEMPLATES))}",
            field="spec.model.template",
        )
    if spec.data.dataset is not None and spec.data.dataset not in DATASETS:
        raise InvalidArgumentError(
            f"unknown dataset {spec.data.dataset!r}; built-in: {', '.join(sorted(DATASETS))}",
            field="spec.data.dataset",
        )
    for registry, name, path in (
        (OPTIMIZERS, spec.optimizer.name, "spec.optimizer.name"),
        (SCHEDULES, spec.scheduler.name, "spec.scheduler.name"),
        (LOSSES, spec.loss.name, "spec.loss.name"),
    ):
        if ":" not in name and name not in registry.names():
            raise InvalidArgumentError(
                f"unknown {registry.kind} {name!r}; built-in: {', '.join(registry.names())}",
                field=path,
            )


def spec_from_proto(pb: trainer_pb2.JobSpec) -> JobSpec:
    """The core `JobSpec` of a proto spec; `InvalidArgumentError` naming `spec.<field>`.

    Proto fields left at zero (or empty) take the core's defaults; Struct
    numbers that are whole become ints.
    """
    from pydantic import ValidationError

    try:
        spec = JobSpec.model_validate(_spec_dict(pb))
    except ValidationError as exc:
        raise invalid_argument(exc, prefix="spec") from None
    _check_names(spec)
    return spec


def _spec_json(pb: trainer_pb2.JobSpec) -> dict[str, Any]:
    stored: dict[str, Any] = json_format.MessageToDict(pb, preserving_proto_field_name=True)
    return stored


def _spec_pb(stored: Mapping[str, Any]) -> trainer_pb2.JobSpec:
    return json_format.ParseDict(dict(stored), trainer_pb2.JobSpec())


def _timestamp(seconds: float | None) -> timestamp_pb2.Timestamp | None:
    if seconds is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def _seed_state(value: str) -> common_pb2.SeedState.ValueType:
    if not value:
        return common_pb2.SEED_STATE_UNSPECIFIED
    return common_pb2.SeedState.Value(f"SEED_STATE_{value.upper()}")


def _job_state(state: JobState) -> common_pb2.JobState.ValueType:
    return common_pb2.JobState.Value(f"JOB_STATE_{state.value}")


def job_to_proto(record: JobRecord) -> trainer_pb2.Job:
    """The `Job` message of a stored job."""
    p = record.progress
    progress = trainer_pb2.JobProgress(
        step=int(p.get("step", 0)),
        epoch=int(p.get("epoch", 0)),
        total_steps=int(p.get("total_steps", 0)),
        train_loss=float(p.get("train_loss", 0.0)),
        metrics={k: float(v) for k, v in p.get("metrics", {}).items()},
        param_count=int(p.get("param_count", 0)),
    )
    if p.get("val_loss") is not None:
        progress.val_loss = float(p["val_loss"])
    slots = [
        trainer_pb2.SlotStatus(
            slot_id=str(s["slot_id"]),
            kind=common_pb2.SLOT_KIND_LINEAR
            if s.get("shape", {}).get("kind") == "linear"
            else common_pb2.SLOT_KIND_CONV2D,
            state=_seed_state(str(s.get("state", ""))),
            blueprint=str(s.get("blueprint", "")),
            kernel_id=str(s.get("kernel_id", "")),
            alpha=float(s.get("alpha", 0.0)),
            added_params=int(s.get("added_params", 0)),
            steps_in_state=int(s.get("steps_in_state", 0)),
        )
        for s in record.slots
    ]
    job = trainer_pb2.Job(
        job_id=record.job_id,
        spec=_spec_pb(record.spec),
        state=_job_state(record.state),
        message=record.message,
        progress=progress,
        slots=slots,
        checkpoint_path=record.checkpoint_path,
        last_event_sequence=record.last_event_sequence,
    )
    for name, seconds in (
        ("created_at", record.created_at),
        ("started_at", record.started_at),
        ("finished_at", record.finished_at),
    ):
        stamp = _timestamp(seconds)
        if stamp is not None:
            getattr(job, name).CopyFrom(stamp)
    registered = record.result.get("registered")
    if registered:
        job.registered_model.CopyFrom(
            common_pb2.ModelRef(name=str(registered["name"]), version=int(registered["version"]))
        )
    return job


# --- events ---------------------------------------------------------------------------------


@dataclass
class _Feed:
    """A job's retained events and a way to wait for the next one (event loop only)."""

    next_sequence: int
    events: deque[trainer_pb2.JobEvent] = field(
        default_factory=lambda: deque(maxlen=EVENT_LOG_SIZE)
    )
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    ended: bool = False

    def append(self, event: trainer_pb2.JobEvent) -> None:
        self.events.append(event)
        self.changed.set()
        self.changed = asyncio.Event()


@dataclass
class _Running:
    """A job in its worker thread."""

    job_id: str
    cancel: threading.Event
    thread: threading.Thread | None = None
    step: int = 0
    epoch: int = 0
    slots: dict[str, dict[str, Any]] = field(default_factory=dict)
    growth_note: str = ""


def _event_payload(event: TrainingEvent) -> dict[str, Any] | None:
    """The JobEvent payload of a core event; None for events the contract has no place for."""
    if isinstance(event, TrainingProgress):
        progress = trainer_pb2.TrainingProgress(
            train_loss=event.train_loss,
            metrics={k: float(v) for k, v in event.metrics.items()},
            learning_rate=event.learning_rate,
            samples_per_s=event.samples_per_s,
            param_count=event.param_count,
        )
        if event.val_loss is not None:
            progress.val_loss = event.val_loss
        return {"progress": progress}
    if isinstance(event, SlotTransition):
        return {
            "slot_transition": trainer_pb2.SlotTransition(
                slot_id=event.slot_id,
                from_state=_seed_state(event.from_state),
                to_state=_seed_state(event.to_state),
                alpha=event.alpha,
                blueprint=event.blueprint,
                kernel_id=event.kernel_id,
                reason=event.reason,
            )
        }
    if isinstance(event, CheckpointSaved):
        return {
            "checkpoint_saved": trainer_pb2.CheckpointSaved(
                path=event.path, sha256=event.sha256, size_bytes=event.size_bytes
            )
        }
    return None


# --- the agent ------------------------------------------------------------------------------


class TrainerAgent:
    """Jobs, their threads and their event feeds; the servicer's collaborator."""

    service_names: Sequence[str] = (_SERVICE,)

    def __init__(self, ctx: AgentContext, settings: TrainerSettings) -> None:
        self.ctx = ctx
        self.settings = settings
        self.store = JobStore(ctx.env.run_dir / "trainer")
        self._feeds: dict[str, _Feed] = {}
        self._running: dict[str, _Running] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._channels: AgentChannels | None = None
        self._stopping = False
        self._tasks: set[asyncio.Task[None]] = set()
        hw = detect_hardware()
        self._hardware = {
            "cpu_cores": hw.cpu_cores,
            "ram_bytes": hw.ram_bytes,
            "gpus": [
                {"index": g.index, "name": g.name, "total_memory_bytes": g.total_memory_bytes}
                for g in hw.gpus
            ],
        }

    # -- AgentService ----------------------------------------------------------------------

    def add_to_server(self, server: grpc.aio.Server) -> None:
        trainer_pb2_grpc.add_TrainerServiceServicer_to_server(TrainerServicer(self), server)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._channels = AgentChannels(self.ctx.config)
        plan = recover(self.store.all())
        for job_id in plan.cancel:
            self._finish(job_id, JobState.CANCELLED, "cancelled before the trainer restarted")
        for job_id in plan.resume:
            _log.info("resuming job after a restart", job_id=job_id)
            self.store.update(job_id, state=JobState.QUEUED)
        self._schedule()
        self._report_health()

    async def stop(self) -> None:
        """Running jobs stop after their step and checkpoint; they resume on the next start."""
        self._stopping = True
        for run in self._running.values():
            run.cancel.set()
        threads = [r.thread for r in self._running.values() if r.thread is not None]
        for thread in threads:
            await asyncio.to_thread(thread.join)
        for feed in self._feeds.values():
            feed.changed.set()
        if self._channels is not None:
            await self._channels.close()
        self.store.close()

    # -- requests --------------------------------------------------------------------------

    def submit(self, spec_pb: trainer_pb2.JobSpec, request_id: str) -> JobRecord:
        spec_from_proto(spec_pb)  # validates; nothing is created for a bad spec
        if request_id:
            earlier = self.store.by_request(request_id)
            if earlier is not None:
                return earlier
        queued = len(self.store.all([JobState.QUEUED]))
        if queued >= self.settings.max_queued:
            raise ResourceExhaustedError(
                f"{queued} jobs are queued already (GRAFTMESH_TRAINER_MAX_QUEUED="
                f"{self.settings.max_queued}); wait for some to finish or cancel some"
            )
        record, created = self.store.create(_spec_json(spec_pb), request_id=request_id)
        if created:
            self._state_event(record, JobState.PENDING, JobState.QUEUED, "queued")
            self._schedule()
        return self.store.get(record.job_id)

    def cancel(self, job_id: str, reason: str) -> JobRecord:
        job = self.store.get(job_id)
        if job.state is JobState.CANCELLED:
            return job
        if job.state.terminal:
            raise FailedPreconditionError(
                f"job {job_id} has {job.state.value.lower()} already; only queued or running "
                "jobs can be cancelled"
            )
        why = reason or "cancelled on request"
        run = self._running.get(job_id)
        if run is None:
            return self._finish(job_id, JobState.CANCELLED, why)
        self.store.update(job_id, cancel_requested=True, message=why)
        run.cancel.set()
        return self.store.get(job_id)

    def feed(self, job: JobRecord) -> _Feed:
        feed = self._feeds.get(job.job_id)
        if feed is None:
            feed = self._feeds[job.job_id] = _Feed(job.last_event_sequence + 1)
            feed.ended = job.state.terminal
        return feed

    # -- scheduling ------------------------------------------------------------------------

    def _schedule(self) -> None:
        if self._stopping or self._loop is None:
            return
        jobs = self.store.all([JobState.QUEUED, JobState.RUNNING])
        for job in runnable(jobs, self.settings.max_jobs):
            self._launch(job)
        self._report_health()

    def _launch(self, job: JobRecord) -> None:
        now = time.time()
        resumed = job.started_at is not None
        record = self.store.update(
            job.job_id, state=JobState.RUNNING, started_at=job.started_at or now
        )
        run = _Running(
            job.job_id, threading.Event(), slots={s["slot_id"]: dict(s) for s in job.slots}
        )
        self._running[job.job_id] = run
        self._state_event(
            record,
            JobState.QUEUED,
            JobState.RUNNING,
            "resuming from the last checkpoint" if resumed else "started",
        )
        run.thread = threading.Thread(
            target=self._train, args=(run, job), name=f"train-{job.job_id}", daemon=True
        )
        run.thread.start()

    # -- the worker thread -----------------------------------------------------------------

    def _submit(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run `coro` on the agent's event loop from a worker thread; its result."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _later(self, fn: Any, *args: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop closed: the agent is gone
            self._loop.call_soon_threadsafe(fn, *args)

    def _train(self, run: _Running, job: JobRecord) -> None:
        growth: GrowthController | None = None
        try:
            spec = spec_from_proto(_spec_pb(job.spec))
            if spec.growth.enabled:
                assert self._channels is not None
                growth = GrowthController(
                    spec.growth,
                    selector=GrpcSeedSelectorClient(self._channels, self.settings.selector_agent),
                    kernels=GrpcKernelSource(self._channels, self.settings.compiler_agent),
                    job_id=job.job_id,
                    seed=spec.seed,
                    runner=self._submit,
                )
            job_dir = self.store.job_dir(job.job_id)
            trainer = Trainer(
                spec,
                events=lambda event: self._later(self._on_event, run, event),
                checkpoints=CheckpointStore(job_dir / "checkpoints", keep=spec.keep_checkpoints),
                growth=growth,
                cancel=run.cancel,
            )
            initial = [s.record.to_json() for s in find_slots(trainer.model).values()]
            self._later(self._set_slots, run, initial)
            result = trainer.run(resume=True)
            self._later(self._set_slots, run, [r.to_json() for r in result.slots])
            if self._stopping and result.status == "cancelled":
                return  # the agent is stopping: the job stays RUNNING and resumes next time
            if result.status == "cancelled":
                self._later(self._finish, job.job_id, JobState.CANCELLED, "")
                return
            outcome = self._complete(job, spec, trainer, result)
            self._later(
                self._finish, job.job_id, JobState.SUCCEEDED, outcome.pop("message"), outcome
            )
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, GraftmeshError):
                _log.error("job failed", job_id=job.job_id, error=message)
                self.ctx.bus.report_error(
                    f"job {job.job_id} failed: {message}",
                    severity=Severity.ERROR,
                    exc=exc,
                    details={"job_id": job.job_id},
                )
            self._later(self._finish, job.job_id, JobState.FAILED, message)
        finally:
            if growth is not None:
                growth.close()

    def _complete(
        self, job: JobRecord, spec: JobSpec, trainer: Trainer, result: TrainingResult
    ) -> dict[str, Any]:
        export_dir = self.store.job_dir(job.job_id) / "model"
        exported = trainer.export(export_dir, job={"job_id": job.job_id})
        notes = []
        if spec.growth.enabled and not result.growth_available:
            notes.append(f"growth unavailable: {result.growth_reason}")
        outcome: dict[str, Any] = {
            "metrics": dict(result.metrics),
            "export_dir": str(export_dir),
            "program_sha256": exported.program_sha256,
            "weights_sha256": exported.weights_sha256,
            "kernel_ids": list(exported.manifest.get("kernel_ids", [])),
            "growth_available": result.growth_available,
            "growth_reason": result.growth_reason,
            "resumed_from_step": result.resumed_from_step,
        }
        name = _spec_pb(job.spec).register_as
        if name:
            stats = input_statistics(trainer.data.train.x)
            tags = dict(_spec_pb(job.spec).tags)
            version = self._submit(self._register(export_dir, name, job.job_id, tags, stats))
            outcome["registered"] = {"name": name, "version": version}
            notes.append(f"registered as {name} version {version}")
        outcome["message"] = "; ".join(notes)
        return outcome

    async def _register(
        self, export_dir: Path, name: str, job_id: str, tags: Mapping[str, str], stats: Any
    ) -> int:
        config = self.ctx.config
        agent = self.settings.registry_agent
        if config is None:
            raise FailedPreconditionError(
                f"register_as {name!r}: no config to find the registry agent {agent!r} in"
            )
        # The trained model is on disk; losing it to a short outage would waste the job.
        wait_s = self.settings.register_wait_s
        async for attempt in rpc_retry(
            attempts=max(3, wait_s), max_delay_s=5.0, max_total_s=wait_s, name="register model"
        ):
            with attempt:
                try:
                    channel = await agent_channel(config, agent)
                except NotFoundError as exc:
                    raise FailedPreconditionError(
                        f"register_as {name!r}: registry agent {agent!r} not found ({exc})"
                    ) from exc
                try:
                    version = await register_model(
                        channel, export_dir, name=name, job_id=job_id, tags=tags, statistics=stats
                    )
                finally:
                    await channel.close()
                return int(version.version)
        raise UnavailableError("register model: no attempt made")  # unreachable

    # -- on the event loop -----------------------------------------------------------------

    def _append(self, job_id: str, step: int, epoch: int, **payload: Any) -> int:
        job = self.store.get(job_id)
        feed = self.feed(job)
        sequence = feed.next_sequence
        feed.next_sequence += 1
        event = trainer_pb2.JobEvent(
            job_id=job_id, sequence=sequence, step=step, epoch=epoch, **payload
        )
        event.timestamp.GetCurrentTime()
        feed.append(event)
        return sequence

    def _on_event(self, run: _Running, event: TrainingEvent) -> None:
        run.step, run.epoch = event.step, event.epoch
        if isinstance(event, SafetyEvent):
            _log.warning("safety", job_id=run.job_id, kind=event.kind, detail=event.detail)
            return
        if isinstance(event, GrowthStatus):
            run.growth_note = "" if event.available else f"growth unavailable: {event.reason}"
            progress = dict(self.store.get(run.job_id).progress)
            metrics = {**progress.get("metrics", {}), "growth_available": float(event.available)}
            self.store.update(
                run.job_id, message=run.growth_note, progress={**progress, "metrics": metrics}
            )
            return
        payload = _event_payload(event)
        if payload is None:
            return
        sequence = self._append(run.job_id, event.step, event.epoch, **payload)
        changes: dict[str, Any] = {"last_event_sequence": sequence}
        if isinstance(event, TrainingProgress):
            old = self.store.get(run.job_id).progress
            metrics = dict(event.metrics)
            if "growth_available" in old.get("metrics", {}):
                metrics["growth_available"] = old["metrics"]["growth_available"]
            changes["progress"] = {
                "step": event.step,
                "epoch": event.epoch,
                "total_steps": event.total_steps,
                "train_loss": event.train_loss,
                "val_loss": event.val_loss if event.val_loss is not None else old.get("val_loss"),
                "metrics": metrics,
                "param_count": event.param_count,
            }
        elif isinstance(event, SlotTransition):
            slot = run.slots.setdefault(event.slot_id, {"slot_id": event.slot_id})
            slot.update(
                state=event.to_state,
                alpha=event.alpha,
                blueprint=event.blueprint,
                kernel_id=event.kernel_id,
                steps_in_state=0,
            )
            changes["slots"] = list(run.slots.values())
        elif isinstance(event, CheckpointSaved):
            changes["checkpoint_path"] = event.path
        self.store.update(run.job_id, **changes)

    def _set_slots(self, run: _Running, slots: list[dict[str, Any]]) -> None:
        run.slots = {s["slot_id"]: s for s in slots}
        self.store.update(run.job_id, slots=slots)

    def _state_event(
        self, job: JobRecord, source: JobState, target: JobState, message: str
    ) -> None:
        run = self._running.get(job.job_id)
        step = run.step if run else int(job.progress.get("step", 0))
        epoch = run.epoch if run else int(job.progress.get("epoch", 0))
        sequence = self._append(
            job.job_id,
            step,
            epoch,
            state_change=trainer_pb2.JobStateChange(
                from_state=_job_state(source), to_state=_job_state(target), message=message
            ),
        )
        self.store.update(job.job_id, last_event_sequence=sequence)
        if target.terminal:
            feed = self._feeds[job.job_id]
            feed.ended = True
        payload = {
            "id": uuid.uuid4().hex,
            "job_id": job.job_id,
            "state": target.value.lower(),
            "from_state": source.value.lower(),
            "message": message,
            "step": step,
            "timestamp": time.time(),
        }
        task = asyncio.ensure_future(
            self.ctx.bus.publish_event(f"events.job.{job.job_id}.{target.value.lower()}", payload)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _finish(
        self,
        job_id: str,
        state: JobState,
        message: str,
        result: Mapping[str, Any] | None = None,
    ) -> JobRecord:
        job = self.store.get(job_id)
        if state is JobState.CANCELLED and not message:
            message = job.message or "cancelled on request"
        run = self._running.get(job_id)
        note = run.growth_note if run is not None else ""
        if note and state is not JobState.CANCELLED and note not in message:
            message = "; ".join(m for m in (message, note) if m)
        changes: dict[str, Any] = {"state": state, "finished_at": time.time(), "message": message}
        if result is not None:
            changes["result"] = dict(result)
        record = self.store.update(job_id, **changes)
        self._state_event(record, job.state, state, message)
        self._running.pop(job_id, None)
        self._schedule()
        return self.store.get(job_id)

    def _report_health(self) -> None:
        running = len(self._running)
        queued = len(self.store.all([JobState.QUEUED]))
        self.ctx.health.update_details(
            hardware=self._hardware,
            running_jobs=running,
            queued_jobs=queued,
            max_jobs=self.settings.max_jobs,
            torch_threads=torch.get_num_threads(),
        )


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    """`TrainerService`: thin; the work is `TrainerAgent`'s."""

    def __init__(self, agent: TrainerAgent) -> None:
        self._agent = agent

    async def SubmitJob(
        self, request: trainer_pb2.SubmitJobRequest, context: Context
    ) -> trainer_pb2.SubmitJobResponse:
        record = self._agent.submit(request.spec, request.request_id)
        return trainer_pb2.SubmitJobResponse(job=job_to_proto(record))

    async def GetJob(
        self, request: trainer_pb2.GetJobRequest, context: Context
    ) -> trainer_pb2.GetJobResponse:
        return trainer_pb2.GetJobResponse(job=job_to_proto(self._agent.store.get(request.job_id)))

    async def WatchJob(
        self, request: trainer_pb2.WatchJobRequest, context: Context
    ) -> AsyncIterator[trainer_pb2.WatchJobResponse]:
        if request.after_sequence < 0:
            raise InvalidArgumentError("must be >= 0", field="after_sequence")
        feed = self._agent.feed(self._agent.store.get(request.job_id))
        cursor = request.after_sequence
        while True:
            changed = feed.changed
            pending = [e for e in feed.events if e.sequence > cursor]
            for event in pending:
                yield trainer_pb2.WatchJobResponse(event=event)
                cursor = event.sequence
                if event.HasField("state_change") and event.state_change.to_state in (
                    common_pb2.JOB_STATE_SUCCEEDED,
                    common_pb2.JOB_STATE_FAILED,
                    common_pb2.JOB_STATE_CANCELLED,
                ):
                    return
            if pending:
                continue
            if feed.ended or self._agent._stopping:
                return
            await changed.wait()

    async def CancelJob(
        self, request: trainer_pb2.CancelJobRequest, context: Context
    ) -> trainer_pb2.CancelJobResponse:
        record = self._agent.cancel(request.job_id, request.reason)
        return trainer_pb2.CancelJobResponse(job=job_to_proto(record))

    async def ListJobs(
        self, request: trainer_pb2.ListJobsRequest, context: Context
    ) -> trainer_pb2.ListJobsResponse:
        states = []
        for i, value in enumerate(request.states):
            if (
                value == common_pb2.JOB_STATE_UNSPECIFIED
                or value not in common_pb2.JobState.values()
            ):
                raise InvalidArgumentError(f"not a job state: {value}", field=f"states.{i}")
            states.append(JobState(common_pb2.JobState.Name(value).removeprefix("JOB_STATE_")))
        jobs, token, total = self._agent.store.page(
            states, request.page.page_size, request.page.page_token
        )
        return trainer_pb2.ListJobsResponse(
            jobs=[job_to_proto(j) for j in jobs],
            page=common_pb2.PageInfo(next_page_token=token, total_size=total),
        )


def build(ctx: AgentContext) -> TrainerAgent:
    """The trainer agent for `ctx`, configured from the environment (see the module doc)."""
    settings = TrainerSettings.from_environ(os.environ)
    torch.set_num_threads(settings.torch_threads)
    return TrainerAgent(ctx, settings)
