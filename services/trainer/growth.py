"""The growth policy: when to grow a seed, where, with what, and what it earned.

While training, `GrowthController` is called after every step (`on_step`) and
after every validation round (`on_eval`):

1. **When.** `PlateauDetector` counts validation rounds without an improvement
   of at least `plateau_min_delta`; after `plateau_patience` of them, if fewer
   than `max_concurrent_seeds` seeds are on trial and a slot is DORMANT, the
   controller asks for a seed.
2. **Where and what.** It offers every (dormant slot, blueprint) arm to the
   `SeedSelectorClient`, with the slot's health features as context
   (`grad_norm` of the wrapped module's parameters, `activation_var` of its
   output on the probe batch, `plateau_length`), each arm's added parameters,
   the remaining parameter budget and the concurrency cap.
3. **The kernel.** The `KernelSource` compiles the chosen blueprint for the
   slot's shape; the kernel is loaded from its bytes (sha256 checked) and
   grafted by `surgery.graft`. A kernel whose graph uses batch statistics also
   gets its eval-mode twin, so validation uses running statistics.
4. **The lifecycle.** Each step ticks the slots: TRAINING for
   `seed_training_steps`, BLENDING for `blend_steps` (alpha from the
   schedule), HOLDING for `holding_steps`, then the evaluation below; a culled
   slot is EMBARGOED for `embargo_steps`, then DORMANT again.
5. **The reward.** At the end of HOLDING the validation loss is measured with
   the seed (`L_with`) and with it ablated (`L_without`):

       improvement = (L_without - L_with) / |L_without|
       reward      = improvement / max(1, added_params / 1000)

   i.e. the relative validation-loss reduction the seed brings, per thousand
   added parameters (seeds under a thousand count as a thousand, so tiny ones
   are not inflated). The seed is FOSSILIZED when `improvement >
   fossilize_min_improvement`, else CULLED. A seed culled for another reason
   (a rejected kernel, a failed graft, a loss spike it is blamed for) earns
   `FAILURE_REWARD`.

Both remote calls go through a `CircuitBreaker` and `rpc_retry`, each attempt
bounded by `call_timeout_s`. When either dependency is unavailable, growth
pauses, training goes on, and `available`/`reason` (and a `GrowthStatus`
event) say so; the next plateau tries again. Rewards that could not be
reported wait in `pending_reports` (kept in checkpoints) and are sent later.

The remote calls are coroutines; `runner` runs one to completion from the
training thread. By default the controller keeps a private event loop; an
agent passes a runner that submits to its own loop
(`asyncio.run_coroutine_threadsafe(coro, loop).result()`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final, Protocol, TypeVar

import numpy as np
import torch
from torch import nn

from common.breaker import BreakerConfig, CircuitBreaker, CircuitOpenError
from common.errors import DeadlineExceededError, GraftmeshError, UnavailableError
from common.kernels import load_kernel
from common.retry import retryable, rpc_retry
from services.trainer.events import GrowthStatus, SlotTransition, TrainingEvent
from services.trainer.lifecycle import (
    ACTIVE_STATES,
    SeedState,
    automatic_transition,
    blend_alpha,
)
from services.trainer.seeds import SeedSlot, SlotShape
from services.trainer.spec import GrowthSpec
from services.trainer.surgery import SurgeryError, cull, find_slots, graft

__all__ = [
    "FAILURE_REWARD",
    "ArmCandidate",
    "BlueprintOption",
    "GrowthController",
    "GrowthHost",
    "KernelArtifact",
    "KernelLoader",
    "KernelSource",
    "PlateauDetector",
    "SeedSelectorClient",
    "Selection",
    "SelectionRequest",
    "seed_reward",
]

T = TypeVar("T")

_log = logging.getLogger(__name__)

FAILURE_REWARD: Final = -1.0
"""Reward of a seed that never got evaluated: rejected kernel, failed graft, blamed spike."""

KernelLoader = Callable[[bytes, str], nn.Module]
"""`loader(data, sha256)`: the trainable module of a kernel archive, checksum verified."""

Runner = Callable[[Coroutine[Any, Any, Any]], Any]


# --- the two boundaries ------------------------------------------------------------------------


@dataclass(frozen=True)
class ArmCandidate:
    """One (slot, blueprint) the selector may choose, with the slot's health features."""

    slot_id: str
    blueprint: str
    added_params: int
    slot_state: str
    features: Mapping[str, float]


