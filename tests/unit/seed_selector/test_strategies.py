"""Bandit strategies: convergence, reproducibility, ties, untried arms first, LinUCB context."""

from __future__ import annotations

import random

import numpy as np
import pytest

from services.seed_selector import (
    Arm,
    ArmOffer,
    DecayConfig,
    JobTracker,
    RewardModel,
    SelectorConfig,
    SelectorCore,
    Strategy,
    StrategyParams,
    choose,
    epsilon_at,
)

PROBS = (0.15, 0.3, 0.45, 0.6, 0.85)
OFFERS = [ArmOffer(f"s{i}", "bp") for i in range(len(PROBS))]
STATIONARY = DecayConfig(gamma=1.0)


def _run(core: SelectorCore, strategy: Strategy, pulls: int, seed: int) -> list[Arm]:
    rewards = random.Random(seed)
    chosen = []
    for _ in range(pulls):
        decision = core.decide("job", OFFERS, strategy=strategy, now=0.0)
        assert decision.arm is not None
        i = int(decision.arm.slot_id[1:])
        chosen.append(decision.arm)
        core.record(decision.decision_id, float(rewards.random() < PROBS[i]), now=0.0)
    return chosen


@pytest.mark.parametrize("strategy", list(Strategy))
def test_each_strategy_converges_to_the_best_arm(strategy: Strategy) -> None:
    core = SelectorCore(SelectorConfig(decay=STATIONARY, seed=5))
    chosen = _run(core, strategy, pulls=1500, seed=1)
    best = OFFERS[PROBS.index(max(PROBS))].arm
    late = chosen[-500:]
    assert late.count(best) / len(late) > 0.8, {a: late.count(a) for a in set(late)}


@pytest.mark.parametrize("strategy", list(Strategy))
def test_same_seed_and_history_give_the_same_decisions(strategy: Strategy) -> None:
    def decisions(seed: int) -> list[tuple[Arm, dict[Arm, float]]]:
        core = SelectorCore(SelectorConfig(seed=seed))
        rewards = random.Random(2)
        out = []
        for _ in range(60):
            d = core.decide("job", OFFERS, strategy=strategy, now=0.0)
            assert d.arm is not None
            out.append((d.arm, d.scores))
            core.record(d.decision_id, float(rewards.random() < 0.5), now=0.0)
        return out

    assert decisions(seed=7) == decisions(seed=7)
    if strategy in (Strategy.THOMPSON, Strategy.EPSILON_GREEDY):
        assert decisions(seed=7) != decisions(seed=8)


def _evidence(rewards_per_arm: list[list[float]]) -> tuple[JobTracker, list[Arm]]:
    tracker = JobTracker("t", decay=STATIONARY)
    arms = [Arm(f"s{i}", "bp") for i in range(len(rewards_per_arm))]
    for arm, rewards in zip(arms, rewards_per_arm, strict=True):
        for r in rewards:
            tracker.update(arm, r, None, 0.0)
    return tracker, arms


@pytest.mark.parametrize("strategy", [Strategy.UCB1, Strategy.EPSILON_GREEDY, Strategy.LINUCB])
def test_ties_are_broken_by_the_seeded_generator_not_list_order(strategy: Strategy) -> None:
    tracker, arms = _evidence([[1.0, 0.0]] * 4)
    stats, scale = tracker.refreshed(arms, 0.0)
    params = StrategyParams(epsilon0=0.0, epsilon_min=0.0)
    contexts = np.ones((4, 1))

    def pick(seed: int) -> int:
        rng = np.random.Generator(np.random.PCG64(seed))
        choice = choose(strategy, stats, rng, params, scale=scale, contexts=contexts)
        assert len(set(choice.scores)) == 1
        assert "tied among 4 arms" in choice.reason
        return choice.index

    picks = [pick(seed) for seed in range(40)]
    assert len(set(picks)) == 4, picks
    assert picks == [pick(seed) for seed in range(40)]


@pytest.mark.parametrize("strategy", list(Strategy))
def test_arms_never_reported_are_tried_first(strategy: Strategy) -> None:
    core = SelectorCore(SelectorConfig(seed=1))
    old = OFFERS[:3]
    for _ in range(9):
        d = core.decide("job", old, strategy=strategy, now=0.0)
        core.record(d.decision_id, 1.0, now=0.0)
    pulls = [s.pulls for s in core.stats("job", now=0.0).arms]
    assert len(pulls) == 3 and min(pulls) >= 1, pulls

    tried = []
    for _ in range(2):
        d = core.decide("job", OFFERS, strategy=strategy, now=0.0)
        assert d.arm is not None
        assert "no evidence yet" in d.reason
        assert d.scores[d.arm] == float("inf")
        tried.append(d.arm)
        core.record(d.decision_id, 0.0, now=0.0)
    assert set(tried) == {OFFERS[3].arm, OFFERS[4].arm}


