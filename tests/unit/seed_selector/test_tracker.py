"""Per-arm evidence: forgetting, the LinUCB algebra, and the JSON round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common.errors import IntegrityError
from services.seed_selector import Arm, DecayConfig, JobTracker, Strategy, StrategyParams, choose

A, B = Arm("s0", "bp"), Arm("s1", "bp")


def _true(tracker: JobTracker, arm: Arm, now: float = 0.0) -> tuple[float, float]:
    stats = tracker.arms[arm]
    scale = tracker.scale(now)
    return stats.weight * scale, stats.mean


def test_each_update_discounts_older_outcomes_by_gamma() -> None:
    tracker = JobTracker("t", decay=DecayConfig(gamma=0.9))
    for _ in range(10):
        tracker.update(A, 1.0, None, 0.0)
    weight_a, _ = _true(tracker, A)
    assert weight_a == pytest.approx(sum(0.9**k for k in range(10)))
    for _ in range(10):
        tracker.update(B, 0.0, None, 0.0)
    # A was not reported again, but every report of B discounted it.
    assert _true(tracker, A)[0] == pytest.approx(weight_a * 0.9**10)
    assert _true(tracker, B)[0] == pytest.approx(weight_a)


def test_decay_gives_recent_outcomes_more_say_in_the_mean() -> None:
    means = {}
    for gamma in (1.0, 0.9):
        tracker = JobTracker("t", decay=DecayConfig(gamma=gamma))
        for reward in [0.0] * 20 + [1.0] * 20:
            tracker.update(A, reward, None, 0.0)
        means[gamma] = tracker.arms[A].mean
    assert means[1.0] == pytest.approx(0.5)
    assert means[0.9] > 0.85


def test_half_life_halves_evidence_per_half_life_of_clock_time() -> None:
    tracker = JobTracker("t", decay=DecayConfig(gamma=1.0, half_life_s=60.0))
    tracker.update(A, 1.0, None, 1000.0)
    tracker.update(A, 1.0, None, 1000.0)
    assert _true(tracker, A, 1000.0)[0] == pytest.approx(2.0)
    assert _true(tracker, A, 1060.0)[0] == pytest.approx(1.0)
    assert _true(tracker, A, 1120.0)[0] == pytest.approx(0.5)


def test_rescaling_keeps_true_values_when_the_scale_gets_extreme() -> None:
    tracker = JobTracker("t", decay=DecayConfig(gamma=0.5))
    for i in range(400):  # 0.5**400 is far below the rescaling threshold
        tracker.update(A if i % 2 else B, 1.0, None, 0.0)
    assert tracker.renormalizations >= 1
    # Geometric sums: A got the odd updates (last one newest), B the even ones.
    assert _true(tracker, A)[0] == pytest.approx(1 / (1 - 0.25))
    assert _true(tracker, B)[0] == pytest.approx(0.5 / (1 - 0.25))


@pytest.mark.parametrize("gamma", [1.0, 0.97])
def test_linucb_inverse_matches_the_ridge_regression_it_stands_for(gamma: float) -> None:
    rng = np.random.default_rng(0)
    tracker = JobTracker("t", ("f1", "f2", "f3"), decay=DecayConfig(gamma=gamma), ridge=2.0)
    xs, rewards = [], []
    for _ in range(30):  # few enough that the regulariser stays above its floor
        x = [1.0, *rng.normal(size=3).tolist()]
        r = float(rng.normal())
        tracker.update(A, r, x, 0.0)
        xs.append(np.array(x))
        rewards.append(r)
    n = len(xs)
    weights = [gamma ** (n - 1 - k) for k in range(n)]
    # The prior enters with the arm's first outcome and decays with it.
    a = 2.0 * gamma ** (n - 1) * np.eye(4) + sum(
        w * np.outer(x, x) for w, x in zip(weights, xs, strict=True)
    )
    b = sum(w * r * x for w, r, x in zip(weights, rewards, xs, strict=True))

    stats = tracker.arms[A]
    scale = tracker.scale(0.0)
    stats.fold_linear(scale)
    np.testing.assert_allclose(stats.lin_ainv / scale, np.linalg.inv(a), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(stats.lin_theta, np.linalg.solve(a, b), rtol=1e-9, atol=1e-12)


def test_linucb_regulariser_is_restored_after_it_decays() -> None:
    tracker = JobTracker("t", decay=DecayConfig(gamma=0.5), ridge=1.0)
    tracker.update(A, 1.0, None, 0.0)
    for _ in range(20):
        tracker.update(B, 0.0, None, 0.0)
    stats = tracker.arms[A]
    scale = tracker.scale(0.0)
    stats.fold_linear(scale)
    # A's evidence is ~1e-6 of what it was; its uncertainty is capped near the prior's.
    width = float(stats.lin_ainv[0, 0] / scale)
    assert 0.5 <= width <= 1.0


def _populated() -> JobTracker:
    tracker = JobTracker("job-7", ("grad_norm", "plateau"), decay=DecayConfig(gamma=0.95))
    rng = np.random.default_rng(1)
    for i in range(40):
        arm = Arm(f"s{i % 3}", f"bp{i % 2}")
        tracker.update(
            arm, float(rng.random() < 0.4) if i % 5 else 0.25, [1.0, *rng.random(2)], 0.0
        )
    tracker.arms[Arm("s0", "bp0")].fold_linear(tracker.scale(0.0))  # one folded, others queued
    return tracker


def test_json_round_trip_keeps_every_arm_and_every_decision() -> None:
    tracker = _populated()
    text = tracker.to_json()
    again = JobTracker.from_json(text, decay=DecayConfig(gamma=0.95))
    assert again.to_json() == text
    assert (again.scope, again.features, again.step) == ("job-7", ("grad_norm", "plateau"), 40)

    arms = sorted(tracker.arms)
    for strategy in Strategy:
        picks = []
        for t in (tracker, again):
            stats, scale = t.refreshed(arms, 0.0)
            rng = np.random.Generator(np.random.PCG64(3))
            contexts = np.array([[1.0, 0.5, 0.2]] * len(arms))
            choice = choose(strategy, stats, rng, StrategyParams(), scale=scale, contexts=contexts)
            picks.append((choice.index, choice.scores))
        assert picks[0] == picks[1], strategy


def test_json_is_plain_json() -> None:
    doc = json.loads(_populated().to_json())
    assert {"scope", "features", "step", "arms"} <= doc.keys()
    assert {"pulls", "weight", "reward_sum", "reward_sumsq", "successes", "failures"} <= (
        doc["arms"][0].keys()
    )


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[1, 2]",
        '{"v": 1}',
        '{"v": 99, "arms": []}',
    ],
)
def test_malformed_document_is_an_integrity_error(text: str) -> None:
    with pytest.raises(IntegrityError):
        JobTracker.from_json(text)


def test_arm_document_of_another_dimension_is_an_integrity_error() -> None:
    doc = json.loads(_populated().to_json())
    doc["features"] = ["grad_norm"]
    with pytest.raises(IntegrityError, match="inputs"):
        JobTracker.from_dict(doc)


def test_unknown_feature_is_rejected_and_missing_features_count_zero() -> None:
    tracker = JobTracker("t", ("a", "b"))
    assert tracker.context_vector({"b": 2.0}) == (1.0, 0.0, 2.0)
    assert tracker.context_vector(None) == (1.0, 0.0, 0.0)
    with pytest.raises(KeyError, match="c"):
        tracker.context_vector({"a": 1.0, "c": 3.0})


def test_arm_documents_stay_writable_after_thousands_of_decayed_reports() -> None:
    # No LinUCB decision ever reads the models, so only writing the documents folds
    # them; the same context every time is the worst case for conditioning.
    tracker = JobTracker("job", ("a", "b"), decay=DecayConfig(gamma=0.99))
    arm = Arm("s0", "bp")
    x = tracker.context_vector({"a": 0.5, "b": 0.5})
    for i in range(6000):
        tracker.update(arm, float(i % 3 == 0), x, 0.0)
        if i % 9 == 8:
            doc = tracker.arms[arm].to_dict()
    ainv = np.array(doc["lin_ainv"])
    assert np.all(np.isfinite(ainv))
    assert np.all(np.linalg.eigvalsh(ainv) > 0)  # still a positive definite A^-1