@dataclass(frozen=True)
class SelectionRequest:
    """What the selector is asked (mirrors `SelectRequest`)."""

    job_id: str
    arms: tuple[ArmCandidate, ...]
    strategy: str | None
    strategy_params: Mapping[str, float]
    param_budget: int | None
    max_concurrent_seeds: int
    active_seeds: int
    rng_seed: int | None


@dataclass(frozen=True)
class Selection:
    """The selector's answer: the decision id and the chosen arm, or why none."""

    decision_id: str
    slot_id: str | None
    blueprint: str | None
    reason: str


class SeedSelectorClient(Protocol):
    """The seed selector, as the trainer uses it (the whole of that surface)."""

    async def select(self, request: SelectionRequest) -> Selection: ...

    async def report(
        self, decision_id: str, reward: float, metrics: Mapping[str, float]
    ) -> None: ...


@dataclass(frozen=True)
class BlueprintOption:
    """A blueprint that grows in a slot, and the parameters it would add there."""

    name: str
    added_params: int


@dataclass(frozen=True)
class KernelArtifact:
    """A compiled kernel: its id, the sha256 of its bytes, the bytes, its parameter count."""

    kernel_id: str
    sha256: str
    data: bytes
    param_count: int


class KernelSource(Protocol):
    """The blueprint compiler, as the trainer uses it (the whole of that surface)."""

    async def blueprints(self, slot: SlotShape) -> Sequence[BlueprintOption]: ...

    async def compile(
        self, blueprint: str, slot: SlotShape, *, training: bool = True
    ) -> KernelArtifact: ...


class GrowthHost(Protocol):
    """What the controller needs from the training loop."""

    @property
    def model(self) -> nn.Module: ...

    @property
    def optimizer(self) -> torch.optim.Optimizer: ...

    @property
    def step(self) -> int: ...

    @property
    def epoch(self) -> int: ...

    def probe_batch(self) -> torch.Tensor: ...

    def validation_loss(self, *, ablate: str | None = None) -> float: ...

    def remember_kernel(self, sha256: str, data: bytes) -> None: ...

    def emit(self, event: TrainingEvent) -> None: ...


# --- pure parts -------------------------------------------------------------------------------


class PlateauDetector:
    """Validation rounds since the metric last improved by at least `min_delta`."""

    def __init__(self, min_delta: float) -> None:
        self.min_delta = min_delta
        self.best = math.inf
        self.rounds = 0

    def update(self, value: float) -> int:
        if math.isfinite(value) and value < self.best - self.min_delta:
            self.best, self.rounds = value, 0
        else:
            self.rounds += 1
        return self.rounds

    def reset(self) -> None:
        """Start counting again (the best value is kept)."""
        self.rounds = 0

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best if math.isfinite(self.best) else None, "rounds": self.rounds}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best = math.inf if state["best"] is None else float(state["best"])
        self.rounds = int(state["rounds"])


def seed_reward(loss_with: float, loss_without: float, added_params: int) -> tuple[float, float]:
    """`(improvement, reward)` of a seed (see the module doc); failures for non-finite losses."""
    if not (math.isfinite(loss_with) and math.isfinite(loss_without)):
        return -math.inf, FAILURE_REWARD
    improvement = (loss_without - loss_with) / max(abs(loss_without), 1e-12)
    return improvement, improvement / max(1.0, added_params / 1000.0)


def _unavailable(exc: BaseException) -> bool:
    """Whether `exc` means the dependency is away (as opposed to a reasoned refusal)."""
    return isinstance(exc, TimeoutError | CircuitOpenError | DeadlineExceededError) or retryable(
        exc
    )


def _uses_batch_statistics(kernel: nn.Module) -> bool:
    graph = getattr(kernel, "graph", None)
    if graph is None or not kernel.training:
        return False
    return any("batch_norm" in str(node.target) for node in graph.nodes)


@contextlib.contextmanager
def _rng_isolated() -> Iterator[None]:
    python, numpy_state = random.getstate(), np.random.get_state()
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy_state)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


