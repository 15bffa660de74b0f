"""The circuit breaker: its state machine, its triggers, half-open admission, lock-free calls.

Time is a fake clock moved by hand; concurrency is real asyncio tasks that meet
at `asyncio.Event` synchronisation points, each waited on with a deadline.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
from collections.abc import Callable

import pytest

from common.breaker import (
    BreakerConfig,
    BreakerState,
    CircuitBreaker,
    CircuitOpenError,
)
from common.config import CircuitBreakerSettings
from common.errors import NotFoundError, UnavailableError

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN
DEADLINE_S = 2.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Boom(Exception):
    pass


async def wait_for_event(event: asyncio.Event, what: str, seen: Callable[[], object]) -> None:
    try:
        await asyncio.wait_for(event.wait(), DEADLINE_S)
    except TimeoutError:
        pytest.fail(f"{what} did not happen within {DEADLINE_S}s; saw {seen()!r}")


async def succeed() -> str:
    return "ok"


async def fail() -> str:
    raise Boom("dependency down")


def make(
    clock: FakeClock, **config: float | None
) -> tuple[CircuitBreaker, list[tuple[BreakerState, BreakerState]]]:
    breaker = CircuitBreaker("dep", BreakerConfig(**config), clock=clock)  # type: ignore[arg-type]
    transitions: list[tuple[BreakerState, BreakerState]] = []
    breaker.add_listener(lambda old, new, _: transitions.append((old, new)))
    return breaker, transitions


async def fail_times(breaker: CircuitBreaker, n: int) -> None:
    for _ in range(n):
        with pytest.raises(Boom):
            await breaker.call(fail)


async def trip(breaker: CircuitBreaker) -> None:
    breaker.force_open()
    assert breaker.state is OPEN


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# -- closed: the three triggers ---------------------------------------------------------


async def test_consecutive_failures_open_the_breaker(clock: FakeClock) -> None:
    breaker, transitions = make(clock, failure_threshold=3, failure_rate_threshold=None)
    await fail_times(breaker, 2)
    assert breaker.state is CLOSED
    await fail_times(breaker, 1)
    assert breaker.state is OPEN
    assert transitions == [(CLOSED, OPEN)]
    assert breaker.stats.last_trip_reason == "consecutive"


async def test_a_success_resets_the_consecutive_count(clock: FakeClock) -> None:
    breaker, _ = make(clock, failure_threshold=3, failure_rate_threshold=None)
    for _ in range(5):
        await fail_times(breaker, 2)
        assert await breaker.call(succeed) == "ok"
    assert breaker.state is CLOSED
    assert breaker.stats.consecutive_failures == 0
    assert breaker.stats.failures == 10


async def test_failures_within_the_window_open_it_even_with_successes_between(
    clock: FakeClock,
) -> None:
    breaker, _ = make(
        clock,
        failure_threshold=None,
        failure_rate_threshold=None,
        window_failure_threshold=3,
        window_s=60,
    )
    for _ in range(2):
        await fail_times(breaker, 1)
        await breaker.call(succeed)
        clock.advance(10)
    assert breaker.state is CLOSED
    await fail_times(breaker, 1)
    assert breaker.state is OPEN
    assert breaker.stats.last_trip_reason == "window_count"


async def test_failures_older_than_the_window_do_not_count(clock: FakeClock) -> None:
    breaker, _ = make(
        clock,
        failure_threshold=None,
        failure_rate_threshold=None,
        window_failure_threshold=3,
        window_s=60,
    )
    await fail_times(breaker, 2)
    clock.advance(60)
    assert breaker.stats.window_failures == 0
    await fail_times(breaker, 2)
    assert breaker.state is CLOSED
    clock.advance(59)
    await fail_times(breaker, 1)
    assert breaker.state is OPEN


async def test_failure_rate_opens_it_once_min_calls_are_in_the_window(clock: FakeClock) -> None:
    breaker, _ = make(clock, failure_threshold=None, failure_rate_threshold=0.5, min_calls=10)
    # Alternating outcomes: rate 0.5, but fewer than min_calls until the 10th.
    for _ in range(4):
        await breaker.call(succeed)
        await fail_times(breaker, 1)
    await breaker.call(succeed)
    assert breaker.stats.window_calls == 9
    assert breaker.state is CLOSED
    await fail_times(breaker, 1)
    assert breaker.state is OPEN
    assert breaker.stats.last_trip_reason == "window_rate"


async def test_failure_rate_below_the_threshold_keeps_it_closed(clock: FakeClock) -> None:
    breaker, _ = make(clock, failure_threshold=None, failure_rate_threshold=0.5, min_calls=10)
    for _ in range(20):
        await breaker.call(succeed)
        await breaker.call(succeed)
        await fail_times(breaker, 1)
    assert breaker.state is CLOSED
    stats = breaker.stats
    assert (stats.window_calls, stats.window_failures) == (60, 20)


async def test_failure_rate_forgets_outcomes_that_left_the_window(clock: FakeClock) -> None:
    breaker, _ = make(
        clock, failure_threshold=None, failure_rate_threshold=0.5, min_calls=4, window_s=10
    )
    await fail_times(breaker, 3)
    clock.advance(10)
    await breaker.call(succeed)
    await breaker.call(succeed)
    await breaker.call(succeed)
    await fail_times(breaker, 1)  # 1 of 4 in the window, not 4 of 7
    assert breaker.state is CLOSED


async def test_window_memory_is_bounded_at_high_call_rates(clock: FakeClock) -> None:
    breaker, _ = make(clock, failure_threshold=None, failure_rate_threshold=0.9, window_s=1)
    for _ in range(30_000):
        clock.advance(0.0001)
        await breaker.call(succeed)
    # 10,000 calls per window_s, counted to within a 1/100 slice of the window.
    assert 9_900 <= breaker.stats.window_calls <= 10_000
    assert len(breaker._window._slices) <= 101


# -- open ---------------------------------------------------------------------------------


async def test_open_rejects_at_once_without_calling_and_says_when_to_retry(
    clock: FakeClock,
) -> None:
    breaker, _ = make(clock, reset_timeout_s=30)
    await trip(breaker)
    clock.advance(12)
    ran = []

    async def tracked() -> None:
        ran.append(1)

    with pytest.raises(CircuitOpenError) as info:
        await breaker.call(tracked)
    assert ran == []
    assert isinstance(info.value, UnavailableError)
    assert info.value.breaker == "dep"
    assert info.value.retry_after_s == pytest.approx(18)
    assert breaker.stats.rejected == 1


def test_circuit_open_error_survives_pickling() -> None:
    err = pickle.loads(pickle.dumps(CircuitOpenError("dep", 3.5)))
    assert (err.breaker, err.retry_after_s, str(err)) == (
        "dep",
        3.5,
        str(CircuitOpenError("dep", 3.5)),
    )


async def test_open_turns_half_open_after_the_reset_timeout_on_first_look(
    clock: FakeClock,
) -> None:
    breaker, transitions = make(clock, reset_timeout_s=30)
    await trip(breaker)
    clock.advance(29.99)
    assert breaker.state is OPEN
    assert not breaker.allow_request()
    clock.advance(0.01)
    assert transitions == [(CLOSED, OPEN)]  # no timer: nobody looked yet
    assert breaker.state is HALF_OPEN
    assert transitions == [(CLOSED, OPEN), (OPEN, HALF_OPEN)]


async def test_failures_recorded_while_open_do_not_restart_the_timer(clock: FakeClock) -> None:
    breaker, _ = make(clock, reset_timeout_s=30)
    await trip(breaker)
    clock.advance(20)
    breaker.record_failure()
    clock.advance(10)
    assert breaker.state is HALF_OPEN


# -- half-open ----------------------------------------------------------------------------


async def test_a_trial_success_closes_it(clock: FakeClock) -> None:
    breaker, transitions = make(clock, reset_timeout_s=30)
    await fail_times(breaker, 5)
    clock.advance(30)
    assert await breaker.call(succeed) == "ok"
    assert breaker.state is CLOSED
    assert transitions == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]
    stats = breaker.stats
    assert (stats.consecutive_failures, stats.window_calls) == (0, 0)


async def test_a_trial_failure_reopens_it_and_restarts_the_timer(clock: FakeClock) -> None:
    breaker, transitions = make(clock, reset_timeout_s=30)
    await trip(breaker)
    clock.advance(30)
    await fail_times(breaker, 1)
    assert breaker.state is OPEN
    assert breaker.stats.last_trip_reason == "half_open_trial"
    clock.advance(29.99)
    assert breaker.state is OPEN
    clock.advance(0.01)
    assert breaker.state is HALF_OPEN
    assert transitions == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, OPEN), (OPEN, HALF_OPEN)]


async def test_success_threshold_needs_that_many_trial_successes(clock: FakeClock) -> None:
    breaker, _ = make(clock, reset_timeout_s=30, success_threshold=3)
    await trip(breaker)
    clock.advance(30)
    await breaker.call(succeed)
    await breaker.call(succeed)
    assert breaker.state is HALF_OPEN
    await breaker.call(succeed)
    assert breaker.state is CLOSED


async def test_half_open_admits_exactly_n_concurrent_trials_and_rejects_the_rest(
    clock: FakeClock,
) -> None:
    n = 3
    breaker, _ = make(clock, reset_timeout_s=30, half_open_max_calls=n, success_threshold=n)
    await trip(breaker)
    clock.advance(30)

    entered: list[int] = []
    all_entered = asyncio.Event()
    release = asyncio.Event()

    async def trial(i: int) -> int:
        entered.append(i)
        if len(entered) == n:
            all_entered.set()
        await release.wait()
        return i

    trials = [asyncio.create_task(breaker.call(trial, i)) for i in range(n)]
    await wait_for_event(all_entered, f"{n} trials running", lambda: entered)

    # A burst while the trials are in flight: every call is rejected at once.
    let_through: list[int] = []

    async def burst_call(i: int) -> int:
        let_through.append(i)
        return i

    burst = await asyncio.gather(
        *(breaker.call(burst_call, i) for i in range(50)), return_exceptions=True
    )
    assert let_through == []
    assert all(isinstance(r, CircuitOpenError) for r in burst), burst
    assert all(r.retry_after_s == 0.0 for r in burst if isinstance(r, CircuitOpenError))
    assert sorted(entered) == list(range(n))
    assert breaker.stats.trials_in_flight == n
    assert not breaker.allow_request()

    release.set()
    assert sorted(await asyncio.gather(*trials)) == list(range(n))
    assert breaker.state is CLOSED
    assert breaker.stats.rejected == 50


async def test_a_finished_trial_frees_its_slot_for_the_next(clock: FakeClock) -> None:
    breaker, _ = make(clock, reset_timeout_s=30, success_threshold=2)
    await trip(breaker)
    clock.advance(30)
    release = asyncio.Event()
    entered = asyncio.Event()

    async def slow() -> str:
        entered.set()
        await release.wait()
        return "ok"

    first = asyncio.create_task(breaker.call(slow))
    await wait_for_event(entered, "first trial running", lambda: breaker.stats)
    with pytest.raises(CircuitOpenError):
        await breaker.call(succeed)
    release.set()
    await first
    assert breaker.state is HALF_OPEN
    assert breaker.allow_request()
    await breaker.call(succeed)
    assert breaker.state is CLOSED


async def test_a_cancelled_trial_frees_its_slot_without_counting(clock: FakeClock) -> None:
    breaker, transitions = make(clock, reset_timeout_s=30)
    await trip(breaker)
    clock.advance(30)
    entered = asyncio.Event()

    async def hang() -> None:
        entered.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(breaker.call(hang))
    await wait_for_event(entered, "trial running", lambda: breaker.stats)
    assert not breaker.allow_request()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    stats = breaker.stats
    assert (stats.state, stats.trials_in_flight, stats.ignored) == (HALF_OPEN, 0, 1)
    assert (stats.successes, stats.failures) == (0, 0)
    assert breaker.allow_request()
    await breaker.call(succeed)
    assert transitions[-1] == (HALF_OPEN, CLOSED)


async def test_a_cancelled_call_is_no_failure_while_closed(clock: FakeClock) -> None:
    breaker, _ = make(clock, failure_threshold=1)
    entered = asyncio.Event()

    async def hang() -> None:
        entered.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(breaker.call(hang))
    await wait_for_event(entered, "call running", lambda: breaker.stats)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert breaker.state is CLOSED
    assert breaker.stats.ignored == 1


async def test_allow_request_claims_no_slot(clock: FakeClock) -> None:
    breaker, _ = make(clock, reset_timeout_s=30)
    await trip(breaker)
    clock.advance(30)
    assert all(breaker.allow_request() for _ in range(5))
    assert breaker.stats.trials_in_flight == 0
    await breaker.call(succeed)
    assert breaker.state is CLOSED


# -- outcomes of an earlier state ----------------------------------------------------------


async def test_a_call_from_before_the_trip_does_not_count_as_a_trial(clock: FakeClock) -> None:
    breaker, _ = make(clock, reset_timeout_s=30)
    entered = asyncio.Event()
    release = asyncio.Event()

    async def slow(ok: bool) -> str:
        entered.set()
        await release.wait()
        if not ok:
            raise Boom("late")
        return "late"

    late_success = asyncio.create_task(breaker.call(slow, True))
    await wait_for_event(entered, "closed-state call running", lambda: breaker.stats)
    await trip(breaker)
    clock.advance(30)
    assert breaker.state is HALF_OPEN
    release.set()
    assert await late_success == "late"
    assert breaker.state is HALF_OPEN  # a late success is no trial success
    assert breaker.stats.stale == 1


async def test_a_late_failure_does_not_restart_the_reset_timer(clock: FakeClock) -> None:
    breaker, _ = make(clock, reset_timeout_s=30)
    entered = asyncio.Event()
    release = asyncio.Event()

    async def slow() -> None:
        entered.set()
        await release.wait()
        raise Boom("late")

    late = asyncio.create_task(breaker.call(slow))
    await wait_for_event(entered, "closed-state call running", lambda: breaker.stats)
    await trip(breaker)
    clock.advance(20)
    release.set()
    with pytest.raises(Boom):
        await late
    clock.advance(10)
    assert breaker.state is HALF_OPEN


# -- no lock across the call ---------------------------------------------------------------


async def test_two_slow_calls_run_concurrently_while_closed(clock: FakeClock) -> None:
    """Each call waits for the other to have started: a lock across calls would deadlock."""
    breaker, _ = make(clock)
    a_in, b_in = asyncio.Event(), asyncio.Event()

    async def meet(mine: asyncio.Event, theirs: asyncio.Event) -> str:
        mine.set()
        await theirs.wait()
        return "met"

    both = asyncio.gather(breaker.call(meet, a_in, b_in), breaker.call(meet, b_in, a_in))
    try:
        results = await asyncio.wait_for(both, DEADLINE_S)
    except TimeoutError:
        pytest.fail(f"calls were serialised: a in={a_in.is_set()}, b in={b_in.is_set()}")
    assert list(results) == ["met", "met"]


async def test_two_protected_blocks_run_concurrently_while_closed(clock: FakeClock) -> None:
    breaker, _ = make(clock)
    a_in, b_in = asyncio.Event(), asyncio.Event()

    async def meet(mine: asyncio.Event, theirs: asyncio.Event) -> None:
        async with breaker.protect():
            mine.set()
            await theirs.wait()

    try:
        await asyncio.wait_for(asyncio.gather(meet(a_in, b_in), meet(b_in, a_in)), DEADLINE_S)
    except TimeoutError:
        pytest.fail(f"blocks were serialised: a in={a_in.is_set()}, b in={b_in.is_set()}")
    assert breaker.stats.successes == 2


# -- the other ways in: protect(), decorator, record_*() -----------------------------------


async def test_protect_judges_the_block_and_rejects_on_entry(clock: FakeClock) -> None:
    breaker, _ = make(clock, failure_threshold=2, failure_rate_threshold=None)
    for _ in range(2):
        with pytest.raises(Boom):
            async with breaker.protect():
                raise Boom("x")
    assert breaker.state is OPEN
    entered = False
    with pytest.raises(CircuitOpenError):
        async with breaker.protect():
            entered = True
    assert not entered


async def test_a_protect_guard_is_single_use(clock: FakeClock) -> None:
    breaker, _ = make(clock)
    guard = breaker.protect()
    async with guard:
        pass
    with pytest.raises(RuntimeError, match="single-use"):
        async with guard:
            pass


async def test_decorated_function_goes_through_the_breaker(clock: FakeClock) -> None:
    breaker, _ = make(clock, failure_threshold=1, failure_rate_threshold=None)

    @breaker
    async def lookup(key: str, *, default: str = "") -> str:
        """Look a key up."""
        if key == "bad":
            raise Boom(key)
        return key + default

    assert lookup.__name__ == "lookup"
    assert await lookup("a", default="!") == "a!"
    with pytest.raises(Boom):
        await lookup("bad")
    with pytest.raises(CircuitOpenError):
        await lookup("a")


def test_record_failures_within_the_window_open_it_as_the_supervisor_configures() -> None:
    clock = FakeClock()
    settings = CircuitBreakerSettings(failure_threshold=3, window_s=60, reset_timeout_s=120)
    breaker = CircuitBreaker("restarts", BreakerConfig.from_settings(settings), clock=clock)
    for _ in range(2):
        assert breaker.allow_request()
        breaker.record_failure()
        breaker.record_success()  # healthy again, briefly
        clock.advance(25)
    assert breaker.state is CLOSED
    breaker.record_failure()
    assert breaker.state is OPEN
    assert not breaker.allow_request()
    clock.advance(120)
    assert breaker.allow_request()
    breaker.record_success()
    assert breaker.state is CLOSED


def test_record_failures_spread_wider_than_the_window_never_open_it() -> None:
    clock = FakeClock()
    settings = CircuitBreakerSettings(failure_threshold=3, window_s=60, reset_timeout_s=120)
    breaker = CircuitBreaker("restarts", BreakerConfig.from_settings(settings), clock=clock)
    for _ in range(20):
        breaker.record_failure()
        clock.advance(30.01)
    assert breaker.state is CLOSED
    assert breaker.stats.failures == 20


def test_record_failure_while_half_open_reopens_it() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("dep", BreakerConfig(reset_timeout_s=10), clock=clock)
    breaker.force_open()
    clock.advance(10)
    breaker.record_failure()
    assert breaker.state is OPEN


def test_from_settings_keeps_the_settings_and_uses_only_the_window_count() -> None:
    settings = CircuitBreakerSettings(failure_threshold=7, window_s=30, reset_timeout_s=90)
    config = BreakerConfig.from_settings(settings)
    assert (config.window_failure_threshold, config.window_s, config.reset_timeout_s) == (
        7,
        30,
        90,
    )
    assert config.failure_threshold is None
    assert config.failure_rate_threshold is None


# -- which exceptions count ----------------------------------------------------------------


async def test_exceptions_the_predicate_rejects_count_as_successes(clock: FakeClock) -> None:
    breaker = CircuitBreaker(
        "dep",
        BreakerConfig(failure_threshold=2, failure_rate_threshold=None),
        clock=clock,
        failure_predicate=lambda exc: not isinstance(exc, NotFoundError),
    )

    async def missing() -> None:
        raise NotFoundError("no such model")

    for _ in range(2):
        await fail_times(breaker, 1)
        with pytest.raises(NotFoundError):
            await breaker.call(missing)
    assert breaker.state is CLOSED
    assert (breaker.stats.failures, breaker.stats.successes) == (2, 2)


async def test_a_failing_predicate_counts_a_failure_and_the_caller_sees_its_own_error(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(exc: BaseException) -> bool:
        raise RuntimeError("predicate bug")

    breaker = CircuitBreaker(
        "dep",
        BreakerConfig(failure_threshold=1, failure_rate_threshold=None),
        clock=clock,
        failure_predicate=broken,
    )
    with caplog.at_level(logging.ERROR, logger="common.breaker"):
        await fail_times(breaker, 1)
    assert breaker.state is OPEN
    assert "failure_predicate raised" in caplog.text


# -- listeners and operator controls --------------------------------------------------------


async def test_a_failing_listener_is_logged_and_the_others_still_run(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    breaker, transitions = make(clock, failure_threshold=1, failure_rate_threshold=None)

    def broken(old: BreakerState, new: BreakerState, _: CircuitBreaker) -> None:
        raise RuntimeError("listener bug")

    seen_after: list[BreakerState] = []
    breaker.add_listener(broken)
    breaker.add_listener(lambda old, new, b: seen_after.append(b.state))
    with caplog.at_level(logging.ERROR, logger="common.breaker"):
        await fail_times(breaker, 1)
    assert transitions == [(CLOSED, OPEN)]
    assert seen_after == [OPEN]
    assert "listener" in caplog.text
    assert "listener bug" in caplog.text


async def test_a_removed_listener_is_not_called(clock: FakeClock) -> None:
    breaker, _ = make(clock)
    calls: list[object] = []

    def listener(old: BreakerState, new: BreakerState, _: CircuitBreaker) -> None:
        calls.append(new)

    breaker.add_listener(listener)
    breaker.remove_listener(listener)
    breaker.remove_listener(listener)
    breaker.force_open()
    assert calls == []


async def test_reset_closes_and_forgets_counts(clock: FakeClock) -> None:
    breaker, transitions = make(clock, failure_threshold=3, failure_rate_threshold=None)
    await fail_times(breaker, 3)
    breaker.reset()
    assert breaker.state is CLOSED
    await fail_times(breaker, 2)
    assert breaker.state is CLOSED
    assert transitions == [(CLOSED, OPEN), (OPEN, CLOSED)]


async def test_force_open_opens_and_half_opens_after_the_timeout(clock: FakeClock) -> None:
    breaker, transitions = make(clock, reset_timeout_s=5)
    breaker.force_open()
    breaker.force_open()
    assert transitions == [(CLOSED, OPEN)]
    assert breaker.stats.last_trip_reason == "forced"
    clock.advance(5)
    assert breaker.state is HALF_OPEN


# -- config -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"failure_threshold": 0}, "failure_threshold"),
        ({"window_failure_threshold": 0}, "window_failure_threshold"),
        ({"failure_rate_threshold": 0.0}, "failure_rate_threshold"),
        ({"failure_rate_threshold": 1.5}, "failure_rate_threshold"),
        ({"window_s": 0}, "window_s"),
        ({"reset_timeout_s": -1}, "reset_timeout_s"),
        ({"min_calls": 0}, "min_calls"),
        ({"half_open_max_calls": 0}, "half_open_max_calls"),
        ({"success_threshold": 0}, "success_threshold"),
        ({"failure_threshold": None, "failure_rate_threshold": None}, "every trigger is off"),
    ],
)
def test_invalid_config_names_the_field(kwargs: dict[str, float | None], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        BreakerConfig(**kwargs)  # type: ignore[arg-type]
