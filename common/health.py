"""The ZMQ health check every agent answers and the supervisor sweeps.

Wire protocol (ARCHITECTURE.md, "Health check (ZMQ)"): the agent answers REQ
clients on `tcp://<host>:<health_check_port>`; the request is the JSON object
`{"action": "health_check"}` and the reply is the JSON object
`{"status", "service", "timestamp", "issues", "details"}` with `status` one of
`ok | healthy | degraded | unhealthy`. Any other request is answered with
`{"status": "error", "error": "<why>"}`.

The socket is REP on the wire but a ROUTER inside: the responder handles REP's
envelope itself (routing id, the client's envelope up to the empty frame, then
the one request frame), so no REQ or DEALER client can tell the difference.
libzmq's REP keeps hidden state between a request and its reply. After a
malformed message from a peer that has already disconnected (raw non-ZMQ bytes
sent to the port will do it), REP drops the reply to the next good request
without a word: in our tests this happened in about half the runs of that
sequence. A ROUTER has no such state to lose, and it can never be left waiting
to send.

Agent side: `HealthState` holds what the agent wants to report and
`HealthResponder` serves it from a thread of its own.

Supervisor side: `HealthClient` (asyncio) checks one agent or sweeps many at
once, and folds every reply, or the lack of one, into a `HealthResult` whose
`status` is a `HealthStatus`.

Latency while the agent is busy. The responder thread never waits on agent
code or on a lock the agent holds, but it still needs the GIL to run. When the
agent's main thread spins in pure Python, the responder wakes on a request in
libzmq (GIL released), then waits for the main thread to hand the GIL over,
which CPython forces after its switch interval (5 ms by default,
`sys.getswitchinterval()`). Measured on 2 cores with a busy main thread: p50
about 5 ms, p99 about 10 ms, well inside the 50 ms budget. This module leaves
the switch interval alone: it is process-wide. The responder cannot answer
while the main thread sits in one C call that keeps the GIL (a long
`sum(range(10**9))`, a regex over a huge string). Native libraries that do
heavy work (torch, numpy, zlib, file and socket I/O) release the GIL while
they work.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal, cast, get_args

import zmq

from common.errors import FailedPreconditionError

__all__ = [
    "MAX_REQUEST_BYTES",
    "HealthBindError",
    "HealthClient",
    "HealthResponder",
    "HealthResult",
    "HealthState",
    "HealthStatus",
    "ReportedStatus",
    "check_health",
    "classify_reply",
]

_log = logging.getLogger(__name__)

ReportedStatus = Literal["ok", "healthy", "degraded", "unhealthy"]
_REPORTED_STATUSES: frozenset[str] = frozenset(get_args(ReportedStatus))

MAX_REQUEST_BYTES = 64 * 1024
"""Largest request frame the responder accepts; libzmq drops the sender of a larger one."""

# Replies carry `details`, which can be larger than a request, but a health
# reply is never megabytes: a peer that sends one is not a health responder.
_MAX_REPLY_BYTES = 1024 * 1024

_REQUEST = b'{"action": "health_check"}'
_CANONICAL_REQUESTS = frozenset({_REQUEST, b'{"action":"health_check"}'})

# Plain ints: the zmq constants are enums, and enum arithmetic costs
# microseconds on a path whose whole budget is tens of them.
_NOBLOCK = int(zmq.NOBLOCK)
_RCVMORE = int(zmq.RCVMORE)
_SNDMORE = int(zmq.SNDMORE)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_POLLOUT = int(zmq.POLLOUT)

# The responder's blocking receive gives up this often even with no traffic,
# only as a backstop: stop() wakes it at once through an inproc endpoint.
_IDLE_WAKE_MS = 1000


class HealthStatus(StrEnum):
    """What a health check found, as the supervisor acts on it."""

    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"
    UNREACHABLE = "unreachable"


class HealthBindError(FailedPreconditionError):
    """The responder could not bind its endpoint (most often: the port is taken)."""

    def __init__(self, message: str, endpoint: str, port: str) -> None:
        self.endpoint = endpoint
        self.port = port
        super().__init__(message)


class _UtcClock:
    """ISO 8601 UTC timestamps to the millisecond (`2025-01-31T12:00:00.123+00:00`).

    The text of the current second is cached: this runs on every health reply,
    and `datetime.isoformat` costs about three times as much.
    """

    __slots__ = ("_second",)

    def __init__(self) -> None:
        self._second: tuple[int, str] = (-1, "")  # swapped whole: safe across threads

    def now(self) -> str:
        now = time.time()
        whole = int(now)
        second = self._second
        if second[0] != whole:
            second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
            self._second = second
        return f"{second[1]}.{int((now - whole) * 1000):03d}+00:00"


_clock = _UtcClock()


def _encode(value: Any, what: str) -> str:
    try:
        return json.dumps(value, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"health {what} must be JSON-serialisable (finite numbers): {exc}"
        ) from exc


class HealthState:
    """What this agent reports on its health port; thread-safe.

    The agent updates it from any thread; `HealthResponder` only reads it. A
    new state reports `healthy` with no issues: call `set("unhealthy", [...])`
    before starting the responder if the agent is not ready yet.

    Everything given is encoded to JSON at once, so a value that cannot be sent
    raises `ValueError` here, in the caller, and never in the responder.
    """

    def __init__(self, service: str) -> None:
        self._service = service
        self._lock = threading.Lock()
        self._status: ReportedStatus = "healthy"
        self._issues: tuple[str, ...] = ()
        self._details: dict[str, Any] = {}
        # The reply around its timestamp, swapped in as one tuple so the
        # responder reads it without taking the lock (a tuple read is atomic).
        self._parts = self._encode_parts(self._status, self._issues, self._details)

    @property
    def service(self) -> str:
        """The agent name every reply carries as `service`."""
        return self._service

    def set(
        self,
        status: ReportedStatus,
        issues: Sequence[str] = (),
        details: Mapping[str, Any] | None = None,
    ) -> None:
        """Report `status` with `issues` from now on.

        `details` replaces the current details when given and leaves them as
        they are when None. `degraded` must carry at least one issue (the
        protocol says so); `ValueError` otherwise.
        """
        if status not in _REPORTED_STATUSES:
            raise ValueError(
                f"health status must be one of {sorted(_REPORTED_STATUSES)}, not {status!r}"
            )
        if isinstance(issues, str):
            raise TypeError("health issues must be a sequence of strings, not one string")
        issue_list = tuple(str(issue) for issue in issues)
        if status == "degraded" and not issue_list:
            raise ValueError("a degraded health status must carry at least one issue")
        with self._lock:
            new_details = self._details if details is None else dict(details)
            parts = self._encode_parts(status, issue_list, new_details)
            self._status, self._issues, self._details = status, issue_list, new_details
            self._parts = parts

    def update_details(self, **details: Any) -> None:
        """Merge `details` into the reported details (status and issues stay)."""
        with self._lock:
            new_details = {**self._details, **details}
            parts = self._encode_parts(self._status, self._issues, new_details)
            self._details = new_details
            self._parts = parts

    def snapshot(self) -> dict[str, Any]:
        """The reply a health check gets right now: a fresh dict, timestamp = now (UTC)."""
        reply: dict[str, Any] = json.loads(self._reply_bytes())
        return reply

    def _reply_bytes(self) -> bytes:
        head, tail = self._parts
        return head + _clock.now().encode() + tail

    def _encode_parts(
        self, status: str, issues: Sequence[str], details: Mapping[str, Any]
    ) -> tuple[bytes, bytes]:
        head = (
            f'{{"status": {_encode(status, "status")},'
            f' "service": {_encode(self._service, "service")}, "timestamp": "'
        )
        tail = (
            f'", "issues": {_encode(list(issues), "issues")},'
            f' "details": {_encode(dict(details), "details")}}}'
        )
        return head.encode(), tail.encode()


def _error_reply(why: str) -> bytes:
    return json.dumps({"status": "error", "error": why}).encode()


def _bound_repr(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _reply_to(state: HealthState, frames: list[bytes]) -> tuple[bytes, bool]:
    """The reply to one request and whether the request was good.

    Every way a request can be wrong ends here as an error reply: this is the
    one place that turns bad input into a wire error.
    """
    if len(frames) != 1:
        return _error_reply(f"expected a single-frame request, got {len(frames)} frames"), False
    frame = frames[0]
    try:
        # Decoded here rather than by json.loads, which would guess UTF-16/32
        # from the first bytes: the protocol is UTF-8 JSON.
        text = frame.decode("utf-8")
    except UnicodeDecodeError:
        return _error_reply("request is not UTF-8 text"), False
    try:
        request = json.loads(text)
    except ValueError as exc:
        return _error_reply(f"request is not valid JSON: {exc}"), False
    except RecursionError:
        return _error_reply("request is nested too deeply"), False
    if not isinstance(request, dict):
        return _error_reply(f"request must be a JSON object, got {type(request).__name__}"), False
    action = request.get("action")
    if action != "health_check":
        return _error_reply(f"unknown action {_bound_repr(action)}; expected 'health_check'"), False
    return state._reply_bytes(), True


def _split_endpoint(endpoint: str) -> tuple[str, str]:
    """`tcp://host:port` -> (`tcp://host:`, port); port 0 means any free port."""
    prefix, sep, port = endpoint.rpartition(":")
    if not sep or not prefix.startswith("tcp://") or not (port == "*" or port.isdigit()):
        raise ValueError(f"health endpoint must look like tcp://127.0.0.1:50151, not {endpoint!r}")
    return prefix + ":", "*" if port == "0" else port


_responder_ids = itertools.count()


class HealthResponder:
    """Answers health checks from `state` on `endpoint`, in a daemon thread of its own.

    The thread owns its socket and only reads `state`, so it keeps answering
    while the agent's own threads are busy (see the module docstring for what
    the GIL allows). Counters: `requests_served` counts every reply sent;
    `bad_requests` counts malformed requests, answered with an error or, when
    they carry no envelope to answer to, dropped.

    `context` lets many responders in one process share a ZMQ context; by
    default the responder makes one and terminates it on `stop()`.
    """

    def __init__(
        self, state: HealthState, endpoint: str, *, context: zmq.Context[Any] | None = None
    ) -> None:
        self._state = state
        self._prefix, self._port = _split_endpoint(endpoint)
        self._requested = endpoint
        self._bound: str | None = None
        self._owns_context = context is None
        self._context: zmq.Context[Any] = context if context is not None else zmq.Context()
        self._wake_endpoint = f"inproc://graftmesh-health-wake-{next(_responder_ids)}"
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self.requests_served = 0
        self.bad_requests = 0

    @property
    def endpoint(self) -> str:
        """The bound endpoint (actual port) once started; the requested one before."""
        return self._bound or self._requested

    @property
    def port(self) -> int:
        """The bound TCP port; only valid once started."""
        if self._bound is None:
            raise RuntimeError("the health responder is not started")
        return int(self._bound.rpartition(":")[2])

    def start(self) -> None:
        """Bind the endpoint and start answering; `HealthBindError` if it cannot bind."""
        if self._thread is not None or self._stopped:
            raise RuntimeError("a HealthResponder can be started once")
        try:
            sock = self._bind()
        except BaseException:
            # Nothing runs after a failed start; stop() stays safe to call.
            self.stop()
            raise
        # The socket moves to the serving thread: Thread.start() is the full
        # memory barrier that libzmq asks for when a socket changes threads.
        self._thread = threading.Thread(
            target=self._serve,
            args=(sock,),
            name=f"health-responder:{self.port}",
            daemon=True,
        )
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop answering, close the sockets and free the port; safe to call again."""
        if self._stopped:
            return
        self._stopped = True
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stopping.set()
            self._wake(thread)
            thread.join(timeout)
            if thread.is_alive():
                # Terminating the context now would block on the sockets the
                # thread still holds; the thread is a daemon and dies with us.
                _log.warning(
                    "health responder on %s did not stop within %.1f s", self.endpoint, timeout
                )
                return
        if self._owns_context:
            self._context.term()

    def _wake(self, thread: threading.Thread) -> None:
        if not thread.is_alive():
            return
        poke: zmq.Socket[Any] = self._context.socket(zmq.DEALER)
        poke.linger = 0
        try:
            poke.connect(self._wake_endpoint)
            poke.send(b"", zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the thread also notices `_stopping` when its receive times out
        finally:
            poke.close()

    def _bind(self) -> zmq.Socket[Any]:
        sock: zmq.Socket[Any] = self._context.socket(zmq.ROUTER)
        sock.linger = 0
        # libzmq drops a peer that sends a larger frame before it reaches us.
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_BYTES)
        if self._prefix.startswith("tcp://["):
            sock.setsockopt(zmq.IPV6, 1)
        endpoint = self._prefix + self._port
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            sock.close()
            if exc.errno == zmq.EADDRINUSE:
                message = (
                    f"health port {self._port} is already in use, cannot bind {endpoint}"
                    " (another agent, or an old instance of this one, holds it)"
                )
            else:
                message = f"cannot bind health endpoint {endpoint}: {exc}"
            raise HealthBindError(message, endpoint, self._port) from exc
        self._bound = str(sock.getsockopt_string(zmq.LAST_ENDPOINT))
        # The same socket listens in-process too, so stop() can wake a blocking
        # receive at once; a Poller over a second socket would cost every
        # request a few microseconds.
        try:
            sock.bind(self._wake_endpoint)
        except zmq.ZMQError:
            sock.close()
            raise
        sock.rcvtimeo = _IDLE_WAKE_MS
        return sock

    def _serve(self, sock: zmq.Socket[Any]) -> None:
        try:
            while not self._stopping.is_set():
                try:
                    frame = sock.recv()
                    if self._stopping.is_set():
                        break
                    self._answer(sock, frame)
                except zmq.Again:
                    continue  # idle
                except zmq.ZMQError as exc:
                    if exc.errno == zmq.ETERM or self._stopping.is_set():
                        break
                    # A ROUTER has no state to get stuck in: log, pause so a
                    # persistent error cannot spin, and keep serving.
                    _log.error("health responder on %s: %s", self.endpoint, exc)
                    self._stopping.wait(0.1)
        finally:
            sock.close()

    def _answer(self, sock: zmq.Socket[Any], first: bytes) -> None:
        frames = [first]
        while sock.getsockopt(_RCVMORE):  # a multipart message arrives whole: bounded
            frames.append(sock.recv(_NOBLOCK))
        # frames[0] is the peer's routing id; a REQ (or a DEALER speaking REQ's
        # envelope) ends its envelope with an empty frame, and the request follows.
        try:
            bottom = frames.index(b"", 1)
        except ValueError:
            # No envelope: nothing a REQ would recognise as a reply can go
            # back. REP drops these too.
            self.bad_requests += 1
            return
        body = frames[bottom + 1 :]
        if len(body) == 1 and body[0] in _CANONICAL_REQUESTS:  # what every client sends
            reply, good = self._state._reply_bytes(), True
        else:
            try:
                reply, good = _reply_to(self._state, body)
            except Exception:  # one bad request must not end the thread
                _log.exception("health responder on %s could not build a reply", self.endpoint)
                reply, good = _error_reply("internal error"), False
        # Counted before the send, so a client holding its reply sees the count.
        self.requests_served += 1
        if not good:
            self.bad_requests += 1
        for frame in frames[: bottom + 1]:
            sock.send(frame, _NOBLOCK | _SNDMORE)
        sock.send(reply, _NOBLOCK)


