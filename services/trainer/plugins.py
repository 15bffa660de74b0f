"""Plugin registries: optimizers, LR schedules, losses and callbacks.

Each registry knows its built-ins and resolves any other name written as
`package.module:name` by importing it. What a plugin is:

- optimizer: `factory(param_groups, lr=, weight_decay=, **extra) -> Optimizer`
  (built-in: `sgd`, `adam`, `adamw`, the torch classes);
- LR schedule: `factory(total_steps=, warmup_steps=, base_lr=, **params)`
  returning `multiplier(step) -> float`, a pure function of the step (so param
  groups added later, for seeds, follow the same schedule, and resuming needs
  only the step). Built-in: `constant`, `cosine` (`min_lr` [0]), `step`
  (`step_size` [1000], `gamma` [0.5]), `linear` (`min_lr` [0]); a linear
  warmup over `warmup_steps` multiplies any of them;
- loss: `factory(**params) -> loss(output, target) -> scalar tensor` (built-in:
  `cross_entropy`, `mse`);
- callback: `factory(**params) -> Callback` (built-in: `early_stopping`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch
from torch import nn

from common.errors import InvalidArgumentError
from services.trainer.models import load_factory

__all__ = [
    "CALLBACKS",
    "LOSSES",
    "OPTIMIZERS",
    "SCHEDULES",
    "Callback",
    "CallbackContext",
    "EarlyStopping",
    "LRSchedule",
    "LossFn",
    "Registry",
]

T = TypeVar("T")

LRSchedule = Callable[[int], float]
"""`multiplier(step)`: the factor applied to each param group's base learning rate."""

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Registry(Generic[T]):
    """Named plugins of one kind; `resolve` also imports `package.module:name`."""

    def __init__(self, kind: str, field: str, builtins: Mapping[str, T]) -> None:
        self.kind = kind
        self._field = field
        self._entries: dict[str, T] = dict(builtins)

    def register(self, name: str, plugin: T) -> None:
        """Add a plugin under `name` (no ':' in it); a taken name is an error."""
        if ":" in name or not name:
            raise InvalidArgumentError(f"plugin name {name!r} must be non-empty, without ':'")
        if name in self._entries:
            raise InvalidArgumentError(f"{self.kind} {name!r} is registered already")
        self._entries[name] = plugin

    def names(self) -> list[str]:
        return sorted(self._entries)

    def resolve(self, name: str) -> T:
        """The plugin called `name`, or the object `package.module:name` imports."""
        found = self._entries.get(name)
        if found is not None:
            return found
        if ":" not in name:
            raise InvalidArgumentError(
                f"unknown {self.kind} {name!r}; built-in: {', '.join(self.names())} "
                "(or 'package.module:name')",
                field=self._field,
            )
        plugin: T = load_factory(name, field=self._field)  # type: ignore[assignment]
        return plugin


def _warmup(schedule: LRSchedule, warmup_steps: int) -> LRSchedule:
    if warmup_steps <= 0:
        return schedule
    return lambda step: schedule(step) * min(1.0, (step + 1) / warmup_steps)


def _constant(*, total_steps: int, warmup_steps: int, base_lr: float) -> LRSchedule:
    return _warmup(lambda _step: 1.0, warmup_steps)


def _cosine(
    *, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float = 0.0
) -> LRSchedule:
    floor = min(1.0, max(0.0, min_lr / base_lr))
    span = max(1, total_steps - warmup_steps)

    def multiplier(step: int) -> float:
        progress = min(1.0, max(0, step - warmup_steps) / span)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return _warmup(multiplier, warmup_steps)


def _linear(
    *, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float = 0.0
) -> LRSchedule:
    floor = min(1.0, max(0.0, min_lr / base_lr))
    span = max(1, total_steps - warmup_steps)

    def multiplier(step: int) -> float:
        progress = min(1.0, max(0, step - warmup_steps) / span)
        return 1.0 - (1.0 - floor) * progress

    return _warmup(multiplier, warmup_steps)


def _step(
    *,
    total_steps: int,
    warmup_steps: int,
    base_lr: float,
    step_size: int = 1000,
    gamma: float = 0.5,
) -> LRSchedule:
    if step_size <= 0:
        raise InvalidArgumentError("must be > 0", field="scheduler.params.step_size")
    return _warmup(lambda step: float(gamma ** (step // step_size)), warmup_steps)


def _cross_entropy(**params: Any) -> LossFn:
    return nn.CrossEntropyLoss(**params)


def _mse(**params: Any) -> LossFn:
    return nn.MSELoss(**params)


@dataclass
class CallbackContext:
    """What a callback sees and may change; the loop updates it as training goes."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: int = 0
    epoch: int = 0
    loss: torch.Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    stop_reason: str | None = None

    def request_stop(self, reason: str) -> None:
        """Finish training after this step (successfully), saying why."""
        self.stop_reason = reason


class Callback:
    """Base of callbacks: override the hooks you need (each gets the context).

    A stateful callback returns its state from `state_dict` (JSON data) so a
    resumed run continues it.
    """

    def on_train_start(self, ctx: CallbackContext) -> None:
        """Before the first step (also after a resume)."""

    def on_step_start(self, ctx: CallbackContext) -> None:
        """Before the forward pass of a step."""

    def on_after_backward(self, ctx: CallbackContext) -> None:
        """After the gradients are computed, before they are checked and applied."""

    def on_step_end(self, ctx: CallbackContext) -> None:
        """After the optimizer step (or after a skipped step)."""

    def on_eval(self, ctx: CallbackContext, metrics: Mapping[str, float]) -> None:
        """After a validation round; `metrics` holds `val_loss` and the others."""

    def on_train_end(self, ctx: CallbackContext) -> None:
        """After the last step."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` returned."""


class EarlyStopping(Callback):
    """Stop when `metric` has not improved by `min_delta` for `patience` validation rounds."""

    def __init__(self, patience: int = 5, min_delta: float = 0.0, metric: str = "val_loss") -> None:
        self.patience = patience
        self.min_delta = min_delta
        self.metric = metric
        self.best = math.inf
        self.rounds = 0

    def on_eval(self, ctx: CallbackContext, metrics: Mapping[str, float]) -> None:
        value = metrics.get(self.metric)
        if value is None:
            return
        if value < self.best - self.min_delta:
            self.best, self.rounds = value, 0
            return
        self.rounds += 1
        if self.rounds >= self.patience:
            ctx.request_stop(f"early stopping: {self.metric} flat for {self.rounds} rounds")

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best if math.isfinite(self.best) else None, "rounds": self.rounds}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        best = state.get("best")
        self.best = math.inf if best is None else float(best)
        self.rounds = int(state.get("rounds", 0))


OPTIMIZERS: Registry[Callable[..., torch.optim.Optimizer]] = Registry(
    "optimizer",
    "optimizer.name",
    {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW},
)
SCHEDULES: Registry[Callable[..., LRSchedule]] = Registry(
    "scheduler",
    "scheduler.name",
    {"constant": _constant, "cosine": _cosine, "linear": _linear, "step": _step},
)
LOSSES: Registry[Callable[..., LossFn]] = Registry(
    "loss", "loss.name", {"cross_entropy": _cross_entropy, "mse": _mse}
)
CALLBACKS: Registry[Callable[..., Callback]] = Registry(
    "callback", "callbacks", {"early_stopping": EarlyStopping}
)
