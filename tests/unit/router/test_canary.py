"""The canary verdict."""

from __future__ import annotations

from services.router import CanaryPolicy, SideStats, Verdict, judge

POLICY = CanaryPolicy(
    min_requests=100,
    min_duration_s=30,
    max_error_rate_increase=0.02,
    max_latency_ratio=1.5,
    latency_slack_us=1000,
    fail_fast_errors=10,
)
GOOD = SideStats(requests=1000, errors=5, latency_p50_us=2000, latency_p99_us=5000)


def test_a_canary_like_production_is_promoted() -> None:
    canary = SideStats(requests=200, errors=1, latency_p50_us=2100, latency_p99_us=5200)
    assert judge(POLICY, canary, GOOD, observed_s=60).verdict is Verdict.PROMOTE


def test_too_little_evidence_waits() -> None:
    few = SideStats(requests=50, errors=0, latency_p50_us=1, latency_p99_us=1)
    assert judge(POLICY, few, GOOD, observed_s=60).verdict is Verdict.WAIT
    enough = SideStats(requests=200, errors=0, latency_p50_us=2000, latency_p99_us=5000)
    assert judge(POLICY, enough, GOOD, observed_s=10).verdict is Verdict.WAIT
    quiet_production = SideStats(requests=20, errors=0, latency_p50_us=2000, latency_p99_us=5000)
    decision = judge(POLICY, enough, quiet_production, observed_s=60)
    assert decision.verdict is Verdict.WAIT and "production" in decision.reason


def test_more_errors_than_allowed_rolls_back() -> None:
    canary = SideStats(requests=200, errors=8, latency_p50_us=2000, latency_p99_us=5000)
    decision = judge(POLICY, canary, GOOD, observed_s=60)
    assert decision.verdict is Verdict.ROLLBACK and "error rate" in decision.reason


def test_a_hard_failing_canary_rolls_back_before_the_quorum() -> None:
    canary = SideStats(requests=12, errors=10, latency_p50_us=2000, latency_p99_us=5000)
    assert judge(POLICY, canary, GOOD, observed_s=1).verdict is Verdict.ROLLBACK


def test_slower_canary_rolls_back_on_p50_or_p99() -> None:
    slow_median = SideStats(requests=200, errors=0, latency_p50_us=4500, latency_p99_us=5000)
    assert judge(POLICY, slow_median, GOOD, observed_s=60).verdict is Verdict.ROLLBACK
    slow_tail = SideStats(requests=200, errors=0, latency_p50_us=2000, latency_p99_us=9000)
    decision = judge(POLICY, slow_tail, GOOD, observed_s=60)
    assert decision.verdict is Verdict.ROLLBACK and "p99" in decision.reason


def test_latency_slack_absorbs_noise_on_fast_models() -> None:
    fast = SideStats(requests=1000, errors=0, latency_p50_us=50, latency_p99_us=100)
    noisy = SideStats(requests=200, errors=0, latency_p50_us=300, latency_p99_us=900)
    assert judge(POLICY, noisy, fast, observed_s=60).verdict is Verdict.PROMOTE