@dataclass(frozen=True)
class HealthResult:
    """One health check's outcome.

    `latency_s` is the round trip when a reply arrived (even a malformed one)
    and None otherwise. `reply` is the decoded reply when it was a JSON object.
    `error` says why the agent counts as UNREACHABLE, or, for a DEGRADED reply
    without issues, that the reply broke the protocol.
    """

    status: HealthStatus
    latency_s: float | None
    reply: dict[str, Any] | None
    error: str | None

    @property
    def is_up(self) -> bool:
        """The agent answers and can work: HEALTHY or DEGRADED."""
        return self.status in (HealthStatus.HEALTHY, HealthStatus.DEGRADED)

    @property
    def is_healthy(self) -> bool:
        """The agent reports itself fully healthy."""
        return self.status is HealthStatus.HEALTHY


_BY_REPORTED = {
    "ok": HealthStatus.HEALTHY,
    "healthy": HealthStatus.HEALTHY,
    "degraded": HealthStatus.DEGRADED,
    "unhealthy": HealthStatus.UNHEALTHY,
}


def classify_reply(reply: object) -> tuple[HealthStatus, str | None]:
    """The status a decoded health reply stands for, and a note on what was wrong with it.

    `ok`/`healthy` -> HEALTHY, `degraded` -> DEGRADED (noted when it carries no
    issues), `unhealthy` -> UNHEALTHY; an `error` reply, a reply that is not an
    object, or an unknown status -> UNREACHABLE. Status names match without
    regard to case.
    """
    if not isinstance(reply, dict):
        return (
            HealthStatus.UNREACHABLE,
            f"malformed reply: expected a JSON object, got {type(reply).__name__}",
        )
    reported = reply.get("status")
    if not isinstance(reported, str):
        return (
            HealthStatus.UNREACHABLE,
            f"malformed reply: no status string ({_bound_repr(reported)})",
        )
    key = reported.strip().lower()
    if key == "error":
        return (
            HealthStatus.UNREACHABLE,
            f"responder refused the request: {reply.get('error', '(no reason given)')}",
        )
    status = _BY_REPORTED.get(key)
    if status is None:
        return HealthStatus.UNREACHABLE, f"malformed reply: unknown status {_bound_repr(reported)}"
    if status is HealthStatus.DEGRADED:
        issues = reply.get("issues")
        if not isinstance(issues, list) or not issues:
            return status, "degraded reply carries no issues"
    return status, None


