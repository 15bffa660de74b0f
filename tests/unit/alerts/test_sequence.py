"""SequenceTracker: re-deliveries are skipped, late messages inside a gap are not."""

from __future__ import annotations

from services.alerts.sequence import SequenceTracker


def test_in_order_messages_are_new_once() -> None:
    tracker = SequenceTracker()
    assert [tracker.admit(s, 0.0) for s in (5, 6, 7)] == [True, True, True]
    assert [tracker.admit(s, 0.0) for s in (5, 6, 7)] == [False, False, False]
    assert tracker.last == 7 and tracker.gaps == []


def test_a_late_message_inside_a_gap_is_new_once() -> None:
    tracker = SequenceTracker()
    tracker.admit(1, 0.0)
    tracker.admit(5, 0.0)
    assert tracker.gaps == [(2, 4)]
    assert tracker.admit(3, 1.0) is True
    assert tracker.gaps == [(2, 2), (4, 4)]
    assert tracker.admit(3, 1.0) is False
    assert tracker.admit(2, 1.0) and tracker.admit(4, 1.0)
    assert tracker.gaps == [] and tracker.admit(0, 1.0) is False


def test_gaps_are_bounded_in_number_and_age() -> None:
    tracker = SequenceTracker(max_gaps=2, gap_ttl_s=10.0)
    for seq in (1, 3, 5, 7):
        tracker.admit(seq, 0.0)
    assert tracker.gaps == [(4, 4), (6, 6)]
    tracker.admit(9, 10.0)
    assert tracker.gaps == [(8, 8)]


def test_state_round_trip_and_reset() -> None:
    tracker = SequenceTracker()
    tracker.admit(1, 0.0)
    tracker.admit(4, 0.0)
    copy = SequenceTracker.from_state(tracker.to_state())
    assert copy.last == 4 and copy.gaps == [(2, 3)]
    assert copy.admit(2, 0.0) and not copy.admit(4, 0.0)
    copy.reset()
    assert copy.admit(1, 0.0) and copy.last == 1
