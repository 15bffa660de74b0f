"""The NATS error bus: every agent reports its errors here, and publishes its events.

Errors go to `errors.<machine>.<severity>.<agent>` and are stored in the JetStream
stream `ERRORS`; alerts (`alerts.>`) in `ALERTS`. Each error event is one JSON object
with exactly the keys `id timestamp machine agent severity error_type message details
stack_trace trace_id fingerprint`, published with `Nats-Msg-Id` = its id (so a re-sent
event is stored once within the streams' 2-minute duplicate window) and the W3C
`traceparent` of the reporter's OpenTelemetry context, when it had one.

`ErrorBus.report_error` is safe to call from any thread, never blocks and never
raises: it appends a small record to a bounded buffer and, only when the publisher
task sleeps, wakes it. The publisher (on the bus's event loop) turns records into
events, folds repeats of the same error (same fingerprint) into one event per
`collapse_window_s`, and publishes to JetStream with many acks outstanding at once.
While NATS is away, events stay buffered and are re-sent after reconnect.

Choices made here:

- A full buffer drops the NEWEST report, not the oldest: the first errors of an
  incident usually name its cause, and what follows is mostly consequences and
  repeats. Events already handed to NATS but not yet acknowledged are never
  dropped, so a re-send after reconnect stays exactly-once. Drops are counted, and
  once NATS is back one `warning` event of type `ErrorBusOverflow` reports them
  (`details["dropped"]`).
- The first report of an error is published at once; repeats within the window are
  counted and published as one event when the window closes (or on `flush`/`close`):
  the first repeat's message, details and stack, plus `details["count"]`,
  `first_seen` and `last_seen`. A sustained flood becomes one event per window.
  Repeats waiting in a window do not keep their exceptions (whose frames may hold
  anything, tensors included).
- An unknown severity never raises: it is reported as `error`, and the value given
  is kept in `details["invalid_severity"]`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import json
import linecache
import math
import os
import re
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Generic, TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig
from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace

from common.logging import get_logger

__all__ = [
    "ALERTS_STREAM",
    "ERRORS_STREAM",
    "SEVERITIES",
    "STREAM_DUPLICATE_WINDOW_S",
    "STREAM_MAX_AGE_S",
    "STREAM_MAX_MSGS",
    "BusStats",
    "CollapseGuard",
    "Collapsed",
    "ErrorBus",
    "Severity",
    "ensure_streams",
    "error_subject",
    "fingerprint",
    "stream_configs",
]

_log = get_logger(__name__)


# --------------------------------------------------------------------------- subjects


class Severity(StrEnum):
    """How bad an error is; its value is the `<severity>` token of an error subject."""

    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
    CRITICAL = "critical"


SEVERITIES: tuple[str, ...] = tuple(s.value for s in Severity)

# Enum members hash by name, not by value, so both spellings are keys.
_SEVERITY_NAMES: dict[Hashable, str] = {
    **{s: s.value for s in Severity},
    **{v: v for v in SEVERITIES},
}

_BAD_TOKEN_CHARS = re.compile(r"[\s.*>]")


def _check_token(value: str, what: str) -> None:
    if not isinstance(value, str) or not value or _BAD_TOKEN_CHARS.search(value):
        raise ValueError(
            f"{what} {value!r} cannot be a NATS subject token: it must be non-empty and "
            "contain no whitespace, '.', '*' or '>'"
        )


def error_subject(machine: str, severity: Severity | str, agent: str) -> str:
    """`errors.<machine>.<severity>.<agent>`; ValueError for an unknown severity or bad token."""
    sev = _SEVERITY_NAMES.get(severity) if isinstance(severity, Hashable) else None
    if sev is None:
        raise ValueError(f"unknown severity {severity!r}; use one of {', '.join(SEVERITIES)}")
    _check_token(machine, "machine")
    _check_token(agent, "agent")
    return f"errors.{machine}.{sev}.{agent}"


def _check_subject(subject: str) -> None:
    if not isinstance(subject, str) or not subject:
        raise ValueError(f"invalid subject {subject!r}")
    for token in subject.split("."):
        _check_token(token, f"subject {subject!r}: token")


def _subject_matches(filter_subject: str, subject: str) -> bool:
    """NATS wildcard matching: `*` is one token, a final `>` one or more."""
    want = filter_subject.split(".")
    have = subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(want) == len(have)


# --------------------------------------------------------------------------- fingerprints

_UUID_RE = re.compile(r"\b[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}\b")
# `0x...`, or a run of 8+ hex digits with at least one decimal digit (ids, hashes, addresses).
_HEX_RE = re.compile(r"\b0[xX][0-9a-fA-F]+\b|\b(?=[0-9a-fA-F]*\d)[0-9a-fA-F]{8,}\b")
# Numbers not glued to a preceding letter: `step 12`, `12ms`, `cuda:1` vary; `conv2d` does not.
_NUMBER_RE = re.compile(r"(?<![\w.])\d+(?:\.\d+)?")
_FRAME_RE = re.compile(
    r'^  File "(?P<file>[^"\n]*)", line \d+, in (?P<name>[^\n]*)\n(?:    (?P<src>[^\n]*))?',
    re.MULTILINE,
)
_CHAIN_SEPARATORS = (
    "\nThe above exception was the direct cause of the following exception:\n",
    "\nDuring handling of the above exception, another exception occurred:\n",
)


def _normalise_message(message: str) -> str:
    message = _UUID_RE.sub("<uuid>", message)
    message = _HEX_RE.sub("<hex>", message)
    return _NUMBER_RE.sub("<n>", message)


def _frame_key(filename: str, name: str, source: str) -> str:
    # The file's base name, the function and its source line: stable across deployments
    # and across edits elsewhere in the file, unlike a line number.
    return f"{os.path.basename(filename)}:{name}:{source.strip()}"


def _top_frame_from_text(stack_trace: str | None) -> str:
    """The innermost frame of the last exception in a formatted traceback, or ''."""
    if not stack_trace:
        return ""
    start = 0
    for sep in _CHAIN_SEPARATORS:
        at = stack_trace.rfind(sep)
        if at >= 0:
            start = max(start, at + len(sep))
    last = None
    for match in _FRAME_RE.finditer(stack_trace, start):
        last = match
    if last is None:
        return ""
    return _frame_key(last["file"], last["name"], last["src"] or "")


def _top_frame_of(exc: BaseException | None) -> str:
    """Same as `_top_frame_from_text(format_exception(exc))`, without formatting the stack."""
    tb = exc.__traceback__ if exc is not None else None
    if tb is None:
        return ""
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    return _frame_key(
        code.co_filename, code.co_name, linecache.getline(code.co_filename, tb.tb_lineno)
    )


def _fingerprint(agent: str, error_type: str, message: str, top_frame: str) -> str:
    text = "\x1f".join((agent, error_type, _normalise_message(message), top_frame))
    return hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=16).hexdigest()


def fingerprint(agent: str, error_type: str, message: str, stack_trace: str | None) -> str:
    """A stable id for "the same error": 32 hex digits.

    Hashes the agent, the error type, the message with its variable parts (uuids, hex
    ids, numbers) replaced, and the innermost frame of the stack (file name, function,
    source line), so repeats share it while different raise sites do not.
    """
    return _fingerprint(agent, error_type, message, _top_frame_from_text(stack_trace))


# --------------------------------------------------------------------------- collapse guard

T = TypeVar("T")


@dataclass(frozen=True)
class Collapsed(Generic[T]):
    """Repeats of one key folded during one window: `count` items, `first` to `last`."""

    key: str
    first: T
    last: T
    count: int


@dataclass(slots=True)
class _Window(Generic[T]):
    """A window that has folded at least one repeat."""

    ends_at: float
    count: int
    first: T
    last: T


def _ends_at(window: float | _Window[Any]) -> float:
    return window if isinstance(window, float) else window.ends_at


class CollapseGuard(Generic[T]):
    """Lets the first item of a key through and folds its repeats within `window_s`.

    `admit(key, item, at)` is True for an item to publish now: the first of its key,
    or the first after a quiet window. Repeats inside the window return False and are
    counted; when the window closes with repeats, `due()` returns them as one
    `Collapsed` and a new window starts, so a sustained flood yields one per window.
    A window that closes without repeats forgets the key. At most `max_keys` keys are
    tracked; items of further keys are always let through. Pure logic: time comes
    from `clock` (or the `at` given), nothing else.
    """

    def __init__(
        self,
        window_s: float,
        *,
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if window_s < 0:
            raise ValueError(f"window_s must be >= 0, not {window_s}")
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, not {max_keys}")
        self.window_s = float(window_s)
        self.max_keys = max_keys
        self._clock = clock
        # Key -> its window: just the closing time until a repeat comes (most errors
        # never repeat, and a float costs the garbage collector nothing), then a
        # _Window. Insertion order is closing order: a restarted window moves to the end.
        self._windows: dict[str, float | _Window[T]] = {}
        self._ready: list[Collapsed[T]] = []

    def __len__(self) -> int:
        """How many keys have an open window."""
        return len(self._windows)

    def admit(self, key: str, item: T, at: float | None = None) -> bool:
        """True: publish `item` now. False: it was folded into its key's current window."""
        now = self._clock() if at is None else at
        window = self._windows.get(key)
        if window is not None and now >= _ends_at(window):
            self._close(key, window, now)
            window = self._windows.get(key)
        if window is None:
            if self.window_s > 0 and len(self._windows) < self.max_keys:
                self._windows[key] = now + self.window_s
            return True
        if isinstance(window, float):
            self._windows[key] = _Window(ends_at=window, count=1, first=item, last=item)
        else:
            window.count += 1
            window.last = item
        return False

    def due(self, now: float | None = None) -> list[Collapsed[T]]:
        """The folded repeats of every window closed by `now` (oldest first)."""
        now = self._clock() if now is None else now
        while self._windows:
            key, window = next(iter(self._windows.items()))
            if now < _ends_at(window):
                break
            self._close(key, window, now)
        ready, self._ready = self._ready, []
        return ready

    def drain(self) -> list[Collapsed[T]]:
        """Close every window now: all folded repeats, and forget every key."""
        for key, window in self._windows.items():
            if isinstance(window, _Window):
                self._ready.append(_collapsed(key, window))
        self._windows.clear()
        ready, self._ready = self._ready, []
        return ready

    def folded(self, key: str) -> int:
        """How many repeats the key's open window has folded so far."""
        window = self._windows.get(key)
        return window.count if isinstance(window, _Window) else 0

    def next_deadline(self) -> float | None:
        """When the oldest open window closes (clock time), or None without windows."""
        for window in self._windows.values():
            return _ends_at(window)
        return None

    def _close(self, key: str, window: float | _Window[T], now: float) -> None:
        del self._windows[key]
        if isinstance(window, _Window):
            self._ready.append(_collapsed(key, window))
            # Still flooding: keep folding into a fresh window instead of letting the
            # next repeat through on its own.
            self._windows[key] = now + self.window_s