def _unreachable(error: str, latency_s: float | None = None) -> HealthResult:
    return HealthResult(HealthStatus.UNREACHABLE, latency_s, None, error)


def _decode_reply(raw: bytes, latency_s: float) -> HealthResult:
    try:
        reply = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        return _unreachable(f"malformed reply: not JSON ({exc})", latency_s)
    status, note = classify_reply(reply)
    return HealthResult(status, latency_s, reply if isinstance(reply, dict) else None, note)


def _tcp_endpoint(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


# What a check's future resolves to: the reply frame, or why there is none.
_Outcome = bytes | str


class _Channel:
    """One REQ socket to one agent, driven straight from the event loop.

    Not `zmq.asyncio`: its per-call futures, timers and reader (un)registration
    cost about as much Python time as the whole rest of a check. Here the
    socket's FD stays registered with the loop for the channel's life, and one
    callback (`_pump`) moves the exchange along. ZMQ_FD is edge-triggered, so
    `_pump` reads ZMQ_EVENTS after every operation instead of trusting the FD.

    REQ, not DEALER: libzmq does the envelope, and with REQ_CORRELATE it tags
    each request and drops replies to earlier ones, so a late reply is never
    taken for the current one; REQ_RELAXED keeps the socket usable after a
    lost reply. We still replace a channel after any failure, which also drops
    whatever it had queued. IMMEDIATE queues a request only on a live
    connection, so a dead agent shows as "no connection" rather than piling up
    stale requests to answer when it is back.
    """

    __slots__ = ("_fd", "_sock", "_waiter", "endpoint", "loop", "replied_at", "sent_at")

    def __init__(
        self, context: zmq.Context[Any], host: str, port: int, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.endpoint = _tcp_endpoint(host, port)
        self.loop = loop
        sock: zmq.Socket[Any] = zmq.Socket(context, zmq.REQ)
        sock.linger = 0
        sock.setsockopt(zmq.REQ_CORRELATE, 1)
        sock.setsockopt(zmq.REQ_RELAXED, 1)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, _MAX_REPLY_BYTES)
        if ":" in host:
            sock.setsockopt(zmq.IPV6, 1)
        try:
            sock.connect(self.endpoint)
        except zmq.ZMQError:
            sock.close()
            raise
        self._sock = sock
        self._fd = cast(int, sock.getsockopt(zmq.FD))
        self._waiter: asyncio.Future[_Outcome] | None = None
        self.sent_at = 0.0
        self.replied_at = 0.0
        loop.add_reader(self._fd, self._pump)

    def begin(self, waiter: asyncio.Future[_Outcome]) -> None:
        """Send the request now, or as soon as the connection is up; `waiter` gets the outcome."""
        self._waiter = waiter
        self.sent_at = 0.0
        try:
            self._sock.send(_REQUEST, _NOBLOCK)
        except zmq.Again:
            pass  # not connected yet: `_pump` sends once the connection is up
        except zmq.ZMQError as exc:
            self._waiter = None
            waiter.set_result(f"health check of {self.endpoint} failed: {exc}")
            return
        else:
            self.sent_at = time.perf_counter()
        self._pump()  # ZMQ_FD is edge-triggered: look at the events after every send

    def expire(self, timeout_s: float) -> None:
        """Give up on the exchange in flight, if any."""
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            what = "reply from" if self.sent_at else "connection to"
            waiter.set_result(f"no {what} {self.endpoint} within {timeout_s:g} s")

    def close(self, why: str = "the HealthClient was closed during the check") -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(why)
        self.loop.remove_reader(self._fd)  # a no-op once the loop is closed
        self._sock.close(linger=0)

    def _pump(self) -> None:
        sock = self._sock
        try:
            events = cast(int, sock.getsockopt(_EVENTS))  # also re-arms the FD
            waiter = self._waiter
            if waiter is None or waiter.done():
                return
            if not self.sent_at:
                if not events & _POLLOUT:
                    return  # not connected yet
                sock.send(_REQUEST, _NOBLOCK)
                self.sent_at = time.perf_counter()
                events = cast(int, sock.getsockopt(_EVENTS))
            if not events & _POLLIN:
                return
            raw = sock.recv(_NOBLOCK)
        except zmq.Again:  # e.g. what was there was a late reply that REQ_CORRELATE dropped
            return
        except zmq.ZMQError as exc:
            waiter, self._waiter = self._waiter, None
            if waiter is not None and not waiter.done():
                waiter.set_result(f"health check of {self.endpoint} failed: {exc}")
            return
        self.replied_at = time.perf_counter()
        self._waiter = None
        waiter.set_result(raw)


def _result(channel: _Channel | None, outcome: _Outcome) -> HealthResult:
    if type(outcome) is bytes and channel is not None:
        return _decode_reply(outcome, channel.replied_at - channel.sent_at)
    return _unreachable(str(outcome))


def _expire_all(channels: list[_Channel], timeout_s: float) -> None:
    for channel in channels:
        channel.expire(timeout_s)


class HealthClient:
    """Checks agents' health ports; one client serves any number of sweeps.

    Keeps one connected socket per target between checks, so a sweep costs one
    round trip per agent and no reconnects. Use it from one event loop; it is
    not thread-safe. `close()` it when done. The default ZMQ context allows
    about a thousand sockets, so one client sweeps up to about a thousand
    agents; pass a context with a larger `MAX_SOCKETS` for more.
    """

    def __init__(self, context: zmq.Context[Any] | None = None) -> None:
        self._owns_context = context is None
        self._context: zmq.Context[Any] = context if context is not None else zmq.Context()
        self._idle: dict[tuple[str, int], _Channel] = {}
        self._busy: set[_Channel] = set()
        self._closed = False

    async def check(self, host: str, port: int, timeout_s: float = 1.0) -> HealthResult:
        """Ask `host:port` for its health; never raises for anything the peer does.

        No connection or no reply within `timeout_s`, or a reply that breaks
        the protocol, is UNREACHABLE with `error` saying which.
        """
        if self._closed:
            raise RuntimeError("the HealthClient is closed")
        # The one-target case of `_sweep`, without its gather: a plain await
        # saves an event-loop iteration per check.
        loop = asyncio.get_running_loop()
        key = (host, port)
        try:
            channel = self._take(key, loop)
        except zmq.ZMQError as exc:
            return _unreachable(f"cannot connect to {_tcp_endpoint(host, port)}: {exc}")
        waiter: asyncio.Future[_Outcome] = loop.create_future()
        timer = loop.call_later(timeout_s, channel.expire, timeout_s)
        outcome: _Outcome = "check cancelled"
        try:
            channel.begin(waiter)
            outcome = await waiter
        finally:
            timer.cancel()
            self._give_back(key, channel, type(outcome) is bytes)
        return _result(channel, outcome)

    async def check_many(
        self, targets: Iterable[tuple[str, int]], timeout_s: float = 1.0
    ) -> dict[tuple[str, int], HealthResult]:
        """Check every `(host, port)` at once; the sweep takes at most about `timeout_s`."""
        keys = list(dict.fromkeys(targets))
        return dict(zip(keys, await self._sweep(keys, timeout_s), strict=True))

    def close(self) -> None:
        """Close every socket (checks in flight end UNREACHABLE); safe to call again."""
        if self._closed:
            return
        self._closed = True
        channels = [*self._idle.values(), *self._busy]
        self._idle.clear()
        self._busy.clear()
        for channel in channels:
            channel.close()
        if self._owns_context:
            self._context.term()

    async def _sweep(self, keys: list[tuple[str, int]], timeout_s: float) -> list[HealthResult]:
        if self._closed:
            raise RuntimeError("the HealthClient is closed")
        loop = asyncio.get_running_loop()
        channels: list[_Channel | None] = []
        waiters: list[asyncio.Future[_Outcome]] = []
        live: list[_Channel] = []
        # Timer first, sends last: after the last send this thread should reach
        # the loop's poll, and release the GIL to the replies, as soon as it can.
        timer = loop.call_later(timeout_s, _expire_all, live, timeout_s)
        try:
            for key in keys:
                waiter: asyncio.Future[_Outcome] = loop.create_future()
                waiters.append(waiter)
                try:
                    channel = self._take(key, loop)
                except zmq.ZMQError as exc:
                    waiter.set_result(f"cannot connect to {_tcp_endpoint(*key)}: {exc}")
                    channels.append(None)
                    continue
                channels.append(channel)
                live.append(channel)
                channel.begin(waiter)
            await asyncio.gather(*waiters)
            return [
                _result(used, waiter.result())
                for used, waiter in zip(channels, waiters, strict=True)
            ]
        finally:
            timer.cancel()
            for key, used, waiter in zip(keys, channels, waiters, strict=False):
                if used is not None:
                    clean = (
                        waiter.done() and not waiter.cancelled() and type(waiter.result()) is bytes
                    )
                    self._give_back(key, used, clean)

    def _take(self, key: tuple[str, int], loop: asyncio.AbstractEventLoop) -> _Channel:
        idle = self._idle.pop(key, None)
        if idle is not None and idle.loop is loop:
            channel = idle
        else:
            if idle is not None:  # made under another event loop: its FD is watched there
                idle.close()
            channel = _Channel(self._context, *key, loop)
        self._busy.add(channel)
        return channel

    def _give_back(self, key: tuple[str, int], channel: _Channel, clean: bool) -> None:
        if channel not in self._busy:
            return  # closed with the client meanwhile
        self._busy.discard(channel)
        if clean and key not in self._idle:
            self._idle[key] = channel
        else:
            # After a failure the request may still be queued or be answered
            # late; a fresh socket starts with neither.
            channel.close()


async def check_health(host: str, port: int, timeout_s: float = 1.0) -> HealthResult:
    """Check one agent once, with a client of its own (for sweeps, keep a `HealthClient`)."""
    client = HealthClient()
    try:
        return await client.check(host, port, timeout_s)
    finally:
        client.close()
