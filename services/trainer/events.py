"""What the trainer reports while it runs: plain, immutable data objects.

The loop hands each event to an `EventSink` (any callable taking one event),
synchronously, from the training thread; a sink that must reach an event loop
hands it over there (`loop.call_soon_threadsafe`). A sink that raises is logged
and training goes on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "CheckpointSaved",
    "EventSink",
    "GrowthStatus",
    "SafetyEvent",
    "SlotTransition",
    "TrainingEvent",
    "TrainingProgress",
]


@dataclass(frozen=True)
class TrainingProgress:
    """Losses and metrics at a step; `val_loss` and the `val_*` metrics on validation steps."""

    step: int
    epoch: int
    total_steps: int
    train_loss: float
    val_loss: float | None
    metrics: Mapping[str, float]
    learning_rate: float
    samples_per_s: float
    param_count: int


@dataclass(frozen=True)
class SlotTransition:
    """A slot moved from one seed state to another, and why."""

    step: int
    epoch: int
    slot_id: str
    from_state: str
    to_state: str
    alpha: float
    blueprint: str
    kernel_id: str
    reason: str


@dataclass(frozen=True)
class CheckpointSaved:
    step: int
    epoch: int
    path: str
    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class SafetyEvent:
    """A guard acted: a skipped step, a spike and its rollback, an OOM retry."""

    step: int
    epoch: int
    kind: Literal["nonfinite", "spike", "rollback", "oom", "compile_fallback", "checkpoint_failed"]
    detail: str
    count: int


@dataclass(frozen=True)
class GrowthStatus:
    """Whether growth can run (selector and kernel source reachable), and why not."""

    step: int
    epoch: int
    available: bool
    reason: str = ""
    details: Mapping[str, str] = field(default_factory=dict)


TrainingEvent = TrainingProgress | SlotTransition | CheckpointSaved | SafetyEvent | GrowthStatus
EventSink = Callable[[TrainingEvent], None]
