"""Passive outlier ejection with a fake clock: thresholds, growth, cap, jitter, share, panic."""

from __future__ import annotations

import random

import pytest

from services.router import EjectionPolicy, OutlierDetector


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def detector(members: int = 4, **policy: float) -> tuple[OutlierDetector, FakeClock]:
    clock = FakeClock()
    settings = {"jitter": 0.0, **policy}
    found = OutlierDetector(EjectionPolicy(**settings), clock, random.Random(0))  # type: ignore[arg-type]
    for i in range(members):
        found.add(f"r{i}")
    return found, clock


def fail(d: OutlierDetector, member: str, times: int) -> list[bool]:
    return [d.record_failure(member) for _ in range(times)]


def test_consecutive_failures_eject_and_a_success_resets_the_count() -> None:
    d, _ = detector(consecutive_failures=3)
    assert fail(d, "r0", 2) == [False, False]
    d.record_success("r0")
    assert fail(d, "r0", 2) == [False, False]
    assert d.record_failure("r0") is True
    assert d.is_ejected("r0")
    assert "r0" not in d.routable()


def test_ejection_ends_after_its_time_and_the_member_returns() -> None:
    d, clock = detector(consecutive_failures=1, base_ejection_s=5)
    d.record_failure("r0")
    clock.now += 4.9
    assert d.is_ejected("r0")
    clock.now += 0.2
    assert not d.is_ejected("r0")
    assert "r0" in d.routable()


def test_repeated_ejections_last_longer_up_to_the_cap() -> None:
    d, clock = detector(consecutive_failures=1, base_ejection_s=5, multiplier=2, max_ejection_s=30)
    lengths = []
    for _ in range(5):
        d.record_failure("r0")
        until = d.state("r0").ejected_until
        assert until is not None
        lengths.append(until - clock.now)
        clock.now = until
    assert lengths == pytest.approx([5, 10, 20, 30, 30])


def test_jitter_spreads_ejections_within_bounds_and_never_past_the_cap() -> None:
    clock = FakeClock()
    policy = EjectionPolicy(
        consecutive_failures=1, base_ejection_s=10, max_ejection_s=10.5, jitter=0.2
    )
    d = OutlierDetector(policy, clock, random.Random(5))
    lengths = set()
    for i in range(50):
        d.add(f"m{i}")
        d.add(f"spare{i}")
    for i in range(50):
        d.record_failure(f"m{i}")
        until = d.state(f"m{i}").ejected_until
        assert until is not None
        lengths.add(round(until - clock.now, 6))
    assert len(lengths) > 10
    assert min(lengths) >= 8.0 and max(lengths) <= 10.5


def test_a_returning_member_is_on_probation_one_failure_ejects_it_again() -> None:
    d, clock = detector(consecutive_failures=5, base_ejection_s=5)
    fail(d, "r0", 5)
    clock.now += 6
    assert not d.is_ejected("r0") and d.state("r0").on_probation
    assert d.record_failure("r0") is True
    assert d.state("r0").ejections == 2


def test_a_success_after_return_ends_probation() -> None:
    d, clock = detector(consecutive_failures=3, base_ejection_s=5)
    fail(d, "r0", 3)
    clock.now += 6
    d.record_success("r0")
    assert not d.state("r0").on_probation
    assert fail(d, "r0", 2) == [False, False]


def test_time_back_in_service_forgives_past_ejections() -> None:
    d, clock = detector(consecutive_failures=1, base_ejection_s=5, max_ejection_s=60)
    d.record_failure("r0")
    clock.now += 5
    d.record_success("r0")
    clock.now += 130  # two full max_ejection_s back in service
    d.record_failure("r0")
    assert d.state("r0").ejections == 1


def test_at_most_the_set_share_is_ejected() -> None:
    d, _ = detector(members=4, consecutive_failures=1, max_ejected_share=0.5)
    assert [d.record_failure(f"r{i}") for i in range(4)] == [True, True, False, False]
    assert d.ejected_count() == 2


def test_one_member_may_always_be_ejected() -> None:
    d, _ = detector(members=3, consecutive_failures=1, max_ejected_share=0.1)
    assert d.max_ejected() == 1
    assert d.record_failure("r0") is True
    assert d.record_failure("r1") is False


def test_a_member_over_the_limit_is_ejected_once_room_frees_up() -> None:
    d, clock = detector(members=2, consecutive_failures=2, max_ejected_share=0.5, base_ejection_s=5)
    fail(d, "r0", 2)
    assert fail(d, "r1", 2) == [False, False]
    clock.now += 6
    d.record_success("r0")
    assert d.record_failure("r1") is True


def test_panic_mode_routes_to_every_member_when_too_few_are_healthy() -> None:
    d, _ = detector(members=2, consecutive_failures=1, max_ejected_share=1.0, panic_threshold=0.6)
    d.record_failure("r0")
    assert d.in_panic()
    assert d.routable() == ["r0", "r1"]


def test_a_single_member_ejected_is_still_routed_to_in_panic() -> None:
    d, _ = detector(members=1, consecutive_failures=1)
    assert d.record_failure("r0") is True
    assert d.routable() == ["r0"]


def test_routable_keeps_the_order_asked_and_ignores_unknown_members() -> None:
    d, _ = detector(members=3)
    assert d.routable(["r2", "nope", "r0"]) == ["r2", "r0"]
    d.remove("r2")
    assert d.routable() == ["r0", "r1"]


def test_failures_during_an_ejection_do_not_extend_it() -> None:
    d, _ = detector(consecutive_failures=1, base_ejection_s=5)
    d.record_failure("r0")
    until = d.state("r0").ejected_until
    assert d.record_failure("r0") is False
    assert d.state("r0").ejected_until == until
