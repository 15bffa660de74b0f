"""The training job spec: typed, validated on construction, unknown keys refused.

It mirrors `graftmesh.v1.JobSpec` field by field (same names), with the
proto's "0 means ..." conventions turned into explicit defaults; the servicer
maps one onto the other. `parse_job_spec` turns untrusted data into a
`JobSpec` and raises `InvalidArgumentError` whose `field` is the path of the
offending value (`growth.blend_steps`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from common.errors import InvalidArgumentError
from services.trainer.lifecycle import BlendSchedule, LifecycleTimings

__all__ = [
    "DataSpec",
    "GrowthSpec",
    "JobSpec",
    "LossSpec",
    "ModelSpec",
    "OptimizerSpec",
    "PluginRef",
    "SafetySpec",
    "SchedulerSpec",
    "SlotConfig",
    "parse_job_spec",
]

NonNegInt = Annotated[int, Field(ge=0)]
PosInt = Annotated[int, Field(gt=0)]
Finite = Annotated[float, Field(allow_inf_nan=False)]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Spec):
    """The host: a built-in `template` (`mlp`, `cnn`, `resnet`, `transformer`) or a
    `factory` (`package.module:callable`), called with `params` as keyword arguments."""

    template: str | None = None
    factory: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.template is None) == (self.factory is None):
            raise ValueError("set exactly one of template (e.g. 'mlp') or factory ('pkg.mod:fn')")
        return self


class SlotConfig(_Spec):
    """A seed slot around the module at `module_path` (also the slot's id).

    `kind` None infers it from the module's output: 2-D -> linear, 4-D ->
    conv2d, 3-D -> conv2d over (C, 1, L) for a Conv1d, linear over the last
    dimension otherwise.
    """

    module_path: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")]
    kind: Literal["linear", "conv2d"] | None = None


class DataSpec(_Spec):
    """Where the data comes from: a built-in `dataset` or a `.npz`/`.csv` `path`."""

    dataset: str | None = None
    path: str | None = None
    batch_size: PosInt = 64
    val_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    num_workers: NonNegInt = 0
    """Accepted for the contract; data sets are held in memory, so no loader workers run."""
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        if (self.dataset is None) == (self.path is None):
            raise ValueError("set exactly one of dataset (e.g. 'two_spirals') or path")
        return self


class OptimizerSpec(_Spec):
    """A registered optimizer (`adamw`, `adam`, `sgd` or `module:name`) and its settings."""

    name: str = "adamw"
    lr: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1e-3
    weight_decay: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    extra: dict[str, Any] = Field(default_factory=dict)


class SchedulerSpec(_Spec):
    """An LR schedule (`constant`, `cosine`, `step`, `linear` or `module:name`)."""

    name: str = "constant"
    warmup_steps: NonNegInt = 0
    params: dict[str, Any] = Field(default_factory=dict)


class LossSpec(_Spec):
    """A loss (`cross_entropy`, `mse` or `module:name`) and its keyword arguments."""

    name: str = "cross_entropy"
    params: dict[str, Any] = Field(default_factory=dict)


class PluginRef(_Spec):
    """A callback: a registered name or `module:name`, built with `params`."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class GrowthSpec(_Spec):
    """When and how the model grows (see `growth.py`)."""

    enabled: bool = False
    budget_params: NonNegInt = 0
    """Most parameters all seeds together may add; 0 means no limit."""
    max_concurrent_seeds: PosInt = 1
    strategy: Literal["ucb1", "thompson", "epsilon_greedy", "linucb"] | None = None
    strategy_params: dict[str, float] = Field(default_factory=dict)
    plateau_patience: PosInt = 3
    plateau_min_delta: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 1e-3
    seed_training_steps: NonNegInt = 100
    blend_steps: NonNegInt = 100
    blend_schedule: BlendSchedule = BlendSchedule.LINEAR
    holding_steps: NonNegInt = 50
    embargo_steps: NonNegInt = 200
    blueprints: tuple[str, ...] = ()
    """Catalogue blueprints to offer; empty offers every one that fits the slot kind."""
    fossilize_min_improvement: Finite = 0.0
    """A seed in HOLDING is fossilized when it lowers the validation loss (relative) by more."""
    call_timeout_s: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 60.0
    """Deadline of one call to the selector or the kernel source."""

    def timings(self) -> LifecycleTimings:
        return LifecycleTimings(
            seed_training_steps=self.seed_training_steps,
            blend_steps=self.blend_steps,
            blend_schedule=self.blend_schedule,
            holding_steps=self.holding_steps,
            embargo_steps=self.embargo_steps,
        )


class SafetySpec(_Spec):
    """Guards against a run going bad (see `safety.py`)."""

    grad_clip_norm: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    """Max gradient norm; 0 disables clipping."""
    max_consecutive_bad_steps: PosInt = 10
    loss_spike_z_threshold: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    """Robust z-score above which a loss counts as a spike; 0 disables spike detection."""
    spike_window: Annotated[int, Field(ge=8)] = 50
    spike_action: Literal["rollback", "skip"] = "rollback"
    max_rollbacks: NonNegInt = 3
    lr_backoff: Annotated[float, Field(gt=0, le=1)] = 0.5
    """Factor applied to the learning rate after each rollback without a seed to blame."""


class JobSpec(_Spec):
    """Everything a training job needs; training stops at `epochs` or `max_steps`."""

    name: str = ""
    model: ModelSpec
    slots: tuple[SlotConfig, ...] = ()
    """Empty with growth enabled: a slot at every site the template suggests."""
    data: DataSpec
    optimizer: OptimizerSpec = OptimizerSpec()
    scheduler: SchedulerSpec = SchedulerSpec()
    loss: LossSpec = LossSpec()
    epochs: NonNegInt = 0
    max_steps: NonNegInt = 0
    eval_every_steps: NonNegInt = 0
    """Validate (and consider growth) every this many steps; 0 means once per epoch."""
    growth: GrowthSpec = GrowthSpec()
    safety: SafetySpec = SafetySpec()
    seed: int = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    device: str = ""
    """torch device; empty picks CUDA when there is one, else CPU."""
    deterministic: bool = False
    checkpoint_every_steps: NonNegInt = 0
    """0 saves only at the start and the end."""
    keep_checkpoints: PosInt = 3
    compile: bool = False
    """Run the forward through `torch.compile` (falls back to eager when it fails)."""
    callbacks: tuple[PluginRef, ...] = ()
    progress_every_steps: PosInt = 10
    """Report training progress every this many steps (and after every validation)."""

    @model_validator(mode="after")
    def _check(self) -> JobSpec:
        if self.epochs == 0 and self.max_steps == 0:
            raise ValueError("set epochs or max_steps (training needs a limit)")
        paths = [slot.module_path for slot in self.slots]
        dupes = sorted({p for p in paths if paths.count(p) > 1})
        if dupes:
            raise ValueError(f"slot module_path repeated: {', '.join(dupes)}")
        return self


def parse_job_spec(data: Mapping[str, Any] | JobSpec) -> JobSpec:
    """A validated `JobSpec`; `InvalidArgumentError` naming the first bad field otherwise."""
    if isinstance(data, JobSpec):
        return data
    try:
        return JobSpec.model_validate(dict(data))
    except ValidationError as exc:
        raise invalid_argument(exc) from None


def invalid_argument(exc: ValidationError, prefix: str = "") -> InvalidArgumentError:
    """The `InvalidArgumentError` for a pydantic error: first error, its path as the field."""
    error = exc.errors()[0]
    path = ".".join(str(p) for p in error["loc"] if not str(p).startswith("function-after"))
    field = ".".join(p for p in (prefix, path) if p)
    message = error["msg"].removeprefix("Value error, ")
    count = exc.error_count()
    if count > 1:
        message += f" (and {count - 1} more problem{'s' if count > 2 else ''})"
    return InvalidArgumentError(message, field=field)
