"""`Trainer`: one training job, from a `JobSpec` to a trained (and maybe grown) model.

`Trainer.run()` is synchronous and meant for a worker thread; it checks
`cancel` before every step and reports through `events` (see `events.py`).
Every step:

1. learning rate = base lr x schedule(step) x `lr_scale` (lowered by rollbacks);
2. forward and backward, under autocast when `precision` asks for it (bf16 on
   CPU; fp16 with a gradient scaler or bf16 on CUDA), in `micro_batches`
   chunks with gradient accumulation (doubled after each CUDA OOM, and the
   step retried);
3. a non-finite loss or gradient norm skips the step (counted;
   `max_consecutive_bad_steps` in a row abort); a loss spike (robust z-score,
   `safety.py`) rolls back to the last checkpoint and then culls the newest
   seed on trial, or, with none, multiplies the learning rate by `lr_backoff`;
4. clipping to `grad_clip_norm`, optimizer step;
5. the growth controller ticks the seed lifecycle; every `eval_every_steps`
   (or epoch) a validation round feeds the plateau detector, which may grow a
   seed; checkpoints every `checkpoint_every_steps`, at the start and at the end.

A checkpoint holds everything a bit-exact resume needs (model with grafted
kernels and slot states, optimizer, schedule position, scaler, every RNG, the
sampler position, guard and growth state); `run()` resumes from the newest
valid checkpoint in its store. With the same spec on the same machine (CPU,
`deterministic`), k steps, a resume in a new process, and N - k more steps give
the same weights, bit for bit, as N steps in one go.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from common.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    ResourceExhaustedError,
)
from common.kernels import load_kernel
from services.trainer.checkpoint import CheckpointData, CheckpointInfo, CheckpointStore, json_ready
from services.trainer.data import DataBundle, Split, load_data
from services.trainer.events import (
    CheckpointSaved,
    EventSink,
    GrowthStatus,
    SafetyEvent,
    TrainingEvent,
    TrainingProgress,
)
from services.trainer.export import ExportedModel, export_model
from services.trainer.growth import GrowthController, KernelLoader
from services.trainer.hardware import choose_device
from services.trainer.lifecycle import ACTIVE_STATES
from services.trainer.models import build_model, slot_sites
from services.trainer.plugins import (
    CALLBACKS,
    LOSSES,
    OPTIMIZERS,
    SCHEDULES,
    Callback,
    CallbackContext,
    LossFn,
)
from services.trainer.safety import GradientGuard, SpikeDetector, TrainingAborted, grad_norm
from services.trainer.sampler import EpochSampler
from services.trainer.seeds import SlotRecord
from services.trainer.spec import JobSpec, parse_job_spec
from services.trainer.state import (
    build_optimizer_from_state,
    capture_rng,
    load_model_tensors,
    model_tensors,
    optimizer_state,
    restore_rng,
)
from services.trainer.surgery import HOST_GROUP, find_slots, insert_slot

__all__ = ["StepOutcome", "Trainer", "TrainingResult"]

_log = logging.getLogger(__name__)

_PROBE_SIZE = 8
_EVAL_BATCH = 1024
# Spec fields a checkpoint must agree on with the job resuming from it.
_RESUME_FIELDS = ("model", "slots", "data", "optimizer", "loss", "precision")

StepOutcome = Literal["ok", "skipped", "rollback"]


@dataclass(frozen=True)
class TrainingResult:
    """How a run ended and what it produced."""

    status: Literal["succeeded", "cancelled"]
    step: int
    epoch: int
    reason: str
    metrics: Mapping[str, float]
    param_count: int
    slots: tuple[SlotRecord, ...]
    growth_available: bool
    growth_reason: str
    skipped_steps: int
    rollbacks: int
    checkpoint: CheckpointInfo | None = None
    resumed_from_step: int | None = None
    outcomes: tuple[Mapping[str, Any], ...] = field(default_factory=tuple)


class Trainer:
    """Trains one job (see the module doc); build it, then call `run()` once.

    Collaborators are passed in: `data` (else loaded from the spec),
    `checkpoints` (a store to save to and resume from; without one, rollbacks
    use an in-memory copy of the last checkpoint), `growth` (else one without
    a selector, which only runs the lifecycle of seeds already there),
    `kernel_loader` (bytes + sha256 -> module), `cancel` (set it to stop after
    the current step) and `events`.
    """

    def __init__(
        self,
        spec: JobSpec | Mapping[str, Any],
        *,
        data: DataBundle | None = None,
        events: EventSink | None = None,
        checkpoints: CheckpointStore | None = None,
        growth: GrowthController | None = None,
        kernel_loader: KernelLoader = load_kernel,
        cancel: threading.Event | None = None,
    ) -> None:
        self.spec = spec = parse_job_spec(spec)
        self.device = choose_device(spec.device)
        self._autocast_dtype = _autocast_dtype(spec.precision, self.device)
        bundle = data if data is not None else load_data(spec.data)
        self.data = bundle
        self._train = bundle.train.to(self.device)
        self._val = bundle.val.to(self.device) if bundle.val is not None else None
        self._test = bundle.test.to(self.device) if bundle.test is not None else None
        self._events = events
        self.checkpoints = checkpoints
        self._owns_growth = growth is None
        self.growth = growth or GrowthController(spec.growth, selector=None, kernels=None)
        self._load_kernel = kernel_loader
        self._cancel = cancel or threading.Event()
        self._loss_fn = _build_loss(spec)
        self.sampler = EpochSampler(len(self._train), spec.data.batch_size, spec.seed)
        self.total_steps = _total_steps(spec, self.sampler.batches_per_epoch)
        self._schedule = _build_schedule(spec, self.total_steps)
        self._callbacks = _build_callbacks(spec)
        self.guard = GradientGuard(spec.safety.max_consecutive_bad_steps)
        self.spikes = SpikeDetector(spec.safety.loss_spike_z_threshold, spec.safety.spike_window)
        self._probe = self._train.x[:_PROBE_SIZE]
        self.kernel_blobs: dict[str, bytes] = {}
        self._step = 0
        self.lr_scale = 1.0
        self.micro_batches = 1
        self.rollbacks = 0
        self.last_metrics: dict[str, float] = {}
        self._last_good: CheckpointData | None = None
        self._last_info: CheckpointInfo | None = None
        self._resumed_from: int | None = None
        self._scaler = _build_scaler(spec, self.device)
        self._compiled: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._train_losses: list[float] = []
        self._eval_batch = _EVAL_BATCH
        self._progress_clock = time.perf_counter()
        self._progress_samples = 0
        _seed_everything(spec.seed)
        self._model = self._build_host()
        for slot in spec.slots:
            insert_slot(self._model, slot.module_path, self._probe, kind=slot.kind)
        if not spec.slots and spec.growth.enabled:
            # Growth without named slots: every site the template suggests.
            for site in slot_sites(self._model):
                insert_slot(self._model, site, self._probe)
        self._optimizer = self._make_optimizer(
            [
                {
                    "params": list(self._model.parameters()),
                    "name": HOST_GROUP,
                    "base_lr": spec.optimizer.lr,
                }
            ]
        )
        self._ctx = CallbackContext(self._model, self._optimizer)

    # -- GrowthHost --------------------------------------------------------------------------

    @property
    def model(self) -> nn.Module:
        return self._model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self._optimizer

    @property
    def step(self) -> int:
        return self._step

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def probe_batch(self) -> torch.Tensor:
        return self._probe

    def validation_loss(self, *, ablate: str | None = None) -> float:
        split = self._val if self._val is not None else self._train
        if ablate is None:
            return self.evaluate(split)["loss"]
        with find_slots(self._model)[ablate].ablated():
            return self.evaluate(split)["loss"]

    def remember_kernel(self, sha256: str, data: bytes) -> None:
        self.kernel_blobs[sha256] = data

    def emit(self, event: TrainingEvent) -> None:
        if self._events is None:
            return
        try:
            self._events(event)
        except Exception:
            _log.exception("event sink failed on %s", type(event).__name__)

    # -- running -----------------------------------------------------------------------------

    def run(self, *, resume: bool = True) -> TrainingResult:
        """Train to the step limit (resuming from the newest valid checkpoint when `resume`).

        Raises `TrainingAborted` when training went bad beyond the safety
        limits, `ResourceExhaustedError` when a single sample does not fit in
        memory; returns `status="cancelled"` when `cancel` was set.
        """
        try:
            with _determinism(self.spec.deterministic, self.device):
                return self._run(resume)
        finally:
            if self._owns_growth:
                self.growth.close()

    def _run(self, resume: bool) -> TrainingResult:
        found = self._resume_point() if resume else None
        if found is not None:
            info, data = found
            self._restore(data)
            self._last_good, self._last_info = data, info
            self._resumed_from = self._step
        ctx = self._ctx
        self._sync_ctx()
        for callback in self._callbacks:
            callback.on_train_start(ctx)
        if self._resumed_from is None:
            self._save_checkpoint()
        if self.spec.growth.enabled and not self.growth.available:
            self.emit(GrowthStatus(self._step, self.epoch, False, self.growth.reason))
        status: Literal["succeeded", "cancelled"] = "succeeded"
        reason = "reached the step limit"
        last_eval = -1
        while self._step < self.total_steps:
            if self._cancel.is_set():
                status, reason = "cancelled", "cancelled"
                break
            if ctx.stop_reason is not None:
                reason = ctx.stop_reason
                break
            indices = self.sampler.next_batch()
            if indices is None:
                if self.spec.eval_every_steps == 0:
                    self._validation_round()
                    last_eval = self._step
                continue
            outcome = self._train_step(indices)
            if outcome == "rollback":
                continue
            self._step += 1
            self.growth.on_step(self)
            every = self.spec.eval_every_steps
            if every and self._step % every == 0:
                self._validation_round()
                last_eval = self._step
            elif self._step % self.spec.progress_every_steps == 0:
                self._progress(None)
            if (
                self.spec.checkpoint_every_steps
                and self._step % self.spec.checkpoint_every_steps == 0
            ):
                self._save_checkpoint()
        if last_eval != self._step:
            self._progress(None)
        for callback in self._callbacks:
            callback.on_train_end(ctx)
        metrics = self.final_metrics()
        self._save_checkpoint()
        slots = find_slots(self._model)
        return TrainingResult(
            status=status,
            step=self._step,
            epoch=self.epoch,
            reason=reason,
            metrics=metrics,
            param_count=self.param_count(),
            slots=tuple(SlotRecord.from_json(s.record.to_json()) for s in slots.values()),
            growth_available=self.growth.available,
            growth_reason=self.growth.reason,
            skipped_steps=self.guard.skipped,
            rollbacks=self.rollbacks,
            checkpoint=self._last_info,
            resumed_from_step=self._resumed_from,
            outcomes=tuple(self.growth.outcomes),
        )

    def export(self, out_dir: Path | str, *, job: Mapping[str, Any] | None = None) -> ExportedModel:
        """Write `model.pt2`, `model.safetensors` and `manifest.json` of the current model."""
        slots = find_slots(self._model)
        return export_model(
            self._model,
            out_dir,
            example=self._train.x[:2],
            reference_inputs=self._train.x,
            host=self.spec.model.model_dump(mode="json"),
            slots=[s.record for s in slots.values()],
            metrics=self.final_metrics(),
            num_outputs=self.data.num_outputs,
            task=self.data.task,
            job={"name": self.spec.name, "step": self._step, **(job or {})},
        )

    def param_count(self) -> int:
        return sum(p.numel() for p in self._model.parameters())

    # -- one step ----------------------------------------------------------------------------

    def _train_step(self, indices: torch.Tensor) -> StepOutcome:
        x = self._train.x[indices]
        y = self._train.y[indices]
        self._set_learning_rate()
        self._sync_ctx()
        for callback in self._callbacks:
            callback.on_step_start(self._ctx)
        self._model.train()
        while True:
            try:
                loss = self._forward_backward(x, y)
                break
            except torch.OutOfMemoryError:
                self._optimizer.zero_grad(set_to_none=True)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if self.micro_batches * 2 > len(x):
                    raise ResourceExhaustedError(
                        f"out of memory at step {self._step} even one sample at a time; use a "
                        "smaller model or a device with more memory"
                    ) from None
                self.micro_batches *= 2
                self.emit(
                    SafetyEvent(
                        self._step,
                        self.epoch,
                        "oom",
                        f"out of memory; retrying the step in {self.micro_batches} micro-batches",
                        self.micro_batches,
                    )
                )
        loss = self._synchronize_gradients(loss, len(x))
        self._ctx.loss = loss.detach()
        for callback in self._callbacks:
            callback.on_after_backward(self._ctx)
        value = float(loss)
        self._progress_samples += len(x)
        if not math.isfinite(value):
            return self._skip("loss", f"non-finite loss {value}")
        if self.spikes.enabled:
            z = self.spikes.observe(value)
            if z is not None:
                self.guard.record(False, self._step, "or spiking losses")
                detail = f"loss {value:.6g} is a spike (robust z {z:.1f})"
                self.emit(SafetyEvent(self._step, self.epoch, "spike", detail, self.guard.skipped))
                if self.spec.safety.spike_action == "rollback":
                    self._rollback(detail)
                    return "rollback"
                self._optimizer.zero_grad(set_to_none=True)
                return "skipped"
        else:
            self.spikes.observe(value)
        params = [p for g in self._optimizer.param_groups for p in g["params"]]
        scaler = self._scaler
        if scaler is not None:
            scaler.unscale_(self._optimizer)
        norm = grad_norm(params)
        if not bool(torch.isfinite(norm)):
            if scaler is not None:
                scaler.step(self._optimizer)  # skips the update, having seen the inf
                scaler.update()
            return self._skip("gradients", f"non-finite gradient norm {float(norm)}")
        self.guard.record(True, self._step, "")
        clip = self.spec.safety.grad_clip_norm
        if clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, clip, norm)
        if scaler is not None:
            scaler.step(self._optimizer)
            scaler.update()
        else:
            self._optimizer.step()
        self._train_losses.append(value)
        for callback in self._callbacks:
            callback.on_step_end(self._ctx)
        return "ok"

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self._optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        n = len(x)
        for xc, yc in zip(
            x.tensor_split(self.micro_batches), y.tensor_split(self.micro_batches), strict=True
        ):
            if len(xc) == 0:
                continue
            with self._autocast():
                out = self._forward(xc)
            loss = self._loss_fn(out.float(), yc) * (len(xc) / n)
            scaled = self._scaler.scale(loss) if self._scaler is not None else loss
            torch.autograd.backward(scaled)
            total = total + loss.detach()
        return total

    def _synchronize_gradients(self, loss: torch.Tensor, samples: int) -> torch.Tensor:
        """The step's loss once every replica's gradients are combined (data parallelism).

        One process trains alone: gradients and loss stay as they are. A
        data-parallel subclass (`ddp.py`) combines the gradients of its
        `samples` with the other ranks' and returns the loss of the whole batch,
        so every decision taken from it (skip, spike, rollback) is the same on
        every rank.
        """
        del samples
        return loss

    def _skip(self, what: str, detail: str) -> StepOutcome:
        self._optimizer.zero_grad(set_to_none=True)
        self.guard.record(False, self._step, what)
        self.emit(
            SafetyEvent(
                self._step, self.epoch, "nonfinite", detail + "; step skipped", self.guard.skipped
            )
        )
        return "skipped"

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.spec.compile:
            out: torch.Tensor = self._model(x)
            return out
        if self._compiled is None:
            self._compiled = torch.compile(self._model)
        try:
            result: torch.Tensor = self._compiled(x)
            return result
        except Exception as exc:  # the compiler's failures are many and unnamed; eager still works
            self.spec = self.spec.model_copy(update={"compile": False})
            self._compiled = None
            self.emit(
                SafetyEvent(
                    self._step,
                    self.epoch,
                    "compile_fallback",
                    f"torch.compile failed ({exc}); running eager",
                    1,
                )
            )
            out = self._model(x)
            return out

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self._autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self._autocast_dtype)

    def _set_learning_rate(self) -> None:
        factor = self._schedule(self._step) * self.lr_scale
        for group in self._optimizer.param_groups:
            group["lr"] = group.get("base_lr", self.spec.optimizer.lr) * factor

    def _sync_ctx(self) -> None:
        ctx = self._ctx
        ctx.model, ctx.optimizer, ctx.step, ctx.epoch = (
            self._model,
            self._optimizer,
            self._step,
            self.epoch,
        )

    # -- evaluation --------------------------------------------------------------------------

    def evaluate(self, split: Split) -> dict[str, float]:
        """Mean loss (and accuracy, for classification) of the model on `split`, in eval mode.

        Runs in batches of up to 1024 samples, halved after each out-of-memory error.
        """
        while True:
            try:
                return self._evaluate(split, self._eval_batch)
            except torch.OutOfMemoryError:
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if self._eval_batch == 1:
                    raise ResourceExhaustedError(
                        "out of memory evaluating a single sample; use a smaller model"
                    ) from None
                self._eval_batch //= 2

    @torch.no_grad()
    def _evaluate(self, split: Split, batch: int) -> dict[str, float]:
        was_training = self._model.training
        self._model.eval()
        total, correct = 0.0, 0
        try:
            for start in range(0, len(split), batch):
                x = split.x[start : start + batch]
                y = split.y[start : start + batch]
                with self._autocast():
                    out = self._model(x)
                total += float(self._loss_fn(out.float(), y)) * len(x)
                if self.data.task == "classification":
                    correct += int((out.argmax(-1) == y).sum())
        finally:
            self._model.train(was_training)
        n = max(1, len(split))
        metrics = {"loss": total / n}
        if self.data.task == "classification":
            metrics["accuracy"] = correct / n
        return metrics

    def _validation_round(self) -> None:
        split = self._val if self._val is not None else self._train
        metrics = {f"val_{k}": v for k, v in self.evaluate(split).items()}
        self.last_metrics.update(metrics)
        self._sync_ctx()
        self._ctx.metrics = dict(metrics)
        for callback in self._callbacks:
            callback.on_eval(self._ctx, metrics)
        self.growth.on_eval(self, metrics["val_loss"])
        status = self.growth.status_event(self._step, self.epoch)
        if status is not None:
            self.emit(status)
        self._progress(metrics)

    def final_metrics(self) -> dict[str, float]:
        """Loss and accuracy on every split (train, val, test), for reporting only."""
        metrics: dict[str, float] = {}
        for name, split in (("train", self._train), ("val", self._val), ("test", self._test)):
            if split is not None:
                metrics.update({f"{name}_{k}": v for k, v in self.evaluate(split).items()})
        return metrics

    def _progress(self, val: Mapping[str, float] | None) -> None:
        now = time.perf_counter()
        elapsed = max(1e-9, now - self._progress_clock)
        losses = self._train_losses
        train_loss = sum(losses) / len(losses) if losses else math.nan
        metrics = dict(val or {})
        self.emit(
            TrainingProgress(
                step=self._step,
                epoch=self.epoch,
                total_steps=self.total_steps,
                train_loss=train_loss,
                val_loss=metrics.get("val_loss"),
                metrics=metrics,
                learning_rate=float(self._optimizer.param_groups[0]["lr"]),
                samples_per_s=self._progress_samples / elapsed,
                param_count=self.param_count(),
            )
        )
        self._train_losses = []
        self._progress_clock, self._progress_samples = now, 0

    # -- checkpoints, rollback, resume -----------------------------------------------------------

    def _capture(self) -> CheckpointData:
        data = CheckpointData()
        slots = find_slots(self._model)
        data.state = {
            "format": 1,
            "spec": self.spec.model_dump(mode="json"),
            "step": self._step,
            "lr_scale": self.lr_scale,
            "micro_batches": self.micro_batches,
            "rollbacks": self.rollbacks,
            "slots": [s.record.to_json() for s in slots.values()],
            "sampler": self.sampler.state_dict(),
            "guard": self.guard.state_dict(),
            "spikes": self.spikes.state_dict(),
            "growth": self.growth.state_dict(),
            "callbacks": [c.state_dict() for c in self._callbacks],
            "scaler": self._scaler.state_dict() if self._scaler is not None else None,
            "last_metrics": dict(self.last_metrics),
        }
        model_tensors(self._model, data)
        optimizer_state(self._optimizer, self._model, data)
        capture_rng(data)
        for slot in slots.values():
            for sha in (slot.record.kernel_sha256, slot.record.eval_kernel_sha256):
                if sha:
                    data.blobs[f"kernel/{sha}"] = self.kernel_blobs[sha]
        data.state = _json_safe(json_ready(data.state))
        # Views of live tensors would change under the snapshot as training goes on.
        data.tensors = {k: v.detach().clone() for k, v in data.tensors.items()}
        return data

    def _save_checkpoint(self) -> None:
        data = self._capture()
        self._last_good = data
        if self.checkpoints is None:
            return
        try:
            info = self.checkpoints.save(self._step, data)
        except OSError as exc:
            self.emit(
                SafetyEvent(
                    self._step, self.epoch, "checkpoint_failed", f"checkpoint not written: {exc}", 1
                )
            )
            return
        self._last_info = info
        self.emit(
            CheckpointSaved(self._step, self.epoch, str(info.path), info.sha256, info.size_bytes)
        )

    def _rollback(self, detail: str) -> None:
        self.rollbacks += 1
        if self.rollbacks > self.spec.safety.max_rollbacks:
            raise TrainingAborted(
                f"loss spikes kept coming after {self.spec.safety.max_rollbacks} rollbacks (last: "
                f"{detail} at step {self._step}); lower optimizer.lr or raise "
                "safety.loss_spike_z_threshold"
            )
        target = self._last_good
        if target is None and self.checkpoints is not None:
            found = self.checkpoints.load_latest()
            target = found[1] if found is not None else None
        if target is None:
            raise TrainingAborted(
                f"{detail} at step {self._step} and no checkpoint to roll back to"
            )
        before = {
            s.record.decision_id
            for s in find_slots(self._model).values()
            if s.state in ACTIVE_STATES and s.record.decision_id
        }
        had_active = any(s.state in ACTIVE_STATES for s in find_slots(self._model).values())
        keep = (
            self.guard.state_dict(),
            self.rollbacks,
            self.lr_scale,
            self.growth.pending_reports,
            self.growth.outcomes,
        )
        from_step = self._step
        self._restore(target)
        guard, self.rollbacks, self.lr_scale, pending, outcomes = keep
        self.guard.load_state_dict(guard)
        self.growth.pending_reports, self.growth.outcomes = pending, outcomes
        after = {
            s.record.decision_id for s in find_slots(self._model).values() if s.record.decision_id
        }
        vanished = sorted(before - after)
        if vanished:
            self.growth.abandon(vanished, f"rolled back past its graft ({detail})")
        remedy = "lr unchanged"
        if had_active and not vanished:
            culled = self.growth.blame_newest(self, f"culled: blamed for a loss spike ({detail})")
            remedy = f"culled the newest seed {culled}" if culled else remedy
        elif not had_active:
            self.lr_scale *= self.spec.safety.lr_backoff
            remedy = f"learning rate x{self.lr_scale:g}"
        self.emit(
            SafetyEvent(
                self._step,
                self.epoch,
                "rollback",
                f"{detail}: rolled back from step {from_step} to step {self._step}; {remedy}",
                self.rollbacks,
            )
        )

    def _restore(self, data: CheckpointData) -> None:
        state = data.state
        saved_spec = state["spec"]
        current = self.spec.model_dump(mode="json")
        for key in _RESUME_FIELDS:
            if saved_spec.get(key) != current.get(key):
                raise FailedPreconditionError(
                    f"checkpoint was written for another {key} spec; resume with the same "
                    f"{key} or start from an empty checkpoint folder"
                )
        model = self._build_host()
        blobs = {}
        for raw in state["slots"]:
            record = SlotRecord.from_json(raw)
            slot = insert_slot(model, record.slot_id, self._probe, kind=record.shape.kind)
            kernel = self._kernel_from(data, record.kernel_sha256)
            twin = self._kernel_from(data, record.eval_kernel_sha256)
            slot.restore(record, kernel, twin)
            for sha in (record.kernel_sha256, record.eval_kernel_sha256):
                if sha:
                    blobs[sha] = data.blobs[f"kernel/{sha}"]
        load_model_tensors(model, data)
        self._model = model
        self._compiled = None
        self.kernel_blobs = blobs
        self._optimizer = build_optimizer_from_state(data, model, self._make_optimizer)
        self._ctx.model, self._ctx.optimizer = model, self._optimizer
        self._step = int(state["step"])
        self.lr_scale = float(state["lr_scale"])
        self.micro_batches = int(state["micro_batches"])
        self.rollbacks = int(state["rollbacks"])
        self.sampler.load_state_dict(state["sampler"])
        self.guard.load_state_dict(state["guard"])
        self.spikes.load_state_dict(state["spikes"])
        self.growth.load_state_dict(state["growth"])
        for callback, saved in zip(self._callbacks, state["callbacks"], strict=False):
            callback.load_state_dict(saved)
        if self._scaler is not None and state["scaler"] is not None:
            self._scaler.load_state_dict(state["scaler"])
        self.last_metrics = {k: float(v) for k, v in state["last_metrics"].items() if v is not None}
        restore_rng(data)

    def _resume_point(self) -> tuple[CheckpointInfo, CheckpointData] | None:
        """The checkpoint `run()` resumes from: the newest valid one in the store, if any.

        A data-parallel subclass reads it on rank 0 and hands the same bytes to
        every rank.
        """
        return self.checkpoints.load_latest() if self.checkpoints is not None else None

    def _kernel_from(self, data: CheckpointData, sha: str) -> nn.Module | None:
        if not sha:
            return None
        blob = data.blobs.get(f"kernel/{sha}")
        if blob is None:
            raise FailedPreconditionError(f"checkpoint lacks the bytes of kernel {sha}")
        kernel = self._load_kernel(blob, sha)
        return kernel.to(self.device)

    # -- building ----------------------------------------------------------------------------

    def _build_host(self) -> nn.Module:
        return build_model(self.spec.model, self.data.shape).to(self.device)

    def _make_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        spec = self.spec.optimizer
        factory = OPTIMIZERS.resolve(spec.name)
        try:
            return factory(groups, lr=spec.lr, weight_decay=spec.weight_decay, **spec.extra)
        except (TypeError, ValueError) as exc:
            raise InvalidArgumentError(
                f"optimizer {spec.name!r} rejected its settings: {exc}", field="optimizer.extra"
            ) from exc


# --- helpers -----------------------------------------------------------------------------------


def _total_steps(spec: JobSpec, per_epoch: int) -> int:
    limits = [spec.max_steps] if spec.max_steps else []
    if spec.epochs:
        limits.append(spec.epochs * per_epoch)
    return min(limits)


def _build_loss(spec: JobSpec) -> LossFn:
    factory = LOSSES.resolve(spec.loss.name)
    try:
        return factory(**spec.loss.params)
    except TypeError as exc:
        raise InvalidArgumentError(f"loss {spec.loss.name!r}: {exc}", field="loss.params") from exc


def _build_schedule(spec: JobSpec, total_steps: int) -> Callable[[int], float]:
    factory = SCHEDULES.resolve(spec.scheduler.name)
    try:
        return factory(
            total_steps=total_steps,
            warmup_steps=spec.scheduler.warmup_steps,
            base_lr=spec.optimizer.lr,
            **spec.scheduler.params,
        )
    except TypeError as exc:
        raise InvalidArgumentError(
            f"scheduler {spec.scheduler.name!r}: {exc}", field="scheduler.params"
        ) from exc


def _build_callbacks(spec: JobSpec) -> list[Callback]:
    callbacks = []
    for index, ref in enumerate(spec.callbacks):
        factory = CALLBACKS.resolve(ref.name)
        try:
            callback = factory(**ref.params)
        except TypeError as exc:
            raise InvalidArgumentError(
                f"callback {ref.name!r}: {exc}", field=f"callbacks.{index}.params"
            ) from exc
        if not isinstance(callback, Callback):
            raise InvalidArgumentError(
                f"callback {ref.name!r} built a {type(callback).__name__}; subclass "
                "services.trainer.plugins.Callback",
                field=f"callbacks.{index}.name",
            )
        callbacks.append(callback)
    return callbacks


def _build_scaler(spec: JobSpec, device: torch.device) -> torch.amp.GradScaler | None:
    if spec.precision == "fp16" and device.type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32":
        return None
    if precision == "fp16" and device.type != "cuda":
        raise InvalidArgumentError(
            "fp16 training needs a CUDA device; use precision bf16 on CPU", field="precision"
        )
    return torch.float16 if precision == "fp16" else torch.bfloat16


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


@contextlib.contextmanager
def _determinism(enabled: bool, device: torch.device) -> Iterator[None]:
    if not enabled:
        yield
        return
    previous = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    benchmark = torch.backends.cudnn.benchmark
    if device.type == "cuda":
        # cuBLAS is deterministic only with a fixed workspace (set before its first use).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=warn_only)
        torch.backends.cudnn.benchmark = benchmark