def _collapsed(key: str, window: _Window[T]) -> Collapsed[T]:
    return Collapsed(key=key, first=window.first, last=window.last, count=window.count)


# --------------------------------------------------------------------------- streams

ERRORS_STREAM = "ERRORS"
ALERTS_STREAM = "ALERTS"
STREAM_MAX_AGE_S = 7 * 24 * 3600.0
STREAM_MAX_MSGS = 1_000_000
STREAM_DUPLICATE_WINDOW_S = 120.0


def stream_configs() -> tuple[StreamConfig, ...]:
    """The streams the bus needs: `ERRORS` on `errors.>` and `ALERTS` on `alerts.>`."""
    return tuple(
        StreamConfig(
            name=name,
            subjects=[subject],
            storage=StorageType.FILE,
            max_age=STREAM_MAX_AGE_S,
            max_msgs=STREAM_MAX_MSGS,
            duplicate_window=STREAM_DUPLICATE_WINDOW_S,
        )
        for name, subject in ((ERRORS_STREAM, "errors.>"), (ALERTS_STREAM, "alerts.>"))
    )


def _differences(current: StreamConfig, wanted: StreamConfig) -> list[str]:
    fields = ("subjects", "storage", "max_age", "max_msgs", "duplicate_window")
    return [
        f"{name}={getattr(current, name)!r} (want {getattr(wanted, name)!r})"
        for name in fields
        if getattr(current, name) != getattr(wanted, name)
    ]


