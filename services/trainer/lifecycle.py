"""The seed lifecycle as a pure state machine, and the blend schedules (no torch, no I/O).

    DORMANT -> GERMINATED -> TRAINING -> BLENDING -> HOLDING -> FOSSILIZED
    GERMINATED | TRAINING | BLENDING | HOLDING -> CULLED -> EMBARGOED -> DORMANT

`TRANSITIONS` is the whole table; `check_transition` raises `LifecycleError`
for anything else. `automatic_transition` says which move the passage of steps
alone makes (TRAINING ends after `seed_training_steps`, BLENDING after
`blend_steps`, an embargo after `embargo_steps`); the move out of HOLDING is a
decision (fossilize or cull) that the caller makes from an evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Final

from common.errors import FailedPreconditionError, InvalidArgumentError

__all__ = [
    "ACTIVE_STATES",
    "TRANSITIONS",
    "BlendSchedule",
    "LifecycleError",
    "LifecycleTimings",
    "SeedState",
    "automatic_transition",
    "blend_alpha",
    "check_transition",
]


class SeedState(StrEnum):
    """The lifecycle state of a seed slot (values match the seed selector's `SlotState`)."""

    DORMANT = "dormant"
    GERMINATED = "germinated"
    TRAINING = "training"
    BLENDING = "blending"
    HOLDING = "holding"
    FOSSILIZED = "fossilized"
    CULLED = "culled"
    EMBARGOED = "embargoed"


TRANSITIONS: Final[Mapping[SeedState, frozenset[SeedState]]] = MappingProxyType(
    {
        SeedState.DORMANT: frozenset({SeedState.GERMINATED}),
        SeedState.GERMINATED: frozenset({SeedState.TRAINING, SeedState.CULLED}),
        SeedState.TRAINING: frozenset({SeedState.BLENDING, SeedState.CULLED}),
        SeedState.BLENDING: frozenset({SeedState.HOLDING, SeedState.CULLED}),
        SeedState.HOLDING: frozenset({SeedState.FOSSILIZED, SeedState.CULLED}),
        SeedState.FOSSILIZED: frozenset(),
        SeedState.CULLED: frozenset({SeedState.EMBARGOED}),
        SeedState.EMBARGOED: frozenset({SeedState.DORMANT}),
    }
)
"""Every allowed transition: state -> the states it may move to."""

ACTIVE_STATES: Final = frozenset(
    {SeedState.GERMINATED, SeedState.TRAINING, SeedState.BLENDING, SeedState.HOLDING}
)
"""States in which a slot holds a seed that is still on trial (counted against concurrency)."""


class LifecycleError(FailedPreconditionError):
    """A transition that the lifecycle does not allow."""

    def __init__(self, slot_id: str, source: SeedState, target: SeedState) -> None:
        allowed = ", ".join(sorted(s.value for s in TRANSITIONS[source])) or "none (terminal)"
        super().__init__(
            f"slot {slot_id!r}: seed transition {source.value} -> {target.value} is not allowed; "
            f"from {source.value} the lifecycle allows: {allowed}"
        )
        self.slot_id = slot_id
        self.source = source
        self.target = target


def check_transition(source: SeedState, target: SeedState, slot_id: str = "") -> None:
    """Raise `LifecycleError` unless `source -> target` is in `TRANSITIONS`."""
    if target not in TRANSITIONS[source]:
        raise LifecycleError(slot_id, source, target)


class BlendSchedule(StrEnum):
    """How alpha rises from 0 to 1 over the blend steps."""

    LINEAR = "linear"
    COSINE = "cosine"
    SIGMOID = "sigmoid"


# Steepness of the sigmoid schedule; the raw logistic curve is rescaled to hit 0 and 1 exactly.
_SIGMOID_STEEPNESS: Final = 10.0


def blend_alpha(schedule: BlendSchedule, step: int, steps: int) -> float:
    """Alpha after `step` of `steps` blend steps: 0 at step 0, 1 from step `steps` on.

    Every schedule is monotone non-decreasing; `linear` is `t`, `cosine` is
    `(1 - cos(pi t)) / 2` and `sigmoid` a logistic curve centred on `t = 0.5`,
    rescaled to run from exactly 0 to exactly 1 (`t = step / steps`).
    """
    if steps <= 0 or step >= steps:
        return 1.0
    if step <= 0:
        return 0.0
    t = step / steps
    if schedule is BlendSchedule.LINEAR:
        return t
    if schedule is BlendSchedule.COSINE:
        return (1.0 - math.cos(math.pi * t)) / 2.0
    low = 1.0 / (1.0 + math.exp(_SIGMOID_STEEPNESS / 2.0))
    high = 1.0 - low
    raw = 1.0 / (1.0 + math.exp(-_SIGMOID_STEEPNESS * (t - 0.5)))
    return min(1.0, max(0.0, (raw - low) / (high - low)))


@dataclass(frozen=True)
class LifecycleTimings:
    """How many steps each timed state lasts (from the job's growth spec)."""

    seed_training_steps: int = 100
    blend_steps: int = 100
    blend_schedule: BlendSchedule = BlendSchedule.LINEAR
    holding_steps: int = 50
    embargo_steps: int = 200

    def __post_init__(self) -> None:
        for name in ("seed_training_steps", "blend_steps", "holding_steps", "embargo_steps"):
            if getattr(self, name) < 0:
                raise InvalidArgumentError("must be >= 0", field=f"growth.{name}")


def automatic_transition(
    state: SeedState, steps_in_state: int, timings: LifecycleTimings
) -> SeedState | None:
    """The move that `steps_in_state` steps in `state` make due, or None.

    GERMINATED moves to TRAINING at once; TRAINING to BLENDING after
    `seed_training_steps`; BLENDING to HOLDING after `blend_steps`; CULLED to
    EMBARGOED at once; EMBARGOED to DORMANT after `embargo_steps`. HOLDING ends
    by a decision (evaluation), DORMANT by germination and FOSSILIZED never.
    """
    if state is SeedState.GERMINATED:
        return SeedState.TRAINING
    if state is SeedState.TRAINING and steps_in_state >= timings.seed_training_steps:
        return SeedState.BLENDING
    if state is SeedState.BLENDING and steps_in_state >= timings.blend_steps:
        return SeedState.HOLDING
    if state is SeedState.CULLED:
        return SeedState.EMBARGOED
    if state is SeedState.EMBARGOED and steps_in_state >= timings.embargo_steps:
        return SeedState.DORMANT
    return None
