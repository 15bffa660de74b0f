"""The retry policies: what they retry, when they stop, and how long they wait."""

from __future__ import annotations

import asyncio
import errno
import logging
import random
from collections.abc import Callable

import grpc
import nats.errors
import pytest
import redis.exceptions
from tenacity import AsyncRetrying

from common.breaker import CircuitOpenError
from common.errors import (
    RETRYABLE_CODES,
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from common.retry import (
    backoff_delay,
    infra_retry,
    infra_retryable,
    retry_policy,
    retryable,
    rpc_retry,
)

SEEDS = range(500)


def rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=f"{code.name} from server"
    )


class FailingCall:
    """An async callable that raises the given errors in turn, then returns "done"."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.attempts = 0

    async def __call__(self) -> str:
        self.attempts += 1
        if self.errors:
            raise self.errors.pop(0)
        return "done"


class RecordedSleeps:
    """Stands in for asyncio.sleep so waits are checked without being waited."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


# -- retryable ----------------------------------------------------------------------------


@pytest.mark.parametrize("code", list(grpc.StatusCode), ids=lambda c: c.name)
def test_grpc_errors_are_retryable_exactly_for_the_retryable_codes(code: grpc.StatusCode) -> None:
    assert retryable(rpc_error(code)) is (code in RETRYABLE_CODES)


@pytest.mark.parametrize(
    "exc",
    [
        UnavailableError("registry down"),
        DeadlineExceededError("too slow"),
        ConnectionRefusedError(errno.ECONNREFUSED, "refused"),
        ConnectionResetError("reset"),
        TimeoutError("timed out"),
        OSError(errno.ETIMEDOUT, "timed out"),
        OSError(errno.EHOSTUNREACH, "no route to host"),
        OSError(errno.ENETUNREACH, "network unreachable"),
    ],
    ids=repr,
)
def test_transient_errors_are_retryable(exc: BaseException) -> None:
    assert retryable(exc)


@pytest.mark.parametrize(
    "exc",
    [
        InvalidArgumentError("bad", field="x"),
        NotFoundError("gone"),
        ResourceExhaustedError("quota"),
        CircuitOpenError("registry", 5.0),
        ValueError("bug"),
        FileNotFoundError(errno.ENOENT, "missing"),
        PermissionError(errno.EACCES, "denied"),
        asyncio.CancelledError(),
        KeyboardInterrupt(),
    ],
    ids=repr,
)
def test_permanent_errors_are_not_retryable(exc: BaseException) -> None:
    assert not retryable(exc)


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (redis.exceptions.ConnectionError("refused"), True),
        (redis.exceptions.TimeoutError("slow"), True),
        (redis.exceptions.BusyLoadingError("loading"), True),
        (redis.exceptions.AuthenticationError("bad password"), False),
        (redis.exceptions.ResponseError("WRONGTYPE"), False),
        (nats.errors.NoServersError(), True),
        (nats.errors.ConnectionClosedError(), True),
        (nats.errors.TimeoutError(), True),
        (nats.errors.BadSubjectError(), False),
        (UnavailableError("x"), True),
        (ValueError("bug"), False),
    ],
    ids=repr,
)
def test_infra_retryable_adds_nats_and_redis_connection_errors(
    exc: BaseException, expected: bool
) -> None:
    assert infra_retryable(exc) is expected
    if isinstance(exc, redis.exceptions.RedisError | nats.errors.NoServersError):
        assert not retryable(exc)  # only the infra policy knows the client libraries


# -- policies -------------------------------------------------------------------------------


async def test_rpc_retry_stops_after_its_attempts_and_reraises_the_last_error() -> None:
    sleeps = RecordedSleeps()
    last = rpc_error(grpc.StatusCode.UNAVAILABLE)
    call = FailingCall(UnavailableError("1"), UnavailableError("2"), last, UnavailableError("4"))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await rpc_retry(attempts=3, sleep=sleeps)(call)
    assert info.value is last
    assert call.attempts == 3
    assert len(sleeps.delays) == 2


async def test_a_transient_failure_is_retried_until_success() -> None:
    sleeps = RecordedSleeps()
    call = FailingCall(ConnectionResetError("reset"), rpc_error(grpc.StatusCode.UNAVAILABLE))
    assert await rpc_retry(attempts=5, sleep=sleeps)(call) == "done"
    assert call.attempts == 3


@pytest.mark.parametrize(
    "exc",
    [
        rpc_error(grpc.StatusCode.INVALID_ARGUMENT),
        rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED),
        NotFoundError("gone"),
        CircuitOpenError("compiler", 10.0),
    ],
    ids=repr,
)
async def test_a_permanent_failure_is_raised_after_one_attempt(exc: BaseException) -> None:
    sleeps = RecordedSleeps()
    call = FailingCall(exc)
    with pytest.raises(type(exc)) as info:
        await rpc_retry(attempts=5, sleep=sleeps)(call)
    assert info.value is exc
    assert call.attempts == 1
    assert sleeps.delays == []


async def test_cancellation_is_never_retried() -> None:
    call = FailingCall(asyncio.CancelledError())
    with pytest.raises(asyncio.CancelledError):
        await rpc_retry(attempts=5, sleep=RecordedSleeps())(call)
    assert call.attempts == 1


async def test_waits_follow_the_capped_exponential_bounds() -> None:
    sleeps = RecordedSleeps()
    call = FailingCall(*(UnavailableError(str(i)) for i in range(10)))
    policy = rpc_retry(
        attempts=8,
        initial_s=0.1,
        max_delay_s=1.0,
        max_total_s=1000,
        rng=random.Random(7),
        sleep=sleeps,
    )
    with pytest.raises(UnavailableError):
        await policy(call)
    ceilings = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]
    assert len(sleeps.delays) == len(ceilings)
    for delay, ceiling in zip(sleeps.delays, ceilings, strict=True):
        assert 0 < delay <= ceiling


