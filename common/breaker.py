"""An asyncio circuit breaker: stop calling a dependency that keeps failing, then probe it.

States and transitions:

- CLOSED: calls go through. Any of three triggers, each configurable and each
  switched off with `None`, opens the breaker:
  consecutive failures >= `failure_threshold`;
  failures within the last `window_s` >= `window_failure_threshold`;
  failure rate within the last `window_s` >= `failure_rate_threshold`, once at
  least `min_calls` outcomes are in the window.
- OPEN: every call is rejected at once with `CircuitOpenError`. After
  `reset_timeout_s` the breaker turns HALF_OPEN, on the first look at it (there
  is no timer task: `state`, `allow_request()` and every call look).
- HALF_OPEN: at most `half_open_max_calls` trial calls run at a time; every
  other call is rejected at once, so a recovering dependency never sees a burst.
  `success_threshold` trial successes close the breaker; one trial failure opens
  it again, with the reset timer restarted.

Why there is no lock: the usual asyncio breakers hold an `asyncio.Lock` across
the protected call. That serialises every caller behind the slowest one (a
breaker in front of a service answering in 200 ms caps it at five calls a
second) and makes a hung call block callers that the breaker should reject at
once. Here every state change happens synchronously, between awaits: asyncio
runs one task at a time, so code without an `await` cannot be interleaved and
needs no lock. A call is admitted (a ticket taken) before its first await and
settled after its last, and the breaker never awaits anything itself.

Outcomes are judged when the call ends. An outcome only counts for the state it
was admitted in: a call admitted while CLOSED that fails after the breaker
opened does not restart the reset timer, and a slow call from before a trip
does not count as a trial. Cancellation (and any other `BaseException` that is
not an `Exception`, such as `KeyboardInterrupt`) counts as nothing and frees
its trial slot. Put deadlines inside the protected call (`asyncio.timeout`
inside `fn`, or a gRPC `timeout=`) so that they surface as failures; a deadline
around the breaker cancels the call, which counts as nothing.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, TypeVar

from common.errors import UnavailableError

if TYPE_CHECKING:
    from common.config import CircuitBreakerSettings

__all__ = [
    "BreakerConfig",
    "BreakerListener",
    "BreakerState",
    "BreakerStats",
    "CircuitBreaker",
    "CircuitOpenError",
    "TripReason",
]

_log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

# The sliding window keeps at most this many slices, so its memory does not grow
# with the call rate; it is exact to window_s / _WINDOW_SLICES.
_WINDOW_SLICES = 100


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


TripReason = Literal["consecutive", "window_count", "window_rate", "half_open_trial", "forced"]
"""Why the breaker last opened: which trigger fired, a failed trial, or `force_open()`."""

BreakerListener = Callable[[BreakerState, BreakerState, "CircuitBreaker"], object]
"""`listener(old, new, breaker)`, called synchronously on every state change."""


class CircuitOpenError(UnavailableError):
    """The breaker rejected the call without running it.

    `breaker` names the breaker. `retry_after_s` is how long until the breaker
    admits a trial call; 0.0 when it is HALF_OPEN with every trial slot taken
    (a trial in flight decides, so there is no timer to report).
    """

    def __init__(self, breaker: str, retry_after_s: float) -> None:
        self.breaker = breaker
        self.retry_after_s = retry_after_s
        if retry_after_s > 0:
            message = f"circuit breaker {breaker!r} is open; retry in {retry_after_s:.1f}s"
        else:
            message = f"circuit breaker {breaker!r} is half-open and its trial calls are taken"
        super().__init__(message)

    def __reduce__(self) -> tuple[type[CircuitOpenError], tuple[str, float]]:
        return type(self), (self.breaker, self.retry_after_s)


@dataclass(frozen=True, kw_only=True)
class BreakerConfig:
    """When the breaker opens, how long it stays open, and how it probes.

    Each of the three triggers is switched off with `None`; at least one must
    be on. Defaults: 5 consecutive failures, or a failure rate of 50 % over at
    least 10 calls within 60 s.
    """

    failure_threshold: int | None = 5
    """Consecutive failures that open the breaker (a success resets the count)."""
    window_s: float = 60.0
    """Length of the sliding window the two window triggers look at."""
    window_failure_threshold: int | None = None
    """Failures within `window_s` that open the breaker, successes in between or not."""
    failure_rate_threshold: float | None = 0.5
    """Failure rate within `window_s` (0 < rate <= 1) that opens the breaker."""
    min_calls: int = 10
    """Outcomes needed within `window_s` before the failure rate counts."""
    reset_timeout_s: float = 60.0
    """Time OPEN before the breaker turns HALF_OPEN."""
    half_open_max_calls: int = 1
    """Trial calls admitted at the same time while HALF_OPEN."""
    success_threshold: int = 1
    """Trial successes that close the breaker."""

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.failure_threshold is not None and self.failure_threshold < 1:
            problems.append("failure_threshold must be >= 1 (or None to switch it off)")
        if self.window_failure_threshold is not None and self.window_failure_threshold < 1:
            problems.append("window_failure_threshold must be >= 1 (or None to switch it off)")
        if self.failure_rate_threshold is not None and not 0 < self.failure_rate_threshold <= 1:
            problems.append("failure_rate_threshold must be in (0, 1] (or None to switch it off)")
        if (
            self.failure_threshold is None
            and self.window_failure_threshold is None
            and self.failure_rate_threshold is None
        ):
            problems.append(
                "every trigger is off; set failure_threshold, window_failure_threshold"
                " or failure_rate_threshold"
            )
        if not self.window_s > 0:
            problems.append("window_s must be > 0")
        if self.min_calls < 1:
            problems.append("min_calls must be >= 1")
        if not self.reset_timeout_s > 0:
            problems.append("reset_timeout_s must be > 0")
        if self.half_open_max_calls < 1:
            problems.append("half_open_max_calls must be >= 1")
        if self.success_threshold < 1:
            problems.append("success_threshold must be >= 1")
        if problems:
            raise ValueError("invalid BreakerConfig: " + "; ".join(problems))

    @classmethod
    def from_settings(cls, settings: CircuitBreakerSettings) -> BreakerConfig:
        """The config that `settings.circuit_breaker` means: open after
        `failure_threshold` failures within `window_s`, successes in between or
        not; half-open after `reset_timeout_s`. The other two triggers are off."""
        return cls(
            failure_threshold=None,
            window_s=settings.window_s,
            window_failure_threshold=settings.failure_threshold,
            failure_rate_threshold=None,
            reset_timeout_s=settings.reset_timeout_s,
        )


@dataclass(frozen=True, kw_only=True)
class BreakerStats:
    """A snapshot of a breaker's counters.

    `calls` counts admitted calls; `successes` and `failures` count every judged
    outcome (wrapped calls and `record_*()`); `ignored` counts cancelled or
    interrupted calls; `stale` counts outcomes that arrived after the state they
    were admitted in had ended (they change nothing); `rejected` counts calls
    refused with `CircuitOpenError`.
    """

    name: str
    state: BreakerState
    calls: int
    successes: int
    failures: int
    rejected: int
    ignored: int
    stale: int
    times_opened: int
    last_trip_reason: TripReason | None
    consecutive_failures: int
    window_calls: int
    window_failures: int
    trials_in_flight: int


def _counts_as_failure(exc: BaseException) -> bool:
    return isinstance(exc, Exception)


class _Slice:
    __slots__ = ("calls", "failures", "start")

    def __init__(self, start: float) -> None:
        self.start = start
        self.calls = 0
        self.failures = 0


class _Window:
    """Outcomes of the last `span_s` seconds, in at most `_WINDOW_SLICES` slices."""

    def __init__(self, span_s: float) -> None:
        self._span_s = span_s
        self._slice_s = span_s / _WINDOW_SLICES
        self._slices: deque[_Slice] = deque()
        self.calls = 0
        self.failures = 0

    def add(self, now: float, failed: bool) -> None:
        self.prune(now)
        if not self._slices or now - self._slices[-1].start >= self._slice_s:
            self._slices.append(_Slice(now))
        last = self._slices[-1]
        last.calls += 1
        self.calls += 1
        if failed:
            last.failures += 1
            self.failures += 1

    def prune(self, now: float) -> None:
        while self._slices and now - self._slices[0].start >= self._span_s:
            gone = self._slices.popleft()
            self.calls -= gone.calls
            self.failures -= gone.failures

    def clear(self) -> None:
        self._slices.clear()
        self.calls = 0
        self.failures = 0


class _Ticket:
    """An admitted call: the state epoch it was admitted in, and whether it is a trial."""

    __slots__ = ("epoch", "trial")

    def __init__(self, epoch: int, trial: bool) -> None:
        self.epoch = epoch
        self.trial = trial


class _Protected:
    """`async with breaker.protect():` admits on entry and judges the block's outcome on exit."""

    __slots__ = ("_breaker", "_ticket", "_used")

    def __init__(self, breaker: CircuitBreaker) -> None:
        self._breaker = breaker
        self._ticket: _Ticket | None = None
        self._used = False

    async def __aenter__(self) -> None:
        if self._used:
            raise RuntimeError("a protect() guard is single-use; call breaker.protect() again")
        self._used = True
        self._ticket = self._breaker._admit()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        ticket, self._ticket = self._ticket, None
        if ticket is not None:
            self._breaker._settle(ticket, exc)