def test_order_among_untried_arms_follows_the_seed() -> None:
    def first_pick(seed: int) -> Arm | None:
        return SelectorCore(SelectorConfig(seed=seed)).decide("job", OFFERS, now=0.0).arm

    firsts = [first_pick(seed) for seed in range(30)]
    assert len(set(firsts)) > 1
    assert firsts == [first_pick(seed) for seed in range(30)]


def test_epsilon_decays_per_decision_down_to_its_floor() -> None:
    params = StrategyParams(epsilon0=0.5, epsilon_decay=0.9, epsilon_min=0.05)
    assert epsilon_at(params, 0) == 0.5
    assert epsilon_at(params, 1) == pytest.approx(0.45)
    assert epsilon_at(params, 10) == pytest.approx(0.5 * 0.9**10)
    assert epsilon_at(params, 1000) == 0.05


def test_thompson_models_real_valued_rewards_as_gaussian_at_any_scale() -> None:
    # Rewards such as "improvement per added parameter" are tiny: the choice must not
    # depend on their scale.
    core = SelectorCore(SelectorConfig(decay=STATIONARY, seed=3))
    means = {OFFERS[0].arm: 2e-6, OFFERS[1].arm: 5e-6, OFFERS[2].arm: 3e-6}
    noise = random.Random(4)
    late = []
    for t in range(600):
        d = core.decide("job", OFFERS[:3], strategy=Strategy.THOMPSON, now=0.0)
        assert d.arm is not None
        if t >= 400:
            late.append(d.arm)
        core.record(d.decision_id, noise.gauss(means[d.arm], 1e-6), now=0.0)
    assert "gaussian" in d.reason
    assert late.count(OFFERS[1].arm) / len(late) > 0.8


def test_thompson_reward_model_can_be_forced() -> None:
    tracker, arms = _evidence([[0.3, 0.4], [0.6, 0.7]])
    stats, scale = tracker.refreshed(arms, 0.0)
    rng = np.random.Generator(np.random.PCG64(0))
    for model, word in ((RewardModel.BERNOULLI, "beta"), (RewardModel.GAUSSIAN, "gaussian")):
        params = StrategyParams(thompson_model=model)
        choice = choose(Strategy.THOMPSON, stats, rng, params, scale=scale)
        assert f"({word})" in choice.reason


def test_linucb_picks_the_arm_whose_reward_grows_with_the_context() -> None:
    # Two blueprints for one slot: one pays off as much as the slot's plateau feature,
    # the other pays 0.5 whatever the slot's state.
    core = SelectorCore(SelectorConfig(features=("plateau",), decay=STATIONARY, seed=2))
    offers = [ArmOffer("s0", "context_driven"), ArmOffer("s0", "steady")]
    features = random.Random(9)
    for _ in range(400):
        plateau = features.random()
        d = core.decide(
            "job", offers, strategy=Strategy.LINUCB, context={"s0": {"plateau": plateau}}, now=0.0
        )
        assert d.arm is not None
        reward = plateau if d.arm.blueprint == "context_driven" else 0.5
        core.record(d.decision_id, reward, now=0.0)

    def pick(plateau: float) -> str | None:
        d = core.decide(
            "job", offers, strategy=Strategy.LINUCB, context={"s0": {"plateau": plateau}}, now=0.0
        )
        return d.arm.blueprint if d.arm else None

    assert pick(0.95) == "context_driven"
    assert pick(0.05) == "steady"


def test_choose_rejects_an_empty_offer_and_linucb_without_contexts() -> None:
    rng = np.random.Generator(np.random.PCG64(0))
    with pytest.raises(ValueError, match="no arms"):
        choose(Strategy.UCB1, [], rng, StrategyParams())
    tracker, arms = _evidence([[1.0]])
    stats, scale = tracker.refreshed(arms, 0.0)
    with pytest.raises(ValueError, match="context"):
        choose(Strategy.LINUCB, stats, rng, StrategyParams(), scale=scale)