async def test_no_wait_is_started_that_would_end_past_the_total_bound() -> None:
    call = FailingCall(*(UnavailableError(str(i)) for i in range(1000)))

    async def slow_attempt() -> str:
        # Each attempt takes real time, so the time bound, not the count, stops it.
        await asyncio.sleep(0.005)
        return await call()

    policy = retry_policy(
        "bounded", attempts=1000, initial_s=0.001, max_delay_s=0.002, max_total_s=0.05
    )
    with pytest.raises(UnavailableError):
        await policy(slow_attempt)
    assert 1 < call.attempts < 1000


async def test_the_iterator_form_retries_a_block() -> None:
    call = FailingCall(nats.errors.NoServersError(), redis.exceptions.ConnectionError("x"))
    sleeps = RecordedSleeps()
    result = None
    async for attempt in infra_retry(sleep=sleeps):
        with attempt:
            result = await call()
    assert result == "done"
    assert call.attempts == 3


async def test_each_retry_is_logged_with_the_policy_the_attempt_and_the_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    call = FailingCall(rpc_error(grpc.StatusCode.UNAVAILABLE))
    with caplog.at_level(logging.WARNING, logger="common.retry"):
        await rpc_retry(attempts=3, sleep=RecordedSleeps(), name="registry.Get")(call)
    (record,) = [r for r in caplog.records if r.name == "common.retry"]
    message = record.getMessage()
    assert "registry.Get: attempt 1 of 3 failed" in message
    assert "UNAVAILABLE: UNAVAILABLE from server" in message


def test_policies_are_fresh_tenacity_instances() -> None:
    first, second = rpc_retry(), rpc_retry()
    assert isinstance(first, AsyncRetrying)
    assert first is not second


async def test_infra_retry_tries_more_and_waits_longer_than_rpc_retry() -> None:
    async def attempts_and_waited(
        policy: Callable[..., AsyncRetrying], exc: BaseException
    ) -> tuple[int, float]:
        sleeps = RecordedSleeps()
        call = FailingCall(*(exc for _ in range(100)))
        with pytest.raises(type(exc)):
            await policy(sleep=sleeps, rng=random.Random(1))(call)
        return call.attempts, sum(sleeps.delays)

    rpc = await attempts_and_waited(rpc_retry, UnavailableError("x"))
    infra = await attempts_and_waited(infra_retry, nats.errors.NoServersError())
    assert rpc[0] == 3
    assert infra[0] == 10
    assert infra[1] > rpc[1]


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"attempts": 0}, "attempts"),
        ({"max_total_s": 0}, "max_total_s"),
        ({"initial_s": 0}, "initial_s"),
        ({"initial_s": 5.0, "max_delay_s": 1.0}, "max_s"),
    ],
)
def test_invalid_policy_bounds_are_rejected_when_built(
    kwargs: dict[str, float], problem: str
) -> None:
    with pytest.raises(ValueError, match=problem):
        rpc_retry(**kwargs)  # type: ignore[arg-type]


# -- backoff_delay ----------------------------------------------------------------------------


@pytest.mark.parametrize("attempt", [1, 2, 3, 5, 8, 13, 100, 10_000])
def test_backoff_delay_stays_within_the_capped_exponential_ceiling(attempt: int) -> None:
    initial_s, max_s = 0.5, 30.0
    ceiling = min(max_s, initial_s * 2 ** min(attempt - 1, 100))
    for seed in SEEDS:
        delay = backoff_delay(attempt, initial_s, max_s, random.Random(seed))
        assert 0 < delay <= ceiling, (seed, delay)


def test_full_jitter_spreads_delays_over_the_whole_range() -> None:
    delays = [backoff_delay(4, 0.5, 30.0, random.Random(seed)) for seed in SEEDS]
    ceiling = 4.0
    assert min(delays) < 0.05 * ceiling
    assert max(delays) > 0.95 * ceiling
    assert 0.4 * ceiling < sum(delays) / len(delays) < 0.6 * ceiling


@pytest.mark.parametrize("jitter", [0.0, 0.25, 0.5])
def test_partial_jitter_keeps_a_floor(jitter: float) -> None:
    ceiling = 8.0
    delays = [backoff_delay(5, 0.5, 30.0, random.Random(seed), jitter=jitter) for seed in SEEDS]
    assert all(ceiling * (1 - jitter) <= d <= ceiling for d in delays)
    if jitter == 0.0:
        assert set(delays) == {ceiling}
    else:
        assert max(delays) - min(delays) > 0.9 * jitter * ceiling


def test_backoff_delay_is_reproducible_for_a_seed() -> None:
    run = [backoff_delay(n, 0.1, 5.0, random.Random(42)) for n in range(1, 20)]
    again = [backoff_delay(n, 0.1, 5.0, random.Random(42)) for n in range(1, 20)]
    assert run == again


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        ((0, 0.5, 30.0), "attempt"),
        ((1, 0.0, 30.0), "initial_s"),
        ((1, 0.5, 0.1), "max_s"),
    ],
)
def test_backoff_delay_rejects_bad_arguments(args: tuple[int, float, float], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        backoff_delay(*args)


def test_backoff_delay_rejects_jitter_outside_zero_to_one() -> None:
    with pytest.raises(ValueError, match="jitter"):
        backoff_delay(1, 0.5, 30.0, jitter=1.5)