class CircuitBreaker:
    """A circuit breaker for one dependency; see the module docstring for the state machine.

    `failure_predicate(exc)` says whether an `Exception` raised by the protected
    call is a failure of the dependency; one that is not (say, the dependency
    answered NOT_FOUND) counts as a success. The default counts every
    `Exception`. Cancellation never counts. `clock` is the monotonic time source.

    Use it as `await breaker.call(fn, *args)`, as `async with breaker.protect():`,
    as a decorator `@breaker` on an async function, or, for outcomes that are not
    one call (the supervisor counting restarts), through `allow_request()`,
    `record_success()` and `record_failure()`.
    """

    def __init__(
        self,
        name: str,
        config: BreakerConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        failure_predicate: Callable[[BaseException], bool] = _counts_as_failure,
    ) -> None:
        self.name = name
        self.config = config if config is not None else BreakerConfig()
        self._clock = clock
        self._failure_predicate = failure_predicate
        self._listeners: list[BreakerListener] = []

        self._state = BreakerState.CLOSED
        # Bumped on every transition, so outcomes of calls admitted in an earlier
        # state can be told apart and ignored.
        self._epoch = 0
        self._opened_at = 0.0
        self._consecutive_failures = 0
        self._window = _Window(self.config.window_s)
        self._trials_in_flight = 0
        self._trial_successes = 0

        self._calls = 0
        self._successes = 0
        self._failures = 0
        self._rejected = 0
        self._ignored = 0
        self._stale = 0
        self._times_opened = 0
        self._last_trip_reason: TripReason | None = None

    def __repr__(self) -> str:
        return f"CircuitBreaker({self.name!r}, state={self._state.value})"

    # -- reading -----------------------------------------------------------------

    @property
    def state(self) -> BreakerState:
        """The current state; turns OPEN into HALF_OPEN when the reset timeout has passed."""
        self._refresh(self._clock())
        return self._state

    @property
    def stats(self) -> BreakerStats:
        """A snapshot of the counters (and the current state)."""
        now = self._clock()
        self._refresh(now)
        self._window.prune(now)
        return BreakerStats(
            name=self.name,
            state=self._state,
            calls=self._calls,
            successes=self._successes,
            failures=self._failures,
            rejected=self._rejected,
            ignored=self._ignored,
            stale=self._stale,
            times_opened=self._times_opened,
            last_trip_reason=self._last_trip_reason,
            consecutive_failures=self._consecutive_failures,
            window_calls=self._window.calls,
            window_failures=self._window.failures,
            trials_in_flight=self._trials_in_flight,
        )

    def allow_request(self) -> bool:
        """Whether a call made now would be admitted; claims no trial slot."""
        self._refresh(self._clock())
        if self._state is BreakerState.CLOSED:
            return True
        if self._state is BreakerState.HALF_OPEN:
            return self._trials_in_flight < self.config.half_open_max_calls
        return False

    # -- listeners ---------------------------------------------------------------

    def add_listener(self, listener: BreakerListener) -> None:
        """Call `listener(old, new, breaker)` on every state change.

        Listeners run synchronously, in the order added; one that raises is
        logged and the others still run.
        """
        self._listeners.append(listener)

    def remove_listener(self, listener: BreakerListener) -> None:
        """Stop calling `listener`; a listener that was never added is ignored."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    # -- protecting calls --------------------------------------------------------

    async def call(self, fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run `await fn(*args, **kwargs)` if the breaker admits it, and judge the outcome.

        Raises `CircuitOpenError` without calling `fn` when the breaker is OPEN,
        or HALF_OPEN with every trial slot taken. Whatever `fn` raises is
        re-raised unchanged.
        """
        ticket = self._admit()
        try:
            result = await fn(*args, **kwargs)
        except BaseException as exc:
            self._settle(ticket, exc)
            raise
        self._settle(ticket, None)
        return result

    def protect(self) -> AbstractAsyncContextManager[None]:
        """An async context manager with the semantics of `call()` for its block.

        `async with breaker.protect(): ...` raises `CircuitOpenError` on entry
        when the call is not admitted; an exception leaving the block is judged
        like one raised by `fn` and propagates unchanged. Each guard is used once.
        """
        return _Protected(self)

    def __call__(self, fn: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
        """Decorate an async function so that every call goes through `call()`."""

        @functools.wraps(fn)
        async def protected(*args: P.args, **kwargs: P.kwargs) -> T:
            return await self.call(fn, *args, **kwargs)

        return protected

    # -- outcomes that are not one call -----------------------------------------

    def record_success(self) -> None:
        """Count a success as if a call admitted now had succeeded.

        CLOSED: resets the consecutive count. HALF_OPEN: counts as a trial
        success (and may close the breaker). OPEN: counted in `stats` only.
        """
        self._record(failed=False)

    def record_failure(self) -> None:
        """Count a failure as if a call admitted now had failed.

        CLOSED: may open the breaker. HALF_OPEN: opens it again. OPEN: counted
        in `stats` only; the reset timer is not restarted.
        """
        self._record(failed=True)

    # -- operator controls -------------------------------------------------------

    def reset(self) -> None:
        """Close the breaker and forget every count; calls in flight no longer count."""
        self._close()

    def force_open(self) -> None:
        """Open the breaker now (the reset timer starts now, as on any trip)."""
        self._open(self._clock(), "forced")

    # -- the state machine (synchronous: never awaits) ---------------------------

    def _admit(self) -> _Ticket:
        now = self._clock()
        self._refresh(now)
        if self._state is BreakerState.CLOSED:
            self._calls += 1
            return _Ticket(self._epoch, trial=False)
        if (
            self._state is BreakerState.HALF_OPEN
            and self._trials_in_flight < self.config.half_open_max_calls
        ):
            self._trials_in_flight += 1
            self._calls += 1
            return _Ticket(self._epoch, trial=True)
        self._rejected += 1
        retry_after_s = 0.0
        if self._state is BreakerState.OPEN:
            retry_after_s = max(0.0, self._opened_at + self.config.reset_timeout_s - now)
        raise CircuitOpenError(self.name, retry_after_s)

    def _settle(self, ticket: _Ticket, exc: BaseException | None) -> None:
        current = ticket.epoch == self._epoch
        if exc is not None and not isinstance(exc, Exception):
            self._ignored += 1
            if current and ticket.trial:
                self._trials_in_flight -= 1
            return
        failed = exc is not None and self._judge(exc)
        if failed:
            self._failures += 1
        else:
            self._successes += 1
        if not current:
            self._stale += 1
            return
        now = self._clock()
        if ticket.trial:
            self._trials_in_flight -= 1
            self._on_trial_outcome(now, failed)
        else:
            self._on_closed_outcome(now, failed)

    def _judge(self, exc: BaseException) -> bool:
        try:
            return bool(self._failure_predicate(exc))
        except Exception:
            # The caller must see its own exception, not the predicate's.
            _log.exception(
                "circuit breaker %r: failure_predicate raised; counting %r as a failure",
                self.name,
                exc,
            )
            return True

    def _record(self, *, failed: bool) -> None:
        now = self._clock()
        self._refresh(now)
        if failed:
            self._failures += 1
        else:
            self._successes += 1
        if self._state is BreakerState.CLOSED:
            self._on_closed_outcome(now, failed)
        elif self._state is BreakerState.HALF_OPEN:
            self._on_trial_outcome(now, failed)
        else:
            self._stale += 1

    def _on_closed_outcome(self, now: float, failed: bool) -> None:
        self._window.add(now, failed)
        if not failed:
            self._consecutive_failures = 0
            return
        self._consecutive_failures += 1
        cfg = self.config
        reason: TripReason | None = None
        if (
            cfg.failure_threshold is not None
            and self._consecutive_failures >= cfg.failure_threshold
        ):
            reason = "consecutive"
        elif (
            cfg.window_failure_threshold is not None
            and self._window.failures >= cfg.window_failure_threshold
        ):
            reason = "window_count"
        elif (
            cfg.failure_rate_threshold is not None
            and self._window.calls >= cfg.min_calls
            and self._window.failures >= cfg.failure_rate_threshold * self._window.calls
        ):
            reason = "window_rate"
        if reason is not None:
            self._open(now, reason)

    def _on_trial_outcome(self, now: float, failed: bool) -> None:
        if failed:
            self._open(now, "half_open_trial")
            return
        self._trial_successes += 1
        if self._trial_successes >= self.config.success_threshold:
            self._close()

    def _refresh(self, now: float) -> None:
        if (
            self._state is BreakerState.OPEN
            and now - self._opened_at >= self.config.reset_timeout_s
        ):
            self._trials_in_flight = 0
            self._trial_successes = 0
            self._transition(BreakerState.HALF_OPEN)

    def _open(self, now: float, reason: TripReason) -> None:
        self._opened_at = now
        self._times_opened += 1
        self._last_trip_reason = reason
        self._trials_in_flight = 0
        self._trial_successes = 0
        _log.warning(
            "circuit breaker %r opened (%s): %d consecutive, %d of %d failed in the last %gs;"
            " half-open in %gs",
            self.name,
            reason,
            self._consecutive_failures,
            self._window.failures,
            self._window.calls,
            self.config.window_s,
            self.config.reset_timeout_s,
        )
        # Forcing an open breaker open restarts its timer but is no state change,
        # so listeners are not called again.
        if self._state is BreakerState.OPEN:
            self._epoch += 1
            return
        self._transition(BreakerState.OPEN)

    def _close(self) -> None:
        self._consecutive_failures = 0
        self._window.clear()
        self._trials_in_flight = 0
        self._trial_successes = 0
        if self._state is BreakerState.CLOSED:
            self._epoch += 1
            return
        self._transition(BreakerState.CLOSED)

    def _transition(self, new: BreakerState) -> None:
        old, self._state = self._state, new
        self._epoch += 1
        if new is not BreakerState.OPEN:
            _log.info("circuit breaker %r: %s -> %s", self.name, old.value, new.value)
        # Every field is consistent before listeners run, so a listener may read
        # the breaker or even change its state again.
        for listener in tuple(self._listeners):
            try:
                listener(old, new, self)
            except Exception:
                _log.exception(
                    "circuit breaker %r: listener %r failed on %s -> %s",
                    self.name,
                    listener,
                    old.value,
                    new.value,
                )
