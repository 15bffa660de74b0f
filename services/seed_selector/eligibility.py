"""Which offered arms the seed selector may choose from, and why the others may not.

An arm `(slot_id, blueprint)` is eligible only when every rule holds:

- its slot is `DORMANT` (`slot_not_dormant` otherwise);
- its slot is not embargoed: not in state `EMBARGOED` and not before its
  `embargoed_until` time (`slot_embargoed`);
- the job's active seeds are below its concurrency cap (`concurrency_cap_reached`);
- the blueprint's added parameters fit the remaining parameter budget
  (`over_param_budget`).

An ineligible arm gets every rule it breaks, not only the first, so the caller can
see at once what would have to change. Nothing here chooses a default: when no arm
is eligible the answer is empty and carries the reasons.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from common.errors import InvalidArgumentError
from services.seed_selector.tracker import Arm

__all__ = [
    "ArmOffer",
    "Budget",
    "Concurrency",
    "Eligibility",
    "Ineligibility",
    "IneligibleCode",
    "SlotState",
    "check_eligibility",
]


class SlotState(StrEnum):
    """The seed lifecycle state of a slot (see ARCHITECTURE.md, "The seed lifecycle")."""

    DORMANT = "dormant"
    GERMINATED = "germinated"
    TRAINING = "training"
    BLENDING = "blending"
    HOLDING = "holding"
    FOSSILIZED = "fossilized"
    CULLED = "culled"
    EMBARGOED = "embargoed"


class IneligibleCode(StrEnum):
    """Why an arm may not be chosen."""

    SLOT_NOT_DORMANT = "slot_not_dormant"
    SLOT_EMBARGOED = "slot_embargoed"
    CONCURRENCY_CAP_REACHED = "concurrency_cap_reached"
    OVER_PARAM_BUDGET = "over_param_budget"


@dataclass(frozen=True, slots=True)
class Ineligibility:
    """One broken rule: its code and a sentence with the numbers involved."""

    code: IneligibleCode
    detail: str


@dataclass(frozen=True, slots=True)
class ArmOffer:
    """An arm the caller offers, with what eligibility needs to know about it.

    `added_params` is how many parameters growing the blueprint in the slot adds;
    `embargoed_until` a clock time (seconds, same clock as the selector's) before
    which the slot stays embargoed, None for none.
    """

    slot_id: str
    blueprint: str
    added_params: int = 0
    slot_state: SlotState = SlotState.DORMANT
    embargoed_until: float | None = None
    arm: Arm = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.added_params < 0:
            raise InvalidArgumentError("must be >= 0", "added_params")
        if self.slot_state.__class__ is not SlotState:  # a plain string from a caller
            try:
                object.__setattr__(self, "slot_state", SlotState(self.slot_state))
            except ValueError as exc:
                raise InvalidArgumentError(str(exc), "slot_state") from exc
        object.__setattr__(self, "arm", Arm(self.slot_id, self.blueprint))


@dataclass(frozen=True, slots=True)
class Budget:
    """The job's parameter budget left for new seeds; None means unlimited."""

    remaining_params: int | None = None


@dataclass(frozen=True, slots=True)
class Concurrency:
    """The job's active seeds and its cap on them; a None cap means unlimited."""

    active_seeds: int = 0
    max_active_seeds: int | None = None


@dataclass(slots=True)
class Eligibility:
    """The offered arms split into those that may be chosen and those that may not.

    `arms[i]` is `eligible[i].arm`, in offer order.
    """

    eligible: list[ArmOffer]
    arms: list[Arm]
    ineligible: dict[Arm, tuple[Ineligibility, ...]]

    def summary(self) -> str:
        """One line on why arms were left out, e.g. `3 offered, none eligible: 2 x ...`."""
        offered = len(self.eligible) + len(self.ineligible)
        if offered == 0:
            return "no arms were offered"
        counts = Counter(r.code.value for reasons in self.ineligible.values() for r in reasons)
        head = (
            f"{offered} offered, none eligible"
            if not self.eligible
            else f"{offered} offered, {len(self.eligible)} eligible"
        )
        if not counts:
            return head
        return head + ": " + ", ".join(f"{n} x {code}" for code, n in sorted(counts.items()))


def check_eligibility(
    offers: Sequence[ArmOffer],
    budget: Budget,
    concurrency: Concurrency,
    now: float,
) -> Eligibility:
    """Split `offers` by the rules in the module docstring, at clock time `now`.

    Raises `InvalidArgumentError` (with the field path) for a repeated arm, or a
    negative budget or seed count. (`ArmOffer` rejects negative parameter counts.)
    """
    remaining = budget.remaining_params
    if remaining is not None and remaining < 0:
        raise InvalidArgumentError("must be >= 0", "budget.remaining_params")
    active, cap = concurrency.active_seeds, concurrency.max_active_seeds
    if active < 0:
        raise InvalidArgumentError("must be >= 0", "concurrency.active_seeds")
    if cap is not None and cap < 0:
        raise InvalidArgumentError("must be >= 0", "concurrency.max_active_seeds")
    capped = (
        Ineligibility(
            IneligibleCode.CONCURRENCY_CAP_REACHED,
            f"{active} active seeds, cap {cap}",
        )
        if cap is not None and active >= cap
        else None
    )

    keys = [offer.arm for offer in offers]
    if len(set(keys)) != len(keys):
        seen: set[Arm] = set()
        for i, arm in enumerate(keys):
            if arm in seen:
                raise InvalidArgumentError(f"arm {tuple(arm)} is offered twice", f"arms[{i}]")
            seen.add(arm)

    dormant = SlotState.DORMANT
    if capped is None:
        passing = [
            offer
            for offer in offers
            if offer.slot_state is dormant
            and (remaining is None or offer.added_params <= remaining)
            and (offer.embargoed_until is None or now >= offer.embargoed_until)
        ]
        if len(passing) == len(keys):
            return Eligibility(passing, keys, {})
    eligible: list[ArmOffer] = []
    arms: list[Arm] = []
    ineligible: dict[Arm, tuple[Ineligibility, ...]] = {}
    for offer in offers:
        state = offer.slot_state
        if (
            state is dormant
            and capped is None
            and (remaining is None or offer.added_params <= remaining)
            and (offer.embargoed_until is None or now >= offer.embargoed_until)
        ):
            eligible.append(offer)
            arms.append(offer.arm)
            continue
        reasons: list[Ineligibility] = []
        if state is not dormant and state is not SlotState.EMBARGOED:
            reasons.append(Ineligibility(IneligibleCode.SLOT_NOT_DORMANT, f"slot is {state.value}"))
        if state is SlotState.EMBARGOED:
            reasons.append(Ineligibility(IneligibleCode.SLOT_EMBARGOED, "slot is embargoed"))
        elif offer.embargoed_until is not None and now < offer.embargoed_until:
            reasons.append(
                Ineligibility(
                    IneligibleCode.SLOT_EMBARGOED,
                    f"slot is embargoed for {offer.embargoed_until - now:.3g} s more",
                )
            )
        if capped is not None:
            reasons.append(capped)
        if remaining is not None and offer.added_params > remaining:
            reasons.append(
                Ineligibility(
                    IneligibleCode.OVER_PARAM_BUDGET,
                    f"adds {offer.added_params} parameters, {remaining} left in the budget",
                )
            )
        ineligible[offer.arm] = tuple(reasons)
    return Eligibility(eligible, arms, ineligible)
