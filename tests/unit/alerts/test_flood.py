"""FloodTracker: sliding counts, start at the threshold, fold, end after quiet."""

from __future__ import annotations

from services.alerts.flood import ActiveFlood, FloodOutcome, FloodTracker
from services.alerts.rules import FloodRule
from tests.unit.alerts.factories import T0, error

RULE = FloodRule(name="connection", pattern="ConnectionError", threshold=3, window_s=10)
RULES = {RULE.name: RULE}


def _observe(
    tracker: FloodTracker, at: float, agent: str = "a", count: int | None = None
) -> tuple[FloodOutcome, ActiveFlood | None]:
    event = error(agent, at=at, error_type="ConnectionError", count=count)
    return tracker.observe(RULE, event, at)


def test_flood_starts_when_the_window_reaches_the_threshold() -> None:
    tracker = FloodTracker()
    assert _observe(tracker, T0)[0] is FloodOutcome.COUNTED
    assert _observe(tracker, T0 + 1)[0] is FloodOutcome.COUNTED
    outcome, flood = _observe(tracker, T0 + 2)
    assert outcome is FloodOutcome.STARTED and flood is not None
    assert (flood.count, flood.first_seen, flood.last_seen) == (3, T0, T0 + 2)


def test_hits_older_than_the_window_do_not_count() -> None:
    tracker = FloodTracker()
    _observe(tracker, T0)
    _observe(tracker, T0 + 5)
    assert _observe(tracker, T0 + 10)[0] is FloodOutcome.COUNTED  # T0 left the window
    assert _observe(tracker, T0 + 11)[0] is FloodOutcome.STARTED


def test_a_folded_event_counts_all_its_occurrences() -> None:
    outcome, flood = _observe(FloodTracker(), T0, count=49)
    assert outcome is FloodOutcome.STARTED and flood is not None and flood.count == 49


def test_keys_count_apart() -> None:
    tracker = FloodTracker()
    for i in range(2):
        _observe(tracker, T0 + i, agent="a")
        _observe(tracker, T0 + i, agent="b")
    assert tracker.active == []


def test_errors_during_a_flood_are_folded_and_it_ends_after_quiet() -> None:
    tracker = FloodTracker()
    for i in range(3):
        _observe(tracker, T0 + i)
    outcome, flood = _observe(tracker, T0 + 5)
    assert outcome is FloodOutcome.FOLDED and flood is not None and flood.count == 4
    assert tracker.end_quiet(RULES, T0 + 14.9) == []
    ended = tracker.end_quiet(RULES, T0 + 15)
    assert [f.count for f in ended] == [4] and tracker.active == []
    # After the end a new flood needs the threshold again.
    assert _observe(tracker, T0 + 16)[0] is FloodOutcome.COUNTED


def test_a_flood_of_a_removed_rule_ends() -> None:
    tracker = FloodTracker()
    _observe(tracker, T0, count=3)
    assert len(tracker.end_quiet({}, T0)) == 1


def test_counters_are_bounded_and_idle_ones_dropped() -> None:
    tracker = FloodTracker(max_keys=2)
    for agent in "abc":
        _observe(tracker, T0, agent=agent)
    assert tracker.counters() == 2
    tracker.end_quiet(RULES, T0 + 10)
    assert tracker.counters() == 0


def test_state_round_trip_keeps_counts_and_floods() -> None:
    tracker = FloodTracker()
    _observe(tracker, T0, agent="a", count=3)
    _observe(tracker, T0, agent="b")
    copy = FloodTracker.from_state(tracker.to_state())
    assert [f.to_state() for f in copy.active] == [f.to_state() for f in tracker.active]
    assert _observe(copy, T0 + 1, agent="b")[0] is FloodOutcome.COUNTED
    assert _observe(copy, T0 + 2, agent="b")[0] is FloodOutcome.STARTED
