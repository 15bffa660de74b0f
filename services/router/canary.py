"""Canary analysis: promote the canary, roll it back, or keep watching. Pure.

The router compares the canary version's traffic with the production version's
over the same recent window (at most `window_s`, and only since the canary
appeared). With `e = errors / requests` and latency quantiles `p50`, `p99` of
each side, and the policy's limits:

1. **Fail fast.** The canary has `fail_fast_errors` errors or more and
   `e_canary > e_production + max_error_rate_increase`: roll back now, whatever
   the sample size (a canary that fails hard should not wait for a quorum).
2. **Enough evidence?** Both sides need `min_requests` requests, and the canary
   `min_duration_s` of observation; otherwise keep watching.
3. **Errors.** `e_canary > e_production + max_error_rate_increase`: roll back.
4. **Latency.** For q in (p50, p99):
   `q_canary > q_production * max_latency_ratio + latency_slack_us`: roll back.
   The slack keeps microsecond-scale noise on fast models from deciding.
5. Otherwise promote.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

__all__ = ["CanaryDecision", "CanaryPolicy", "SideStats", "Verdict", "judge"]


@dataclass(frozen=True, slots=True)
class CanaryPolicy:
    """The limits of the comparison (see the module docstring)."""

    min_requests: int = 100
    min_duration_s: float = 30.0
    max_error_rate_increase: float = 0.02
    max_latency_ratio: float = 1.5
    latency_slack_us: float = 1000.0
    fail_fast_errors: int = 10


@dataclass(frozen=True, slots=True)
class SideStats:
    """One side's traffic over the window."""

    requests: int
    errors: int
    latency_p50_us: float
    latency_p99_us: float

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


class Verdict(StrEnum):
    WAIT = "wait"
    PROMOTE = "promote"
    ROLLBACK = "rollback"


@dataclass(frozen=True, slots=True)
class CanaryDecision:
    verdict: Verdict
    reason: str


def judge(
    policy: CanaryPolicy, canary: SideStats, production: SideStats, observed_s: float
) -> CanaryDecision:
    """The verdict on a canary observed for `observed_s` seconds."""
    limit = production.error_rate + policy.max_error_rate_increase
    errors_too_high = canary.error_rate > limit
    error_text = (
        f"canary error rate {canary.error_rate:.2%} ({canary.errors}/{canary.requests}) over "
        f"production's {production.error_rate:.2%} + {policy.max_error_rate_increase:.2%}"
    )
    if canary.errors >= policy.fail_fast_errors and errors_too_high:
        return CanaryDecision(Verdict.ROLLBACK, error_text)
    if canary.requests < policy.min_requests:
        return CanaryDecision(
            Verdict.WAIT, f"canary has {canary.requests}/{policy.min_requests} requests"
        )
    if production.requests < policy.min_requests:
        return CanaryDecision(
            Verdict.WAIT, f"production has {production.requests}/{policy.min_requests} requests"
        )
    if observed_s < policy.min_duration_s:
        return CanaryDecision(
            Verdict.WAIT, f"canary observed {observed_s:.0f}/{policy.min_duration_s:.0f} s"
        )
    if errors_too_high:
        return CanaryDecision(Verdict.ROLLBACK, error_text)
    for name, ours, theirs in (
        ("p50", canary.latency_p50_us, production.latency_p50_us),
        ("p99", canary.latency_p99_us, production.latency_p99_us),
    ):
        bound = theirs * policy.max_latency_ratio + policy.latency_slack_us
        if ours > bound:
            return CanaryDecision(
                Verdict.ROLLBACK,
                f"canary latency {name} {ours:.0f} us over production's {theirs:.0f} us x "
                f"{policy.max_latency_ratio:g} + {policy.latency_slack_us:.0f} us",
            )
    return CanaryDecision(
        Verdict.PROMOTE,
        f"canary error rate {canary.error_rate:.2%} vs {production.error_rate:.2%}, p99 "
        f"{canary.latency_p99_us:.0f} us vs {production.latency_p99_us:.0f} us over "
        f"{canary.requests} requests",
    )