async def ensure_streams(js: JetStreamContext) -> None:
    """Create `ERRORS` and `ALERTS`, or bring existing ones to their configuration.

    Idempotent. A stream that exists with other limits is updated in place; what the
    server refuses to change (its storage type, or subjects another stream owns) is
    logged as a warning, never raised. Transport problems (NATS away, JetStream not
    ready) do raise, so the caller can retry.
    """
    for wanted in stream_configs():
        await _ensure_stream(js, wanted)


async def _ensure_stream(js: JetStreamContext, wanted: StreamConfig) -> None:
    assert wanted.name is not None
    try:
        info = await js.stream_info(wanted.name)
    except nats.js.errors.NotFoundError:
        try:
            await js.add_stream(wanted)
            _log.info("stream created", stream=wanted.name)
            return
        except nats.js.errors.BadRequestError as err:
            # Most likely another process created it in between; else its subjects
            # overlap another stream's, which only an operator can sort out.
            _log.debug("stream create refused", stream=wanted.name, error=str(err))
            try:
                info = await js.stream_info(wanted.name)
            except nats.js.errors.NotFoundError:
                _log.warning("stream cannot be created", stream=wanted.name, error=str(err))
                return
    current = info.config
    differences = _differences(current, wanted)
    if not differences:
        return
    update = dataclasses.replace(
        current,
        subjects=wanted.subjects,
        max_age=wanted.max_age,
        max_msgs=wanted.max_msgs,
        duplicate_window=wanted.duplicate_window,
    )
    if current.storage != wanted.storage:
        _log.warning(
            "stream storage cannot be changed in place; keeping it",
            stream=wanted.name,
            storage=str(current.storage),
            wanted=str(wanted.storage),
        )
    try:
        await js.update_stream(update)
    except nats.js.errors.ServiceUnavailableError:
        raise
    except nats.js.errors.APIError as err:
        _log.warning(
            "stream update refused", stream=wanted.name, differences=differences, error=str(err)
        )
        return
    _log.info("stream updated", stream=wanted.name, differences=differences)


# --------------------------------------------------------------------------- serialisation


def _safe_str(value: object) -> str:
    try:
        return str(value)
    except Exception:
        try:
            return repr(value)
        except Exception:
            return f"<unprintable {type(value).__name__}>"


_MAX_DEPTH = 32


