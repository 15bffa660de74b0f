"""The seed lifecycle table, its enforcement, the automatic moves and the blend schedules."""

from __future__ import annotations

import itertools

import pytest

from services.trainer.lifecycle import (
    TRANSITIONS,
    BlendSchedule,
    LifecycleError,
    LifecycleTimings,
    SeedState,
    automatic_transition,
    blend_alpha,
    check_transition,
)

S = SeedState
ALLOWED = {
    (S.DORMANT, S.GERMINATED),
    (S.GERMINATED, S.TRAINING),
    (S.TRAINING, S.BLENDING),
    (S.BLENDING, S.HOLDING),
    (S.HOLDING, S.FOSSILIZED),
    (S.GERMINATED, S.CULLED),
    (S.TRAINING, S.CULLED),
    (S.BLENDING, S.CULLED),
    (S.HOLDING, S.CULLED),
    (S.CULLED, S.EMBARGOED),
    (S.EMBARGOED, S.DORMANT),
}
EVERY_PAIR = list(itertools.product(S, S))


def test_the_table_is_exactly_the_architecture_lifecycle() -> None:
    table = {(a, b) for a, targets in TRANSITIONS.items() for b in targets}
    assert table == ALLOWED


@pytest.mark.parametrize(("source", "target"), sorted(ALLOWED))
def test_allowed_transition_passes(source: SeedState, target: SeedState) -> None:
    check_transition(source, target, "blocks.0.fc")


@pytest.mark.parametrize(
    ("source", "target"), [p for p in EVERY_PAIR if p not in ALLOWED], ids=lambda s: s.value
)
def test_forbidden_transition_raises_naming_the_slot_and_the_allowed_moves(
    source: SeedState, target: SeedState
) -> None:
    with pytest.raises(LifecycleError) as caught:
        check_transition(source, target, "blocks.0.fc")
    message = str(caught.value)
    assert "blocks.0.fc" in message
    assert f"{source.value} -> {target.value}" in message


def test_fossilized_is_terminal() -> None:
    assert TRANSITIONS[S.FOSSILIZED] == frozenset()
    with pytest.raises(LifecycleError, match="none \\(terminal\\)"):
        check_transition(S.FOSSILIZED, S.CULLED)


def test_automatic_moves_follow_the_timings() -> None:
    t = LifecycleTimings(seed_training_steps=5, blend_steps=3, holding_steps=2, embargo_steps=4)
    assert automatic_transition(S.GERMINATED, 0, t) is S.TRAINING
    assert automatic_transition(S.TRAINING, 4, t) is None
    assert automatic_transition(S.TRAINING, 5, t) is S.BLENDING
    assert automatic_transition(S.BLENDING, 2, t) is None
    assert automatic_transition(S.BLENDING, 3, t) is S.HOLDING
    assert automatic_transition(S.HOLDING, 100, t) is None  # decided by evaluation
    assert automatic_transition(S.CULLED, 0, t) is S.EMBARGOED
    assert automatic_transition(S.EMBARGOED, 3, t) is None
    assert automatic_transition(S.EMBARGOED, 4, t) is S.DORMANT
    assert automatic_transition(S.DORMANT, 100, t) is None
    assert automatic_transition(S.FOSSILIZED, 100, t) is None


@pytest.mark.parametrize("schedule", list(BlendSchedule))
def test_blend_schedules_run_monotonically_from_zero_to_one(schedule: BlendSchedule) -> None:
    steps = 50
    alphas = [blend_alpha(schedule, s, steps) for s in range(steps + 3)]
    assert alphas[0] == 0.0
    assert alphas[steps] == 1.0 and alphas[-1] == 1.0
    assert all(b >= a for a, b in itertools.pairwise(alphas))
    assert all(0.0 <= a <= 1.0 for a in alphas)


def test_blend_schedules_differ_in_shape() -> None:
    quarter = {s: blend_alpha(s, 25, 100) for s in BlendSchedule}
    assert quarter[BlendSchedule.LINEAR] == pytest.approx(0.25)
    assert quarter[BlendSchedule.COSINE] == pytest.approx((1 - 0.7071067811865476) / 2)
    assert quarter[BlendSchedule.SIGMOID] < quarter[BlendSchedule.COSINE] < 0.25
    for s in BlendSchedule:
        assert blend_alpha(s, 50, 100) == pytest.approx(0.5)


def test_zero_blend_steps_means_fully_blended() -> None:
    assert blend_alpha(BlendSchedule.COSINE, 0, 0) == 1.0
