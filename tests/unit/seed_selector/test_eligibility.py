"""Eligibility: each rule's reason, every reason at once, and malformed offers."""

from __future__ import annotations

import pytest

from common.errors import InvalidArgumentError
from services.seed_selector import (
    ArmOffer,
    Budget,
    Concurrency,
    IneligibleCode,
    SlotState,
    check_eligibility,
)

NOW = 1000.0
FREE = (Budget(), Concurrency())


@pytest.mark.parametrize(
    ("offer", "budget", "concurrency", "code"),
    [
        (ArmOffer("s", "bp", slot_state=SlotState.TRAINING), *FREE, "slot_not_dormant"),
        (ArmOffer("s", "bp", slot_state=SlotState.FOSSILIZED), *FREE, "slot_not_dormant"),
        (ArmOffer("s", "bp", slot_state=SlotState.EMBARGOED), *FREE, "slot_embargoed"),
        (ArmOffer("s", "bp", embargoed_until=NOW + 30), *FREE, "slot_embargoed"),
        (
            ArmOffer("s", "bp"),
            Budget(),
            Concurrency(active_seeds=2, max_active_seeds=2),
            "concurrency_cap_reached",
        ),
        (
            ArmOffer("s", "bp", added_params=5000),
            Budget(remaining_params=4999),
            Concurrency(),
            "over_param_budget",
        ),
    ],
)
def test_each_rule_gives_its_reason(
    offer: ArmOffer, budget: Budget, concurrency: Concurrency, code: str
) -> None:
    result = check_eligibility([offer], budget, concurrency, NOW)
    assert result.eligible == []
    assert [r.code.value for r in result.ineligible[offer.arm]] == [code]
    assert code in result.summary()


def test_an_arm_that_breaks_several_rules_gets_every_reason() -> None:
    offer = ArmOffer("s", "bp", added_params=10, slot_state=SlotState.BLENDING)
    result = check_eligibility(
        [offer], Budget(remaining_params=5), Concurrency(active_seeds=1, max_active_seeds=1), NOW
    )
    assert {r.code for r in result.ineligible[offer.arm]} == {
        IneligibleCode.SLOT_NOT_DORMANT,
        IneligibleCode.CONCURRENCY_CAP_REACHED,
        IneligibleCode.OVER_PARAM_BUDGET,
    }


def test_eligible_arms_keep_offer_order_and_the_rest_are_explained() -> None:
    offers = [
        ArmOffer("s0", "small", added_params=10),
        ArmOffer("s1", "large", added_params=900),
        ArmOffer("s2", "small", added_params=10, slot_state=SlotState.HOLDING),
        ArmOffer("s3", "small", added_params=100),
    ]
    result = check_eligibility(offers, Budget(remaining_params=100), Concurrency(1, 3), NOW)
    assert result.arms == [offers[0].arm, offers[3].arm]
    assert result.eligible == [offers[0], offers[3]]
    assert set(result.ineligible) == {offers[1].arm, offers[2].arm}
    assert result.summary() == "4 offered, 2 eligible: 1 x over_param_budget, 1 x slot_not_dormant"


def test_budget_exactly_met_and_embargo_that_has_ended_are_eligible() -> None:
    offers = [ArmOffer("s0", "bp", added_params=100), ArmOffer("s1", "bp", embargoed_until=NOW)]
    result = check_eligibility(offers, Budget(remaining_params=100), Concurrency(0, 1), NOW)
    assert result.arms == [offers[0].arm, offers[1].arm]


def test_nothing_offered_says_so() -> None:
    assert check_eligibility([], *FREE, NOW).summary() == "no arms were offered"


def test_an_arm_offered_twice_is_invalid() -> None:
    with pytest.raises(InvalidArgumentError) as err:
        check_eligibility([ArmOffer("s", "a"), ArmOffer("s", "b"), ArmOffer("s", "a")], *FREE, NOW)
    assert err.value.field == "arms[2]"


@pytest.mark.parametrize(
    ("budget", "concurrency", "field"),
    [
        (Budget(remaining_params=-1), Concurrency(), "budget.remaining_params"),
        (Budget(), Concurrency(active_seeds=-1), "concurrency.active_seeds"),
        (Budget(), Concurrency(0, -2), "concurrency.max_active_seeds"),
    ],
)
def test_negative_budget_or_seed_counts_are_invalid(
    budget: Budget, concurrency: Concurrency, field: str
) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        check_eligibility([ArmOffer("s", "bp")], budget, concurrency, NOW)
    assert err.value.field == field


def test_malformed_offers_are_invalid() -> None:
    with pytest.raises(InvalidArgumentError) as err:
        ArmOffer("s", "bp", added_params=-3)
    assert err.value.field == "added_params"
    with pytest.raises(InvalidArgumentError) as err:
        ArmOffer("s", "bp", slot_state="sleeping")  # type: ignore[arg-type]
    assert err.value.field == "slot_state"
    assert ArmOffer("s", "bp", slot_state="dormant").slot_state is SlotState.DORMANT  # type: ignore[arg-type]