def _jsonable(value: object, depth: int = 0) -> object:
    """`value` turned into plain JSON types, whatever it holds (cycles end at a depth limit)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if depth >= _MAX_DEPTH:
        return "<nested too deep>"
    if isinstance(value, Mapping):
        try:
            return {_safe_str(k): _jsonable(v, depth + 1) for k, v in value.items()}
        except Exception:
            return _safe_str(value)
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v, depth + 1) for v in value]
    return _safe_str(value)


# Built once: json.dumps with options builds a new encoder on every call.
_ENCODER = json.JSONEncoder(default=_safe_str, separators=(",", ":"), allow_nan=False)


def _dumps(obj: Mapping[str, Any]) -> bytes:
    """Compact, strict JSON of `obj`; anything it cannot encode becomes a string."""
    try:
        text = _ENCODER.encode(obj)
    except Exception:
        text = _ENCODER.encode(_jsonable(obj))
    return text.encode()


def _format_stack(exc: BaseException) -> str:
    try:
        return "".join(traceback.format_exception(exc))
    except Exception as err:
        return f"<stack trace could not be formatted: {_safe_str(err)}>"


def _iso(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="microseconds")


# --------------------------------------------------------------------------- the bus


@dataclass(frozen=True)
class BusStats:
    """Counters of one ErrorBus since it was made.

    - reported: `report_error` calls.
    - published: events NATS took (JetStream acked, or core-published when no stream
      covers the subject); error events, folded repeats, overflow notices and
      `publish_event` events alike.
    - dropped: events lost: buffer full, or an event that could not be built or was
      refused by the server for good.
    - collapsed: reports folded into another event instead of published on their own.
    - buffered: events waiting for delivery now (reported, not yet acked).
    - reconnects: times the connection came back after being lost.
    - publish_failures: publish attempts that failed or timed out (and were retried).
    """

    reported: int
    published: int
    dropped: int
    collapsed: int
    buffered: int
    reconnects: int
    publish_failures: int


# What report_error hands to the publisher, cheap to build on the caller's thread. It
# goes into the buffer field by field, in this order, and the publisher reads it back
# as this tuple: wall time, clock time, severity, message, error_type, details, exc,
# OpenTelemetry context, and the severity given when it was not a valid one.
_RECORD_FIELDS = 9
_Record = tuple[
    float,
    float,
    str,
    str,
    str | None,
    dict[Any, Any] | None,
    BaseException | None,
    otel_context.Context | None,
    str | None,
]


@dataclass(slots=True)
class _Report:
    """A record after the publisher looked at it: what the collapse guard keys and holds."""

    wall: float
    severity: str
    message: str
    error_type: str
    details: dict[Any, Any] | None
    exc: BaseException | None
    context: otel_context.Context | None
    invalid_severity: str | None
    fingerprint: str
    stack_trace: str | None = None  # formatted early when `exc` is let go of


# One event ready to send: (subject, JSON body, headers as pairs with Nats-Msg-Id first,
# through JetStream: True / core NATS: False / decide by the streams at send time: None).
# A plain tuple of strings and bytes on purpose: the garbage collector stops tracking
# such tuples, so a backlog of buffered events adds nothing to full collections (which
# would otherwise pause every thread, reporting ones included).
_Outgoing = tuple[str, bytes, tuple[tuple[str, str], ...], bool | None]


_ACK_TIMEOUT_S = 5.0
_MAX_IN_FLIGHT = 4096
_PROCESS_BATCH = 256
_SEND_BATCH = 256
_MAX_API_ERRORS = 5
_RETRY_BACKOFF_S = (0.05, 2.0)
_CONNECT_BACKOFF_S = (0.1, 5.0)
_RECONNECT_WAIT_S = 0.5
_CONNECT_TIMEOUT_S = 2.0
_STREAM_REFRESH_S = 30.0
_IDLE_TICK_S = 1.0
_LINGER_S = 0.002


class ErrorBus:
    """The error bus of one agent: `report_error` from anywhere, events, one NATS connection.

    ```
    bus = ErrorBus(nats_url=url, machine="mainpc", agent="trainer")
    await bus.start()                       # returns at once; connects in the background
    bus.report_error("loss is NaN", details={"step": 12}, exc=err)   # any thread
    await bus.publish_event("events.job.j1.done", {"job_id": "j1"})
    await bus.close()
    ```

    `start`, `publish_event`, `flush` and `close` run on one event loop (the bus's);
    `report_error` may be called from any thread, before or after `start`.
    """

    def __init__(
        self,
        *,
        nats_url: str,
        machine: str,
        agent: str,
        buffer_size: int = 10_000,
        collapse_window_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, not {buffer_size}")
        self._subjects = {sev: error_subject(machine, sev, agent) for sev in SEVERITIES}
        self.nats_url = nats_url
        self.machine = machine
        self.agent = agent
        self.buffer_size = buffer_size
        self._clock = clock
        self._guard: CollapseGuard[_Report] = CollapseGuard(
            collapse_window_s, max_keys=buffer_size, clock=clock
        )
        self._overflow_interval_s = max(collapse_window_s, 1.0)

        # Every counter has one writer. Reporting threads write theirs under `_lock`,
        # which only they take (never across I/O); the event loop writes its own
        # without it, so the publisher never makes a reporter wait on a lock.
        # Events waiting for delivery: _accepted + _added - _released.
        self._lock = threading.Lock()
        self._inbox: collections.deque[Any] = collections.deque()  # records, field by field
        self._reported = 0
        self._accepted = 0
        self._caller_drops = 0
        self._closed = False
        # True while the publisher waits: only then does a report pay for a wake-up.
        self._idle = False
        self._added = 0  # events the loop queued itself: folded repeats, notices, events
        self._released = 0  # events delivered, folded into another, or given up
        self._loop_drops = 0
        self._drops_reported = 0
        # Counted by the publisher, off the reporting threads' path (Prometheus: floods).
        self._reported_metric = metrics.get_meter("graftmesh.bus").create_counter(
            "graftmesh_errors_reported", description="Errors reported to the bus, by severity"
        )

        # Event-loop side only.
        self._outbox: collections.deque[_Outgoing] = collections.deque()
        self._in_flight: dict[str, tuple[_Outgoing, float]] = {}
        self._api_errors: dict[str, int] = {}  # Nats-Msg-Id -> refusals so far
        self._published = 0
        self._collapsed = 0
        self._reconnects = 0
        self._publish_failures = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._wake: asyncio.Event | None = None
        self._progress: asyncio.Event | None = None
        self._setup_needed: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._ready = False
        self._ack_prefix = ""
        self._ack_seq = 0
        self._stream_subjects: list[str] = []
        self._flush_requested = False
        self._took_records = False
        self._retry_at = 0.0
        self._retry_backoff_s = _RETRY_BACKOFF_S[0]
        self._last_overflow_at = -math.inf

    # ----------------------------------------------------------------- public surface

    @property
    def stats(self) -> BusStats:
        """A snapshot of the counters (see BusStats)."""
        with self._lock:
            reported, dropped = self._reported, self._caller_drops
        return BusStats(
            reported=reported,
            published=self._published,
            dropped=dropped + self._loop_drops,
            collapsed=self._collapsed,
            buffered=self._pending(),
            reconnects=self._reconnects,
            publish_failures=self._publish_failures,
        )

    @property
    def connected(self) -> bool:
        """Whether the bus is connected and its streams are in place (events flow)."""
        return self._ready and self._nc is not None and self._nc.is_connected

    @property
    def nc(self) -> Client | None:
        """The bus's NATS connection, for other components to share; None before the first
        connect and after `close`."""
        return self._nc

    @property
    def js(self) -> JetStreamContext | None:
        """JetStream on the bus's connection; None when `nc` is."""
        return self._js

    async def start(self) -> None:
        """Start connecting and publishing in the background, and return at once.

        Never raises because NATS is down: connecting is retried with backoff, and
        reports wait in the buffer meanwhile.
        """
        if self._tasks or self._closed:
            return
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()
        self._setup_needed = asyncio.Event()
        self._tasks = [
            asyncio.create_task(self._publish_loop(), name=f"error-bus-publisher:{self.agent}"),
            asyncio.create_task(self._connection_loop(), name=f"error-bus-connection:{self.agent}"),
        ]

    def report_error(
        self,
        message: str,
        *,
        severity: Severity | str = "error",
        error_type: str | None = None,
        details: Mapping[str, Any] | None = None,
        exc: BaseException | None = None,
    ) -> None:
        """Report an error. From any thread; never blocks, never raises.

        `error_type` defaults to the exception's class name (else "Error"); the stack
        trace comes from `exc`. `details` is copied now and serialised later (anything
        not JSON becomes its `str`). An unknown severity is reported as "error".
        """
        try:
            try:
                sev = _SEVERITY_NAMES.get(severity)
            except TypeError:  # unhashable
                sev = None
            invalid = None
            if sev is None:
                sev, invalid = _coerce_severity(severity)
            if type(message) is not str:
                message = _safe_str(message)
            copied = None
            if details is not None:
                try:
                    copied = dict(details)
                except Exception as err:
                    copied = {"details_error": f"could not copy details: {_safe_str(err)}"}
            wall, at = time.time(), self._clock()
            context = otel_context.get_current() or None  # None outside any span
            with self._lock:
                self._reported += 1
                if self._closed or self._pending() >= self.buffer_size:
                    self._caller_drops += 1
                    return
                self._accepted += 1
                # The record's fields go in one by one (see _RECORD_FIELDS): a tuple
                # per report would be an allocation the garbage collector tracks, and
                # enough of those make this thread run full collections itself.
                append = self._inbox.append
                append(wall)
                append(at)
                append(sev)
                append(message)
                append(error_type)
                append(copied)
                append(exc)
                append(context)
                append(invalid)
            if self._idle:
                self._idle = False
                self._wake_publisher()
        except Exception:
            # The bus must never become the caller's problem; the loss is counted.
            with contextlib.suppress(Exception), self._lock:
                self._reported += 1
                self._caller_drops += 1

    async def publish_event(self, subject: str, payload: Mapping[str, Any]) -> None:
        """Publish an event or alert (e.g. `events.job.<id>.done`, `alerts.<sev>.<agent>`).

        Best-effort with the same buffering as errors: returns once queued. A stream
        covering the subject gets it through JetStream (`Nats-Msg-Id` = `payload["id"]`
        when it is a string), any other subject through core NATS. Raises ValueError
        for an invalid subject only.
        """
        _check_subject(subject)
        msg_id = payload.get("id")
        headers = {"Nats-Msg-Id": msg_id if isinstance(msg_id, str) else uuid.uuid4().hex}
        propagate.inject(headers)
        out: _Outgoing = (subject, _dumps(payload), tuple(headers.items()), None)
        if self._closed or self._pending() >= self.buffer_size:
            self._loop_drops += 1
            return
        self._added += 1
        self._outbox.append(out)
        if self._wake is not None:
            self._wake.set()

    async def flush(self, timeout_s: float = 5.0) -> None:
        """Wait until everything reported so far is delivered, folded repeats included.

        Raises TimeoutError (saying how many events are left) after `timeout_s`.
        """
        if self._wake is None or self._progress is None:
            raise TimeoutError("the error bus was not started; nothing can be delivered")
        self._flush_requested = True
        self._wake.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._flush_requested or self._pending() > 0:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(
                    f"error bus: {self._pending()} event(s) still undelivered after {timeout_s:g} s"
                    f" ({'connected' if self.connected else 'not connected'} to NATS)"
                )
            self._progress.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._progress.wait()

    async def close(self, timeout_s: float = 5.0) -> None:
        """Deliver what can be delivered within `timeout_s`, then close the connection.

        Never raises; reports made after this are dropped (and counted).
        """
        if self._closed:
            return
        if self._tasks:
            try:
                await self.flush(timeout_s)
            except TimeoutError as err:
                _log.warning("error bus closing with undelivered events", reason=str(err))
        with self._lock:
            self._closed = True
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        if tasks:
            # Bounded: nats-py can swallow a cancellation that lands inside connect(),
            # and close() must never hang the agent's shutdown.
            await asyncio.wait(tasks, timeout=2.0)
        nc, self._nc, self._js = self._nc, None, None
        self._ready = False
        if nc is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await nc.close()

    def _pending(self) -> int:
        """Events reported or queued and not yet delivered, folded or given up."""
        return self._accepted + self._added - self._released

    # ----------------------------------------------------------------- waking

    def _wake_publisher(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is None or wake is None:
            return  # not started: start() picks the buffer up
        if threading.get_ident() == self._loop_thread:
            wake.set()
            return
        # The one syscall of a report, paid only when the publisher sleeps.
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to wake
            loop.call_soon_threadsafe(wake.set)

    # ----------------------------------------------------------------- connection

    async def _connection_loop(self) -> None:
        assert self._setup_needed is not None
        delay = _CONNECT_BACKOFF_S[0]
        while self._nc is None:
            try:
                self._nc = await self._connect()
            except asyncio.CancelledError:
                raise
            except Exception as err:
                _log.debug("nats connect failed; retrying", error=repr(err), retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _CONNECT_BACKOFF_S[1])
        _log.info("error bus connected", agent=self.agent)
        self._setup_needed.set()
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_STREAM_REFRESH_S):
                    await self._setup_needed.wait()
            self._setup_needed.clear()
            await self._set_up()

    async def _connect(self) -> Client:
        nc = await nats.connect(
            self.nats_url,
            name=f"graftmesh-bus-{self.agent}",
            connect_timeout=_CONNECT_TIMEOUT_S,
            # The first connect gives up quickly (nats-py would otherwise retry forever
            # inside connect); this loop backs off instead. Once connected, reconnect
            # forever: the options are read at reconnect time.
            max_reconnect_attempts=1,
            reconnect_time_wait=0,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
            error_cb=self._on_nats_error,
        )
        nc.options["max_reconnect_attempts"] = -1
        nc.options["reconnect_time_wait"] = _RECONNECT_WAIT_S
        self._js = nc.jetstream()
        self._ack_prefix = f"{nc.new_inbox()}."
        await nc.subscribe(f"{self._ack_prefix}*", cb=self._on_ack)
        return nc

    async def _set_up(self) -> None:
        """Streams in place and the stream list known; retried until done or disconnected."""
        nc, js = self._nc, self._js
        assert nc is not None and js is not None
        delay = _CONNECT_BACKOFF_S[0]
        warned = False
        while nc.is_connected:
            try:
                if not self._ready:
                    await ensure_streams(js)
                self._stream_subjects = [
                    subject
                    for info in await js.streams_info()
                    for subject in info.config.subjects or ()
                ]
            except asyncio.CancelledError:
                raise
            except Exception as err:
                # Said once loudly: events wait in the buffer until this succeeds.
                log = _log.debug if warned else _log.warning
                log("error bus cannot set up its streams; retrying", error=repr(err))
                warned = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, _CONNECT_BACKOFF_S[1])
                continue
            if not self._ready:
                self._ready = True
                self._retry_at = 0.0
                if self._wake is not None:
                    self._wake.set()
            return

    async def _on_disconnected(self) -> None:
        if self._ready:
            _log.warning("error bus lost NATS; buffering", agent=self.agent)
        self._ready = False
        self._requeue_in_flight()

    async def _on_reconnected(self) -> None:
        self._reconnects += 1
        _log.info("error bus reconnected", agent=self.agent)
        # Acks of what was sent on the old connection are lost; re-send it all (the
        # server drops what it already stored, by Nats-Msg-Id).
        self._requeue_in_flight()
        if self._setup_needed is not None:
            self._setup_needed.set()

    async def _on_nats_error(self, err: Exception) -> None:
        _log.debug("nats client error", error=repr(err))

    def _requeue_in_flight(self) -> None:
        if self._in_flight:
            self._publish_failures += len(self._in_flight)
            self._outbox.extendleft(reversed([out for out, _ in self._in_flight.values()]))
            self._in_flight.clear()

    # ----------------------------------------------------------------- acks

    async def _on_ack(self, msg: Msg) -> None:
        entry = self._in_flight.pop(msg.subject[len(self._ack_prefix) :], None)
        if entry is None:
            return  # the ack of a send already given up on and re-sent
        out = entry[0]
        error = _ack_error(msg)
        if error is None:
            if self._api_errors:
                self._api_errors.pop(out[2][0][1], None)
            self._delivered()
        else:
            self._publish_failed(out, error)
        if self._idle and self._wake is not None and len(self._in_flight) < _MAX_IN_FLIGHT // 2:
            self._wake.set()

    def _delivered(self) -> None:
        self._published += 1
        self._retry_backoff_s = _RETRY_BACKOFF_S[0]
        self._released += 1
        if self._progress is not None and self._pending() == 0:
            self._progress.set()

    def _publish_failed(self, out: _Outgoing, error: str) -> None:
        self._publish_failures += 1
        transient = error in ("no responders", "503")
        msg_id = out[2][0][1]
        refusals = 0 if transient else self._api_errors.get(msg_id, 0) + 1
        if refusals < _MAX_API_ERRORS:
            if refusals:
                self._api_errors[msg_id] = refusals
            self._outbox.appendleft(out)
            now = time.monotonic()
            if self._retry_at <= now:
                self._retry_at = now + self._retry_backoff_s
                self._retry_backoff_s = min(self._retry_backoff_s * 2, _RETRY_BACKOFF_S[1])
            if error in ("no responders", "503") and self._setup_needed is not None:
                # The stream may be gone (a server restarted without its store).
                self._ready = False
                self._setup_needed.set()
            _log.debug("publish failed; will retry", subject=out[0], error=error)
        else:
            self._api_errors.pop(msg_id, None)
            _log.warning("event refused by NATS; dropped", subject=out[0], error=error)
            self._released += 1
            self._loop_drops += 1

    # ----------------------------------------------------------------- publisher

    async def _publish_loop(self) -> None:
        assert self._wake is not None and self._progress is not None
        while True:
            try:
                busy = await self._publish_step()
            except asyncio.CancelledError:
                raise
            except Exception:
                _log.exception("error bus publisher step failed")
                busy = False
            self._progress.set()
            if busy:
                await asyncio.sleep(0)  # let acks and other tasks in
                continue
            if self._took_records:
                # Reports are flowing: look again shortly rather than sleep until woken.
                # A wake-up costs the reporting thread a syscall and two GIL hand-offs,
                # which a stream of reports would otherwise pay again and again.
                self._took_records = False
                await asyncio.sleep(_LINGER_S)
                continue
            self._wake.clear()
            self._idle = True
            if self._has_records():  # a report landed before it could see us idle
                self._idle = False
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._wait_s()):
                    await self._wake.wait()
            self._idle = False

    async def _publish_step(self) -> bool:
        """One round: records to events, due repeats, sends. True when more is ready now."""
        flushing = self._flush_requested
        self._process_inbox(len(self._inbox) // _RECORD_FIELDS if flushing else _PROCESS_BATCH)
        # The guard runs on the bus's clock; transport timing on the monotonic one.
        for collapsed in self._guard.drain() if flushing else self._guard.due():
            self._enqueue_collapsed(collapsed)
        now = time.monotonic()
        if (
            self.connected
            and self._caller_drops + self._loop_drops > self._drops_reported
            and (flushing or now - self._last_overflow_at >= self._overflow_interval_s)
        ):
            self._enqueue_overflow(now)
        if flushing:
            self._flush_requested = False
        if not self.connected:
            return False
        self._expire_in_flight(now)
        if now < self._retry_at:
            return self._has_records()
        await self._send(_SEND_BATCH)
        can_send = bool(self._outbox) and len(self._in_flight) < _MAX_IN_FLIGHT
        return self._has_records() or can_send

    def _wait_s(self) -> float:
        wait = _IDLE_TICK_S
        deadline = self._guard.next_deadline()
        if deadline is not None:
            wait = min(wait, deadline - self._clock())
        now = time.monotonic()
        if self._in_flight:
            oldest = next(iter(self._in_flight.values()))[1]
            wait = min(wait, oldest + _ACK_TIMEOUT_S - now)
        if self._outbox and self._retry_at > now:
            wait = min(wait, self._retry_at - now)
        return max(wait, 0.001)

    def _has_records(self) -> bool:
        return len(self._inbox) >= _RECORD_FIELDS

    def _process_inbox(self, limit: int) -> None:
        inbox = self._inbox
        # Whole records only: reporters append under their lock, so fields of a record
        # are contiguous, and a record counts once its last field is in.
        available = len(inbox) // _RECORD_FIELDS
        if available:
            self._took_records = True
        pop = inbox.popleft
        for _ in range(min(limit, available)):
            record: _Record = (pop(), pop(), pop(), pop(), pop(), pop(), pop(), pop(), pop())
            self._reported_metric.add(1, {"severity": str(record[2])})
            try:
                report = self._report_of(record)
                if self._guard.admit(report.fingerprint, report, record[1]):
                    self._outbox.append(self._error_event(report))
                    continue
                self._collapsed += 1
                # A folded report may wait a whole window: it must not keep its
                # exception, whose frames can hold anything (a training step's tensors).
                # The first repeat is the window's sample, so its stack is kept as text.
                if report.exc is not None:
                    if self._guard.folded(report.fingerprint) == 1:
                        report.stack_trace = _format_stack(report.exc)
                    report.exc = None
            except Exception:
                _log.exception("error bus could not build an event; dropped")
                self._loop_drops += 1
            self._released += 1

    def _report_of(self, record: _Record) -> _Report:
        wall, _, sev, message, error_type, details, exc, ctx, invalid = record
        if error_type is None:
            error_type = type(exc).__name__ if exc is not None else "Error"
        elif type(error_type) is not str:
            error_type = _safe_str(error_type)
        return _Report(
            wall=wall,
            severity=sev,
            message=message,
            error_type=error_type,
            details=details,
            exc=exc,
            context=ctx,
            invalid_severity=invalid,
            fingerprint=_fingerprint(self.agent, error_type, message, _top_frame_of(exc)),
        )

    def _error_event(
        self,
        report: _Report,
        extra: Mapping[str, Any] | None = None,
        wall: float | None = None,
    ) -> _Outgoing:
        event_id = uuid.uuid4().hex
        headers = {"Nats-Msg-Id": event_id}
        trace_id = None
        if report.context:
            span = trace.get_current_span(report.context).get_span_context()
            if span.is_valid:
                trace_id = format(span.trace_id, "032x")
                propagate.inject(headers, context=report.context)
        details: dict[Any, Any] = dict(report.details) if report.details else {}
        if report.invalid_severity is not None:
            details["invalid_severity"] = report.invalid_severity
        if extra:
            details.update(extra)
        stack_trace = report.stack_trace
        if report.exc is not None:
            stack_trace = _format_stack(report.exc)
        event = {
            "id": event_id,
            "timestamp": _iso(wall if wall is not None else report.wall),
            "machine": self.machine,
            "agent": self.agent,
            "severity": report.severity,
            "error_type": report.error_type,
            "message": report.message,
            "details": details,
            "stack_trace": stack_trace,
            "trace_id": trace_id,
            "fingerprint": report.fingerprint,
        }
        return (self._subjects[report.severity], _dumps(event), tuple(headers.items()), True)

    def _enqueue_collapsed(self, collapsed: Collapsed[_Report]) -> None:
        try:
            out = self._error_event(
                collapsed.first,
                {
                    "count": collapsed.count,
                    "first_seen": _iso(collapsed.first.wall),
                    "last_seen": _iso(collapsed.last.wall),
                },
                wall=collapsed.last.wall,
            )
        except Exception:
            _log.exception("error bus could not build a collapsed event; dropped")
            out = None
        if out is None or self._pending() >= self.buffer_size:
            self._loop_drops += 1
            return
        self._added += 1
        self._outbox.append(out)

    def _enqueue_overflow(self, now: float) -> None:
        dropped = self._caller_drops + self._loop_drops - self._drops_reported
        self._drops_reported += dropped
        # Bookkeeping about the buffer must not itself be refused by the buffer.
        self._added += 1
        self._last_overflow_at = now
        message = f"error bus buffer full ({self.buffer_size} events): dropped {dropped} event(s)"
        report = _Report(
            wall=time.time(),
            severity=Severity.WARNING.value,
            message=message,
            error_type="ErrorBusOverflow",
            details={"dropped": dropped},
            exc=None,
            context=None,
            invalid_severity=None,
            fingerprint=_fingerprint(self.agent, "ErrorBusOverflow", message, ""),
        )
        self._outbox.append(self._error_event(report))
        _log.warning("error bus dropped events", dropped=dropped)

    def _expire_in_flight(self, now: float) -> None:
        in_flight = self._in_flight
        expired: list[_Outgoing] = []
        while in_flight:
            token, (out, sent_at) = next(iter(in_flight.items()))
            if now - sent_at < _ACK_TIMEOUT_S:
                break
            del in_flight[token]
            expired.append(out)
        if expired:
            self._publish_failures += len(expired)
            self._outbox.extendleft(reversed(expired))
            _log.debug("acks timed out; re-sending", count=len(expired))

    async def _send(self, limit: int) -> None:
        nc = self._nc
        assert nc is not None
        outbox, in_flight = self._outbox, self._in_flight
        sent = 0
        while outbox and sent < limit and len(in_flight) < _MAX_IN_FLIGHT and nc.is_connected:
            out = outbox.popleft()
            subject, data, headers, jetstream = out
            if jetstream is None:
                jetstream = any(_subject_matches(f, subject) for f in self._stream_subjects)
                out = (subject, data, headers, jetstream)
            try:
                if jetstream:
                    self._ack_seq += 1
                    token = str(self._ack_seq)
                    await nc.publish(
                        subject, data, reply=self._ack_prefix + token, headers=dict(headers)
                    )
                    in_flight[token] = (out, time.monotonic())
                else:
                    await nc.publish(subject, data, headers=dict(headers))
                    self._delivered()
            except (nats.errors.MaxPayloadError, nats.errors.BadSubjectError, ValueError) as err:
                _log.warning("event cannot be sent; dropped", subject=subject, error=repr(err))
                self._released += 1
                self._loop_drops += 1
            except Exception as err:
                # Connection trouble: keep the event, the callbacks take it from here.
                outbox.appendleft(out)
                self._publish_failures += 1
                _log.debug("publish failed; keeping the event", error=repr(err))
                return
            sent += 1


def _coerce_severity(severity: object) -> tuple[str, str | None]:
    if isinstance(severity, str):
        name = severity.strip().lower()
        if name in SEVERITIES:
            return name, None
    return Severity.ERROR.value, _safe_str(severity)[:100]


def _ack_error(msg: Msg) -> str | None:
    """None for a JetStream ack, else why the publish failed."""
    if msg.headers and msg.headers.get("Status"):
        status = msg.headers["Status"]
        return "no responders" if status == "503" else f"status {status}"
    data = msg.data
    if b'"error"' not in data:
        return None
    try:
        body = json.loads(data)
    except ValueError:
        return "unreadable ack"
    error = body.get("error") if isinstance(body, dict) else None
    if error is None:
        return None
    code = error.get("code") if isinstance(error, dict) else None
    return "503" if code == 503 else _safe_str(error)
