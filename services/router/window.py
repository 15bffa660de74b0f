"""Serving statistics over a sliding time window, and smoothed estimates. Pure.

`SlidingWindow` keeps one record per request (time, latency, cost, success) for
`window_s` seconds, at most `max_samples` of them (the oldest go first), and
sums them on demand: counts, error count, latency p50/p99 (nearest rank) and
the cost. `Ewma` is the running estimate the routing policy reads.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Ewma", "SlidingWindow", "WindowSummary", "quantile"]


def quantile(sorted_values: list[float], q: float) -> float:
    """The nearest-rank q-quantile of ascending values (0.0 when there are none)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass(frozen=True, slots=True)
class WindowSummary:
    requests: int = 0
    errors: int = 0
    latency_p50_us: float = 0.0
    latency_p99_us: float = 0.0
    cost: float = 0.0


class SlidingWindow:
    """Per-request records of the last `window_s` seconds (read the module docstring)."""

    def __init__(
        self, window_s: float, clock: Callable[[], float], max_samples: int = 100_000
    ) -> None:
        self.window_s = window_s
        self._clock = clock
        self._records: deque[tuple[float, float, float, bool]] = deque(maxlen=max_samples)

    def record(self, latency_us: float, cost: float, ok: bool) -> None:
        self._records.append((self._clock(), latency_us, cost, ok))

    def summary(self, since: float | None = None) -> WindowSummary:
        """Totals over the window, or over the part of it from `since` (clock time) on."""
        now = self._clock()
        self._prune(now)
        start = now - self.window_s if since is None else max(since, now - self.window_s)
        latencies: list[float] = []
        errors = 0
        cost = 0.0
        for at, latency, c, ok in reversed(self._records):
            if at < start:
                break
            if ok:
                latencies.append(latency)
            else:
                errors += 1
            cost += c
        latencies.sort()
        return WindowSummary(
            requests=len(latencies) + errors,
            errors=errors,
            latency_p50_us=quantile(latencies, 0.5),
            latency_p99_us=quantile(latencies, 0.99),
            cost=cost,
        )

    def _prune(self, now: float) -> None:
        horizon = now - self.window_s
        records = self._records
        while records and records[0][0] < horizon:
            records.popleft()


class Ewma:
    """An exponentially weighted moving average; None until the first sample."""

    __slots__ = ("alpha", "value")

    def __init__(self, alpha: float = 0.2) -> None:
        self.alpha = alpha
        self.value: float | None = None

    def add(self, sample: float) -> None:
        self.value = (
            sample if self.value is None else self.value + self.alpha * (sample - self.value)
        )
