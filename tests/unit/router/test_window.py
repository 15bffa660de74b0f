"""Sliding-window statistics and EWMA."""

from __future__ import annotations

import pytest

from services.router import Ewma, SlidingWindow
from services.router.window import quantile


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_quantiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert quantile(values, 0.5) == 50.0
    assert quantile(values, 0.99) == 99.0
    assert quantile([], 0.5) == 0.0
    assert quantile([7.0], 0.99) == 7.0


def test_summary_counts_requests_errors_latency_and_cost() -> None:
    clock = Clock()
    window = SlidingWindow(60, clock)
    for i in range(100):
        window.record(latency_us=float(i + 1), cost=0.5, ok=True)
    window.record(latency_us=1e9, cost=0.0, ok=False)
    summary = window.summary()
    assert (summary.requests, summary.errors) == (101, 1)
    assert summary.latency_p50_us == 50.0 and summary.latency_p99_us == 99.0
    assert summary.cost == pytest.approx(50.0)


def test_old_records_leave_the_window() -> None:
    clock = Clock()
    window = SlidingWindow(10, clock)
    window.record(1.0, 1.0, ok=False)
    clock.now = 5
    window.record(2.0, 1.0, ok=True)
    clock.now = 12
    summary = window.summary()
    assert (summary.requests, summary.errors) == (1, 0)


def test_summary_since_covers_only_the_recent_part() -> None:
    clock = Clock()
    window = SlidingWindow(100, clock)
    window.record(1.0, 0.0, ok=False)
    clock.now = 50
    window.record(2.0, 0.0, ok=True)
    assert window.summary(since=40).requests == 1
    assert window.summary().requests == 2


def test_ewma_starts_at_the_first_sample_and_moves_towards_new_ones() -> None:
    ewma = Ewma(alpha=0.5)
    assert ewma.value is None
    ewma.add(10)
    ewma.add(20)
    assert ewma.value == 15