class _PrivateLoop:
    """Runs coroutines to completion on an event loop owned by the calling thread."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None

    def __call__(self, coro: Coroutine[Any, Any, Any]) -> Any:
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(coro)

    def close(self) -> None:
        if self._loop is not None:
            self._loop.close()
            self._loop = None


@dataclass
class _PendingReport:
    decision_id: str
    reward: float
    metrics: dict[str, float] = field(default_factory=dict)


# --- the controller ---------------------------------------------------------------------------


class GrowthController:
    """Grows seeds into a training model; see the module doc for the policy."""

    def __init__(
        self,
        spec: GrowthSpec,
        *,
        selector: SeedSelectorClient | None,
        kernels: KernelSource | None,
        job_id: str = "",
        seed: int | None = None,
        kernel_loader: KernelLoader = load_kernel,
        runner: Runner | None = None,
        breaker: BreakerConfig | None = None,
        attempts: int = 2,
    ) -> None:
        self.spec = spec
        self._selector = selector
        self._kernels = kernels
        self._job_id = job_id
        self._seed = seed
        self._load = kernel_loader
        self._private = _PrivateLoop() if runner is None else None
        self._runner: Runner = runner if runner is not None else self._private  # type: ignore[assignment]
        config = breaker or BreakerConfig(failure_threshold=3, reset_timeout_s=30.0)
        self._breakers = {
            "selector": CircuitBreaker(
                f"trainer.{job_id or 'job'}.selector", config, failure_predicate=_unavailable
            ),
            "kernels": CircuitBreaker(
                f"trainer.{job_id or 'job'}.kernels", config, failure_predicate=_unavailable
            ),
        }
        self._attempts = attempts
        self._timings = spec.timings()
        self.plateau = PlateauDetector(spec.plateau_min_delta)
        self.pending_reports: list[_PendingReport] = []
        self.outcomes: list[dict[str, Any]] = []
        self._blueprints: dict[SlotShape, list[BlueprintOption]] = {}
        self.available = True
        self.reason = ""
        missing = [
            n for n, c in (("seed selector", selector), ("kernel source", kernels)) if c is None
        ]
        if spec.enabled and missing:
            self.available = False
            self.reason = f"growth disabled: no {' and no '.join(missing)} configured"

    def close(self) -> None:
        """Release the private event loop, if any."""
        if self._private is not None:
            self._private.close()

    # -- the loop's entry points --------------------------------------------------------------

    def on_step(self, host: GrowthHost) -> None:
        """Tick every slot one step and make the moves that are due."""
        for slot in find_slots(host.model).values():
            state = slot.state
            if state in (SeedState.DORMANT, SeedState.FOSSILIZED):
                continue
            slot.tick()
            steps = slot.record.steps_in_state
            if state is SeedState.BLENDING:
                slot.set_alpha(
                    blend_alpha(self._timings.blend_schedule, steps, self._timings.blend_steps)
                )
            if state is SeedState.HOLDING:
                if steps >= self._timings.holding_steps:
                    self._judge(host, slot)
                continue
            target = automatic_transition(state, steps, self._timings)
            if target is not None:
                reasons = {
                    SeedState.TRAINING: "germinated; training in isolation",
                    SeedState.BLENDING: f"trained {steps} steps; blending in",
                    SeedState.HOLDING: f"blended over {steps} steps; holding for evaluation",
                    SeedState.EMBARGOED: f"embargoed for {self._timings.embargo_steps} steps",
                    SeedState.DORMANT: "embargo over",
                }
                self._move(host, slot, target, reasons[target])

    def on_eval(self, host: GrowthHost, val_loss: float) -> None:
        """Count the plateau; ask for a seed when it is long enough and there is room."""
        # Code outside the loop (an in-process compiler validating a kernel, a loader)
        # may draw from the global generators; training's random stream must not see it.
        with _rng_isolated():
            self._on_eval(host, val_loss)

    def _on_eval(self, host: GrowthHost, val_loss: float) -> None:
        self._flush_reports()
        rounds = self.plateau.update(val_loss)
        if not self.spec.enabled or rounds < self.spec.plateau_patience:
            return
        if self._selector is None or self._kernels is None:
            return
        slots = find_slots(host.model)
        active = sum(1 for s in slots.values() if s.state in ACTIVE_STATES)
        dormant = [s for s in slots.values() if s.state is SeedState.DORMANT]
        if active >= self.spec.max_concurrent_seeds or not dormant:
            return
        try:
            self._grow(host, dormant, active, rounds)
        except GraftmeshError as exc:
            # A refusal of the request itself (not an outage): training goes on without growth.
            _log.warning("growth request refused: %s", exc)
            self._set_available(False, f"growth request refused: {type(exc).__name__}: {exc}")

    # -- growing -------------------------------------------------------------------------------

    def _grow(self, host: GrowthHost, dormant: list[SeedSlot], active: int, rounds: int) -> None:
        assert self._selector is not None and self._kernels is not None
        kernels, selector = self._kernels, self._selector
        features = self._features(host, dormant, rounds)
        arms: list[ArmCandidate] = []
        for slot in dormant:
            options = self._blueprints.get(slot.shape)
            if options is None:
                found = self._guarded(
                    "kernels", "list blueprints", partial(kernels.blueprints, slot.shape)
                )
                if found is None:
                    return
                options = self._blueprints[slot.shape] = list(found)
            wanted = set(self.spec.blueprints)
            for option in options:
                if wanted and option.name not in wanted:
                    continue
                arms.append(
                    ArmCandidate(
                        slot.slot_id,
                        option.name,
                        option.added_params,
                        slot.state.value,
                        features[slot.slot_id],
                    )
                )
        if not arms:
            self.plateau.reset()
            return
        request = SelectionRequest(
            job_id=self._job_id,
            arms=tuple(arms),
            strategy=self.spec.strategy,
            strategy_params=dict(self.spec.strategy_params),
            param_budget=self._budget_left(host),
            max_concurrent_seeds=self.spec.max_concurrent_seeds,
            active_seeds=active,
            rng_seed=self._seed,
        )
        selection = self._guarded("selector", "select", lambda: selector.select(request))
        # Whatever the answer, wait another `plateau_patience` rounds before asking again.
        self.plateau.reset()
        if selection is None or selection.slot_id is None or selection.blueprint is None:
            return
        chosen = next((s for s in dormant if s.slot_id == selection.slot_id), None)
        if chosen is None:
            self._report(selection.decision_id, FAILURE_REWARD, {"invalid_choice": 1.0})
            return
        self._germinate(host, chosen, selection)

    def _germinate(self, host: GrowthHost, slot: SeedSlot, selection: Selection) -> None:
        assert self._kernels is not None and selection.blueprint is not None
        kernels, blueprint = self._kernels, selection.blueprint
        try:
            artifact = self._guarded(
                "kernels", "compile", lambda: kernels.compile(blueprint, slot.shape, training=True)
            )
        except GraftmeshError as exc:
            self._report(selection.decision_id, FAILURE_REWARD, {"kernel_rejected": 1.0})
            self._note_failure(host, slot, blueprint, f"kernel refused: {exc}")
            return
        if artifact is None:
            return  # the compiler is away; the decision lapses
        try:
            kernel = self._load(artifact.data, artifact.sha256)
            twin, twin_sha = None, ""
            if _uses_batch_statistics(kernel):
                twin_artifact = self._guarded(
                    "kernels",
                    "compile eval",
                    lambda: kernels.compile(blueprint, slot.shape, training=False),
                )
                if twin_artifact is not None:
                    twin, twin_sha = (
                        self._load(twin_artifact.data, twin_artifact.sha256),
                        twin_artifact.sha256,
                    )
                    host.remember_kernel(twin_sha, twin_artifact.data)
            graft(
                host.model,
                slot.slot_id,
                kernel,
                host.probe_batch(),
                optimizer=host.optimizer,
                eval_kernel=twin,
                blueprint=blueprint,
                kernel_id=artifact.kernel_id,
                kernel_sha256=artifact.sha256,
                eval_kernel_sha256=twin_sha,
                decision_id=selection.decision_id,
                step=host.step,
            )
        except (SurgeryError, GraftmeshError) as exc:
            self._report(selection.decision_id, FAILURE_REWARD, {"graft_failed": 1.0})
            self._note_failure(host, slot, blueprint, f"graft failed: {exc}")
            return
        host.remember_kernel(artifact.sha256, artifact.data)
        self._emit_transition(
            host,
            slot,
            SeedState.DORMANT,
            f"selector decision {selection.decision_id}: {selection.reason}",
        )

    def _features(
        self, host: GrowthHost, slots: Sequence[SeedSlot], rounds: int
    ) -> dict[str, dict[str, float]]:
        variances: dict[str, float] = {}
        handles = []
        for slot in slots:

            def capture(_m: nn.Module, _i: Any, out: Any, sid: str = slot.slot_id) -> None:
                if isinstance(out, torch.Tensor):
                    variances[sid] = float(out.detach().float().var())

            handles.append(slot.register_forward_hook(capture))
        was_training = host.model.training
        try:
            host.model.eval()
            with torch.no_grad():
                host.model(host.probe_batch())
        finally:
            host.model.train(was_training)
            for handle in handles:
                handle.remove()
        features = {}
        for slot in slots:
            grads = [p.grad for p in slot.host.parameters() if p.grad is not None]
            norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
            features[slot.slot_id] = {
                "grad_norm": norm if math.isfinite(norm) else 0.0,
                "activation_var": variances.get(slot.slot_id, 0.0),
                "plateau_length": float(rounds),
            }
        return features

    def _budget_left(self, host: GrowthHost) -> int | None:
        if self.spec.budget_params <= 0:
            return None
        used = sum(
            s.record.added_params
            for s in find_slots(host.model).values()
            if s.state in ACTIVE_STATES or s.state is SeedState.FOSSILIZED
        )
        return max(0, self.spec.budget_params - used)

    # -- judging and culling -----------------------------------------------------------------

    def _judge(self, host: GrowthHost, slot: SeedSlot) -> None:
        loss_with = host.validation_loss()
        loss_without = host.validation_loss(ablate=slot.slot_id)
        record = slot.record
        improvement, reward = seed_reward(loss_with, loss_without, record.added_params)
        keep = math.isfinite(improvement) and improvement > self.spec.fossilize_min_improvement
        detail = (
            f"holding: val_loss {loss_without:.6g} without the seed, {loss_with:.6g} with it "
            f"({improvement:+.2%} over {record.added_params} params)"
        )
        decision_id, blueprint = record.decision_id, record.blueprint
        if keep:
            self._move(host, slot, SeedState.FOSSILIZED, detail + "; fossilized")
        else:
            self.cull(host, slot.slot_id, detail + "; culled")
        metrics = {
            "improvement": improvement if math.isfinite(improvement) else -1.0,
            "added_params": float(record.added_params),
            "fossilized": 1.0 if keep else 0.0,
            "val_loss_with": loss_with if math.isfinite(loss_with) else -1.0,
            "val_loss_without": loss_without if math.isfinite(loss_without) else -1.0,
        }
        self.outcomes.append(
            {
                "slot_id": slot.slot_id,
                "blueprint": blueprint,
                "decision_id": decision_id,
                "step": host.step,
                "reward": reward,
                **metrics,
            }
        )
        if decision_id:
            self._report(decision_id, reward, metrics)

    def cull(self, host: GrowthHost, slot_id: str, reason: str) -> None:
        """Remove the seed of `slot_id` (checked by surgery) and record the transition."""
        slot = find_slots(host.model)[slot_id]
        source = slot.state
        cull(host.model, slot_id, host.probe_batch(), optimizer=host.optimizer)
        self._emit_transition(host, slot, source, reason)

    def blame_newest(self, host: GrowthHost, reason: str) -> str | None:
        """Cull the most recently germinated seed still on trial (reward `FAILURE_REWARD`)."""
        active = [s for s in find_slots(host.model).values() if s.state in ACTIVE_STATES]
        if not active:
            return None
        newest = max(active, key=lambda s: s.record.germinated_at_step)
        decision_id, blueprint = newest.record.decision_id, newest.record.blueprint
        self.cull(host, newest.slot_id, reason)
        self.outcomes.append(
            {
                "slot_id": newest.slot_id,
                "blueprint": blueprint,
                "decision_id": decision_id,
                "step": host.step,
                "reward": FAILURE_REWARD,
                "fossilized": 0.0,
            }
        )
        if decision_id:
            self._report(decision_id, FAILURE_REWARD, {"blamed": 1.0})
        return newest.slot_id

    def abandon(self, decision_ids: Sequence[str], reason: str) -> None:
        """Report seeds that vanished (a rollback to before they were grafted) as failures."""
        for decision_id in decision_ids:
            self._report(decision_id, FAILURE_REWARD, {"rolled_back": 1.0})
            self.outcomes.append(
                {"decision_id": decision_id, "reward": FAILURE_REWARD, "reason": reason}
            )

    # -- plumbing ---------------------------------------------------------------------------

    def _move(self, host: GrowthHost, slot: SeedSlot, target: SeedState, reason: str) -> None:
        source = slot.state
        slot.transition(target)
        self._emit_transition(host, slot, source, reason)

    def _emit_transition(
        self, host: GrowthHost, slot: SeedSlot, source: SeedState, reason: str
    ) -> None:
        r = slot.record
        host.emit(
            SlotTransition(
                step=host.step,
                epoch=host.epoch,
                slot_id=r.slot_id,
                from_state=source.value,
                to_state=r.state.value,
                alpha=r.alpha,
                blueprint=r.blueprint,
                kernel_id=r.kernel_id,
                reason=reason,
            )
        )

    def _note_failure(self, host: GrowthHost, slot: SeedSlot, blueprint: str, reason: str) -> None:
        self.outcomes.append(
            {
                "slot_id": slot.slot_id,
                "blueprint": blueprint,
                "step": host.step,
                "reward": FAILURE_REWARD,
                "reason": reason,
            }
        )

    def _report(self, decision_id: str, reward: float, metrics: Mapping[str, float]) -> None:
        self.pending_reports.append(_PendingReport(decision_id, reward, dict(metrics)))
        self._flush_reports()

    def _flush_reports(self) -> None:
        selector = self._selector
        if selector is None:
            return
        while self.pending_reports:
            report = self.pending_reports[0]
            try:
                sent = self._guarded("selector", "report", partial(_send, selector, report))
            except GraftmeshError:
                sent = True  # refused for good (unknown or expired decision): drop it
            if sent is None:
                return
            self.pending_reports.pop(0)

    def _guarded(self, dependency: str, what: str, make: Callable[[], Awaitable[T]]) -> T | None:
        """`make()` through the dependency's breaker and the retry policy, in the runner.

        None when the dependency is unavailable (growth pauses and says why);
        other errors (a reasoned refusal) propagate.
        """
        breaker = self._breakers[dependency]
        timeout = self.spec.call_timeout_s

        async def once() -> T:
            async with asyncio.timeout(timeout):
                return await make()

        async def guarded() -> T:
            async for attempt in rpc_retry(attempts=self._attempts, name=f"growth {what}"):
                with attempt:
                    return await breaker.call(once)
            raise UnavailableError(f"{what}: no attempt made")  # unreachable: reraise=True

        try:
            result: T = self._runner(guarded())
        except Exception as exc:
            if not _unavailable(exc):
                raise
            self._set_available(
                False, f"{dependency} unavailable ({what}): {type(exc).__name__}: {exc}"
            )
            return None
        self._set_available(True, "")
        return result

    def _set_available(self, available: bool, reason: str) -> None:
        self.available, self.reason = available, reason
        self._status_changed = True

    def status_event(self, step: int, epoch: int) -> GrowthStatus | None:
        """A `GrowthStatus` event when availability changed since the last call, else None."""
        if not getattr(self, "_status_changed", False):
            return None
        self._status_changed = False
        return GrowthStatus(step=step, epoch=epoch, available=self.available, reason=self.reason)

    # -- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "plateau": self.plateau.state_dict(),
            "pending_reports": [
                {"decision_id": r.decision_id, "reward": r.reward, "metrics": r.metrics}
                for r in self.pending_reports
            ],
            "outcomes": list(self.outcomes),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.plateau.load_state_dict(state["plateau"])
        self.pending_reports = [
            _PendingReport(str(r["decision_id"]), float(r["reward"]), dict(r["metrics"]))
            for r in state["pending_reports"]
        ]
        self.outcomes = list(state["outcomes"])


async def _send(selector: SeedSelectorClient, report: _PendingReport) -> bool:
    await selector.report(report.decision_id, report.reward, report.metrics)
    return True
