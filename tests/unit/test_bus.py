"""The error bus without a NATS server: fingerprints, subjects, the collapse guard, the
caller's side of `report_error` (bounds, drops, threads, hostile arguments).

Time in the collapse guard is a fake clock moved by hand. Threads meet at a barrier
so their reports really overlap.
"""

from __future__ import annotations

import json
import threading
import traceback
from collections.abc import Iterator
from typing import Any

import pytest

from common.bus import (
    SEVERITIES,
    CollapseGuard,
    ErrorBus,
    Severity,
    _dumps,
    _subject_matches,
    _top_frame_from_text,
    _top_frame_of,
    error_subject,
    fingerprint,
)
from tests.ports import free_port

DEADLINE_S = 5.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _raise_in_loader() -> None:
    raise KeyError("shard 17 missing")


def _raise_in_other_place() -> None:
    raise KeyError("shard 17 missing")


def _call_loader() -> None:
    _raise_in_loader()


def caught(fn: object) -> BaseException:
    try:
        fn()  # type: ignore[operator]
    except BaseException as exc:
        return exc
    raise AssertionError("expected an exception")


def stack(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


def records(bus: ErrorBus) -> list[tuple[Any, ...]]:
    """The records `report_error` buffered, whole (the buffer holds them field by field)."""
    fields = list(bus._inbox)
    return [tuple(fields[i : i + 9]) for i in range(0, len(fields), 9)]


def unreachable_url() -> str:
    # A port nothing listens on: connection refused at once, like NATS being down.
    return f"nats://127.0.0.1:{free_port()}"


@pytest.fixture
def bus() -> Iterator[ErrorBus]:
    # Never started: what report_error buffers stays visible in the counters.
    yield ErrorBus(nats_url=unreachable_url(), machine="m1", agent="trainer", buffer_size=100)


# --------------------------------------------------------------------------- fingerprints


def test_fingerprint_is_stable_across_runs() -> None:
    # Stored events and alert grouping depend on it: a change here regroups history.
    assert fingerprint("trainer", "ValueError", "loss is NaN", None) == (
        "01a44c8ec2edc91dfee0d09c87e8cc72"
    )


def test_fingerprint_ignores_numbers_hex_ids_and_uuids() -> None:
    a = fingerprint(
        "trainer",
        "TimeoutError",
        "job 0b7c5a0e-9a43-4d4b-9f55-2b8e0f2f6a11 step 120 took 31.5 s at 0x7f3a2c "
        "(blob 9f86d081884c7d65)",
        None,
    )
    b = fingerprint(
        "trainer",
        "TimeoutError",
        "job 6d7f4e22-1c2b-4a11-8e3d-aa0b3c9d8e77 step 9 took 2 s at 0xdeadbeef "
        "(blob 12ab34cd56ef7890)",
        None,
    )
    assert a == b


def test_fingerprint_keeps_words_and_names_with_digits_apart() -> None:
    base = fingerprint("trainer", "RuntimeError", "conv2d failed", None)
    assert fingerprint("trainer", "RuntimeError", "conv3d failed", None) != base
    assert fingerprint("trainer", "RuntimeError", "conv2d crashed", None) != base
    assert fingerprint("trainer", "OSError", "conv2d failed", None) != base
    assert fingerprint("router", "RuntimeError", "conv2d failed", None) != base


def test_fingerprint_depends_on_the_raising_frame_not_the_callers() -> None:
    here = caught(_raise_in_loader)
    elsewhere = caught(_raise_in_other_place)
    # The same raise site reached through a different caller chain.
    deeper = caught(_call_loader)

    def fp(exc: BaseException) -> str:
        return fingerprint("trainer", "KeyError", "shard 17 missing", stack(exc))

    assert fp(here) == fp(deeper)
    assert fp(here) != fp(elsewhere)
    assert fp(here) != fingerprint("trainer", "KeyError", "shard 17 missing", None)


def test_top_frame_from_an_exception_matches_its_formatted_stack() -> None:
    def chained() -> None:
        try:
            _raise_in_loader()
        except KeyError as err:
            raise RuntimeError("loader failed") from err

    def during_handling() -> None:
        try:
            _raise_in_loader()
        except KeyError:
            raise ValueError("while handling") from None

    never_raised = ValueError("built, not raised")
    for exc in (caught(_raise_in_loader), caught(chained), caught(during_handling), never_raised):
        assert _top_frame_of(exc) == _top_frame_from_text(stack(exc)), stack(exc)
    assert "_raise_in_loader" in _top_frame_of(caught(_raise_in_loader))
    assert "chained" in _top_frame_of(caught(chained))
    assert _top_frame_of(never_raised) == ""


# --------------------------------------------------------------------------- subjects


def test_error_subject_takes_enum_and_string_severities() -> None:
    assert error_subject("mainpc", Severity.CRITICAL, "trainer") == "errors.mainpc.critical.trainer"
    assert error_subject("mainpc", "debug", "seed-selector") == "errors.mainpc.debug.seed-selector"
    assert [error_subject("m", s, "a").split(".")[2] for s in Severity] == list(SEVERITIES)
    assert SEVERITIES == ("debug", "info", "warning", "error", "critical")


@pytest.mark.parametrize("severity", ["fatal", "ERROR ", "", "warn"])
def test_error_subject_rejects_unknown_severity(severity: str) -> None:
    with pytest.raises(ValueError, match="unknown severity"):
        error_subject("mainpc", severity, "trainer")


@pytest.mark.parametrize("token", ["", "a.b", "a*", ">", "has space", "tab\t"])
def test_error_subject_rejects_tokens_that_break_the_subject(token: str) -> None:
    with pytest.raises(ValueError, match="subject token"):
        error_subject(token, "error", "trainer")
    with pytest.raises(ValueError, match="subject token"):
        error_subject("mainpc", "error", token)


@pytest.mark.parametrize(
    ("filter_subject", "subject", "matches"),
    [
        ("alerts.>", "alerts.warning.trainer", True),
        ("alerts.>", "alerts", False),
        ("events.*.trainer", "events.job.trainer", True),
        ("events.*.trainer", "events.job.router", False),
        ("events.*", "events.job.trainer", False),
        ("events.job", "events.job", True),
        ("events.job", "events.jobs", False),
    ],
)
def test_subject_filters_match_like_nats_wildcards(
    filter_subject: str, subject: str, matches: bool
) -> None:
    assert _subject_matches(filter_subject, subject) is matches


def test_bus_refuses_machine_or_agent_that_cannot_be_a_subject_token() -> None:
    with pytest.raises(ValueError, match="agent"):
        ErrorBus(nats_url=unreachable_url(), machine="m1", agent="my.agent")


# --------------------------------------------------------------------------- collapse guard


def test_guard_lets_the_first_through_and_folds_repeats_until_the_window_closes() -> None:
    clock = FakeClock()
    guard: CollapseGuard[int] = CollapseGuard(10.0, clock=clock)
    assert guard.admit("k", 0) is True
    for i in range(1, 6):
        clock.advance(1.0)
        assert guard.admit("k", i) is False
    assert guard.due() == []
    assert (guard.folded("k"), guard.folded("other")) == (5, 0)
    clock.advance(5.0)  # 10 s after the first
    [collapsed] = guard.due()
    assert (collapsed.key, collapsed.count, collapsed.first, collapsed.last) == ("k", 5, 1, 5)
    assert guard.due() == []


def test_guard_turns_a_sustained_flood_into_one_event_per_window() -> None:
    clock = FakeClock()
    guard: CollapseGuard[int] = CollapseGuard(10.0, clock=clock)
    published = 0
    folded: list[int] = []
    for i in range(10_000):  # 35 s of flood, one report every 3.5 ms
        if guard.admit("flood", i):
            published += 1
        folded += [c.count for c in guard.due()]
        clock.advance(0.0035)
    clock.advance(10.0)
    folded += [c.count for c in guard.due()]
    assert published == 1
    assert len(folded) == 4, folded
    assert sum(folded) == 9_999


def test_guard_forgets_a_key_after_a_quiet_window() -> None:
    clock = FakeClock()
    guard: CollapseGuard[str] = CollapseGuard(10.0, clock=clock)
    assert guard.admit("k", "first")
    clock.advance(10.0)
    assert guard.due() == []
    assert len(guard) == 0
    assert guard.admit("k", "again") is True


def test_guard_closes_an_expired_window_when_the_next_repeat_arrives() -> None:
    clock = FakeClock()
    guard: CollapseGuard[str] = CollapseGuard(10.0, clock=clock)
    guard.admit("k", "a")
    guard.admit("k", "b")
    clock.advance(12.0)
    # due() was not called in between: the repeat still folds, into a new window.
    assert guard.admit("k", "c") is False
    [collapsed] = guard.due()
    assert (collapsed.count, collapsed.last) == (1, "b")
    assert guard.drain()[0].last == "c"


def test_guard_keeps_keys_apart_and_reports_the_earliest_deadline() -> None:
    clock = FakeClock()
    guard: CollapseGuard[str] = CollapseGuard(10.0, clock=clock)
    assert guard.next_deadline() is None
    assert guard.admit("a", "a1")
    clock.advance(3.0)
    assert guard.admit("b", "b1")
    assert not guard.admit("a", "a2")
    assert not guard.admit("b", "b2")
    assert guard.next_deadline() == 1010.0
    clock.advance(7.0)
    assert [c.key for c in guard.due()] == ["a"]
    assert guard.next_deadline() == 1013.0


def test_guard_drain_hands_over_everything_folded_and_resets() -> None:
    clock = FakeClock()
    guard: CollapseGuard[str] = CollapseGuard(10.0, clock=clock)
    for key in ("a", "b", "c"):
        guard.admit(key, key)
    guard.admit("a", "a2")
    guard.admit("b", "b2")
    guard.admit("b", "b3")
    assert sorted((c.key, c.count) for c in guard.drain()) == [("a", 1), ("b", 2)]
    assert len(guard) == 0
    assert guard.admit("a", "a3") is True


def test_guard_beyond_max_keys_lets_everything_through() -> None:
    guard: CollapseGuard[str] = CollapseGuard(10.0, max_keys=2, clock=FakeClock())
    assert guard.admit("a", "x") and guard.admit("b", "x")
    assert guard.admit("c", "x") and guard.admit("c", "x")
    assert not guard.admit("a", "x")


def test_guard_with_a_zero_window_never_folds() -> None:
    guard: CollapseGuard[int] = CollapseGuard(0.0, clock=FakeClock())
    assert all(guard.admit("k", i) for i in range(5))
    assert guard.drain() == []


# --------------------------------------------------------------------------- the caller's side


def test_full_buffer_drops_and_counts_the_newest(bus: ErrorBus) -> None:
    for i in range(130):
        bus.report_error(f"event{i}")
    stats = bus.stats
    assert (stats.reported, stats.buffered, stats.dropped) == (130, 100, 30)
    assert [record[3] for record in records(bus)][:2] == ["event0", "event1"]
    assert records(bus)[-1][3] == "event99"


def test_reports_from_eight_threads_lose_nothing_below_the_bound() -> None:
    bus = ErrorBus(nats_url=unreachable_url(), machine="m1", agent="trainer", buffer_size=8_000)
    barrier = threading.Barrier(8)

    def report(thread: int) -> None:
        barrier.wait(DEADLINE_S)
        for i in range(1_000):
            bus.report_error(f"thread{thread} report{i}")

    threads = [threading.Thread(target=report, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE_S)
    assert not any(t.is_alive() for t in threads)
    stats = bus.stats
    assert (stats.reported, stats.buffered, stats.dropped) == (8_000, 8_000, 0)
    assert {record[3] for record in records(bus)} == {
        f"thread{t} report{i}" for t in range(8) for i in range(1_000)
    }
    assert {record[2] for record in records(bus)} == {"error"}


def test_reports_from_eight_threads_past_the_bound_count_every_drop() -> None:
    bus = ErrorBus(nats_url=unreachable_url(), machine="m1", agent="trainer", buffer_size=3_000)
    barrier = threading.Barrier(8)

    def report() -> None:
        barrier.wait(DEADLINE_S)
        for _ in range(1_000):
            bus.report_error("overflow")

    threads = [threading.Thread(target=report) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE_S)
    stats = bus.stats
    assert (stats.reported, stats.buffered, stats.dropped) == (8_000, 3_000, 5_000)


class Hostile:
    def __str__(self) -> str:
        raise RuntimeError("no str for you")

    def __repr__(self) -> str:
        raise RuntimeError("no repr either")


class HostileError(Exception):
    def __str__(self) -> str:
        raise RuntimeError("unprintable exception")


def _raise_hostile() -> None:
    raise HostileError()


def test_report_error_never_raises_on_hostile_arguments(bus: ErrorBus) -> None:
    circular: dict[str, object] = {}
    circular["self"] = circular
    bus.report_error(Hostile())  # type: ignore[arg-type]
    bus.report_error("x", severity=["not", "hashable"])  # type: ignore[arg-type]
    bus.report_error("x", severity="bogus")
    bus.report_error("x", severity=None)  # type: ignore[arg-type]
    nasty: dict[Any, Any] = {"obj": Hostile(), ("tuple", "key"): {1, 2}, "loop": circular}
    bus.report_error("x", details=nasty)
    bus.report_error("x", details=42)  # type: ignore[arg-type]
    bus.report_error("x", error_type=Hostile())  # type: ignore[arg-type]
    bus.report_error("x", exc=caught(_raise_hostile))
    stats = bus.stats
    assert (stats.reported, stats.buffered, stats.dropped) == (8, 8, 0)


def test_unknown_severity_is_reported_as_error_and_kept_in_the_record(bus: ErrorBus) -> None:
    bus.report_error("a", severity="WARNING")
    bus.report_error("b", severity="bogus")
    bus.report_error("c", severity=Severity.DEBUG)
    assert [(r[2], r[8]) for r in records(bus)] == [
        ("warning", None),
        ("error", "bogus"),
        ("debug", None),
    ]


def test_details_are_copied_at_report_time(bus: ErrorBus) -> None:
    details = {"step": 1}
    bus.report_error("x", details=details)
    details["step"] = 2
    assert records(bus)[0][5] == {"step": 1}


def test_unserialisable_values_become_strings_in_valid_json() -> None:
    circular: list[object] = []
    circular.append(circular)
    nasty: dict[Any, Any] = {
        "obj": Hostile(),
        ("tuple", "key"): 1,
        "set": {3},
        "nan": float("nan"),
        "loop": circular,
        "bytes": b"\x00\xff",
    }
    data = _dumps({"details": nasty})
    details = json.loads(data)["details"]
    assert details["obj"] == "<unprintable Hostile>"
    assert details["('tuple', 'key')"] == 1
    assert details["set"] == [3]
    assert details["nan"] == "nan"
    assert details["bytes"] == "b'\\x00\\xff'"
    assert "nested too deep" in json.dumps(details["loop"])


async def test_start_never_raises_and_close_returns_when_nats_is_down() -> None:
    bus = ErrorBus(nats_url=unreachable_url(), machine="m1", agent="trainer", buffer_size=10)
    await bus.start()
    for i in range(15):
        bus.report_error(f"stage{i} down")
    with pytest.raises(TimeoutError, match="10 event"):
        await bus.flush(timeout_s=0.2)
    assert not bus.connected
    await bus.close(timeout_s=0.2)
    stats = bus.stats
    assert (stats.reported, stats.buffered, stats.dropped, stats.published) == (15, 10, 5, 0)
    bus.report_error("after close")
    assert bus.stats.dropped == 6
