"""The mesh's retry policies, in one place: exponential backoff with jitter, bounded twice.

Every policy stops after `attempts` attempts and never starts a wait that would
end past `max_total_s` from the first attempt; each wait is drawn by
`backoff_delay` (full jitter, capped at `max_delay_s`). The last error is
re-raised unchanged, never wrapped in `tenacity.RetryError`. Each retry is
logged (WARNING) on this module's logger.

A policy is a fresh `tenacity.AsyncRetrying`; ask for a new one per operation,
since tenacity keeps per-run state on the instance:

    result = await rpc_retry()(stub.Compile, request, timeout=5.0)

    async for attempt in infra_retry():
        with attempt:
            await nats.connect(url)

Give each attempt its own deadline (gRPC `timeout=`, `asyncio.timeout`): the
policy bounds the waits between attempts, not a hung attempt.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random
from collections.abc import Awaitable, Callable

import grpc
import nats.errors
import redis.exceptions
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception
from tenacity.stop import stop_after_attempt, stop_any, stop_before_delay
from tenacity.wait import wait_base

from common.breaker import CircuitOpenError
from common.errors import RETRYABLE_CODES, DeadlineExceededError, UnavailableError

__all__ = [
    "backoff_delay",
    "infra_retry",
    "infra_retryable",
    "retry_policy",
    "retryable",
    "rpc_retry",
]

_log = logging.getLogger(__name__)

# The largest exponent backoff_delay uses: 2**64 times any sane initial delay is
# past any cap, and it keeps the float arithmetic finite.
_MAX_EXPONENT = 64

# Transient network conditions that the OS reports as plain OSError.
_TRANSIENT_ERRNOS = frozenset(
    {errno.ETIMEDOUT, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN}
)

_INFRA_TRANSIENT: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    nats.errors.NoServersError,
    nats.errors.ConnectionClosedError,
    nats.errors.StaleConnectionError,
    nats.errors.ConnectionReconnectingError,
)
# Subclasses of the above that retrying cannot fix.
_INFRA_PERMANENT: tuple[type[BaseException], ...] = (
    redis.exceptions.AuthenticationError,
    redis.exceptions.AuthorizationError,
)


def retryable(exc: BaseException) -> bool:
    """Whether another attempt of the same call may succeed.

    True for `UnavailableError` and `DeadlineExceededError`, `ConnectionError`,
    `TimeoutError` and OSErrors of transient network conditions (unreachable
    network or host), and gRPC errors whose code is in
    `common.errors.RETRYABLE_CODES`. False for everything else, and for
    `CircuitOpenError`: a breaker rejects so that callers back off, and retrying
    into it defeats that.
    """
    if isinstance(exc, CircuitOpenError):
        return False
    if isinstance(exc, UnavailableError | DeadlineExceededError | ConnectionError | TimeoutError):
        return True
    if isinstance(exc, grpc.RpcError):
        code = getattr(exc, "code", None)
        return callable(code) and code() in RETRYABLE_CODES
    if isinstance(exc, OSError):
        return exc.errno in _TRANSIENT_ERRNOS
    return False


def infra_retryable(exc: BaseException) -> bool:
    """`retryable`, plus the NATS and Redis client errors of a lost or refused connection.

    Authentication and authorization failures are not retryable.
    """
    if isinstance(exc, _INFRA_PERMANENT):
        return False
    return isinstance(exc, _INFRA_TRANSIENT) or retryable(exc)


def backoff_delay(
    attempt: int,
    initial_s: float,
    max_s: float,
    rng: random.Random | None = None,
    *,
    jitter: float = 1.0,
) -> float:
    """The wait before retry number `attempt` (1 for the first retry), in seconds.

    The ceiling grows exponentially, `initial_s * 2 ** (attempt - 1)`, capped at
    `max_s`. `jitter` is the fraction of the ceiling that is random: the delay
    is uniform in `(ceiling * (1 - jitter), ceiling]`. The default, 1.0, is
    full jitter, which spreads the retries of many clients best; 0.0 gives the
    bare exponential. `rng` defaults to the `random` module's generator.
    """
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1, got {attempt}")
    if not initial_s > 0:
        raise ValueError(f"initial_s must be > 0, got {initial_s}")
    if max_s < initial_s:
        raise ValueError(f"max_s ({max_s}) must be >= initial_s ({initial_s})")
    if not 0.0 <= jitter <= 1.0:
        raise ValueError(f"jitter must be in [0, 1], got {jitter}")
    ceiling = min(max_s, initial_s * 2.0 ** min(attempt - 1, _MAX_EXPONENT))
    u = (rng or random).random()  # [0, 1)
    return ceiling * (1.0 - jitter * u)


class _JitteredBackoff(wait_base):
    def __init__(self, initial_s: float, max_s: float, rng: random.Random | None) -> None:
        backoff_delay(1, initial_s, max_s, rng)  # rejects bad bounds when the policy is built
        self._initial_s = initial_s
        self._max_s = max_s
        self._rng = rng

    def __call__(self, retry_state: RetryCallState) -> float:
        return backoff_delay(retry_state.attempt_number, self._initial_s, self._max_s, self._rng)


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "no exception"
    if isinstance(exc, grpc.RpcError) and callable(getattr(exc, "code", None)):
        details = exc.details() if callable(getattr(exc, "details", None)) else ""
        return f"{type(exc).__name__} {exc.code().name}: {details}"
    return f"{type(exc).__name__}: {exc}"


def retry_policy(
    name: str,
    *,
    attempts: int,
    initial_s: float,
    max_delay_s: float,
    max_total_s: float,
    retry_if: Callable[[BaseException], bool] = retryable,
    rng: random.Random | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> AsyncRetrying:
    """A policy: up to `attempts` attempts while `retry_if(exc)` holds, full-jitter waits
    from `initial_s` doubling up to `max_delay_s`, no wait ending past `max_total_s`.

    `name` appears in the retry log lines. `rng` and `sleep` are there for
    tests and reproducible runs.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    if not max_total_s > 0:
        raise ValueError(f"max_total_s must be > 0, got {max_total_s}")

    def log_retry(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        _log.warning(
            "%s: attempt %d of %d failed (%s); retrying in %.3fs",
            name,
            state.attempt_number,
            attempts,
            _describe(exc),
            state.upcoming_sleep,
        )

    return AsyncRetrying(
        sleep=sleep,
        stop=stop_any(stop_after_attempt(attempts), stop_before_delay(max_total_s)),
        wait=_JitteredBackoff(initial_s, max_delay_s, rng),
        retry=retry_if_exception(retry_if),
        before_sleep=log_retry,
        reraise=True,
        name=name,
    )


def rpc_retry(
    *,
    attempts: int = 3,
    initial_s: float = 0.1,
    max_delay_s: float = 2.0,
    max_total_s: float = 10.0,
    retry_if: Callable[[BaseException], bool] = retryable,
    rng: random.Random | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    name: str = "rpc",
) -> AsyncRetrying:
    """The policy for one gRPC call to another agent: few attempts, short waits."""
    return retry_policy(
        name,
        attempts=attempts,
        initial_s=initial_s,
        max_delay_s=max_delay_s,
        max_total_s=max_total_s,
        retry_if=retry_if,
        rng=rng,
        sleep=sleep,
    )


def infra_retry(
    *,
    attempts: int = 10,
    initial_s: float = 0.5,
    max_delay_s: float = 10.0,
    max_total_s: float = 60.0,
    retry_if: Callable[[BaseException], bool] = infra_retryable,
    rng: random.Random | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    name: str = "infra",
) -> AsyncRetrying:
    """The policy for (re)connecting to NATS or Redis: more attempts, longer waits, and
    the NATS and Redis connection errors count as retryable (`infra_retryable`)."""
    return retry_policy(
        name,
        attempts=attempts,
        initial_s=initial_s,
        max_delay_s=max_delay_s,
        max_total_s=max_total_s,
        retry_if=retry_if,
        rng=rng,
        sleep=sleep,
    )
