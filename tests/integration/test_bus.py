"""The error bus against real JetStream: the system NATS and a bundled nats-server.

Events are read back through a JetStream consumer filtered on the test's own agent
name, so tests sharing a server never see each other's events. Tests that kill or
reconfigure a server start a bundled one of their own.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig
from opentelemetry.sdk.trace import TracerProvider

from common.bus import (
    ALERTS_STREAM,
    ERRORS_STREAM,
    ErrorBus,
    Severity,
    ensure_streams,
    fingerprint,
)
from common.infra import EmbeddedServer
from tests.ports import free_port

pytestmark = pytest.mark.integration

DEADLINE_S = 10.0
MACHINE = "testbox"
EVENT_KEYS = {
    "id",
    "timestamp",
    "machine",
    "agent",
    "severity",
    "error_type",
    "message",
    "details",
    "stack_trace",
    "trace_id",
    "fingerprint",
}

Stored = tuple[str, dict[str, str], dict[str, Any]]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def wait_until(check: Callable[[], bool], what: str, seen: Callable[[], object]) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not check():
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} did not happen within {DEADLINE_S} s; saw {seen()!r}")
        await asyncio.sleep(0.01)


async def stored(url: str, subject_filter: str) -> list[Stored]:
    """Every message a stream holds on `subject_filter`: (subject, headers, JSON body)."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        sub = await js.pull_subscribe(
            subject_filter,
            config=ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL),
        )
        try:
            want = (await sub.consumer_info()).num_pending or 0
            msgs: list[Msg] = []
            deadline = time.monotonic() + DEADLINE_S
            while len(msgs) < want:
                remaining = deadline - time.monotonic()
                try:
                    msgs += await sub.fetch(min(want - len(msgs), 500), timeout=max(remaining, 0.1))
                except nats.errors.TimeoutError:
                    if time.monotonic() >= deadline:
                        raise AssertionError(
                            f"read {len(msgs)} of {want} messages on {subject_filter}"
                        ) from None
        finally:
            await sub.unsubscribe()
    finally:
        await nc.close()
    return [(m.subject, dict(m.headers or {}), json.loads(m.data)) for m in msgs]


def errors_of(agent: str) -> str:
    return f"errors.{MACHINE}.*.{agent}"


@pytest.fixture
async def make_bus() -> AsyncIterator[Callable[..., ErrorBus]]:
    buses: list[ErrorBus] = []

    def make(url: str, agent: str, **kwargs: Any) -> ErrorBus:
        bus = ErrorBus(nats_url=url, machine=MACHINE, agent=agent, **kwargs)
        buses.append(bus)
        return bus

    yield make
    for bus in buses:
        await bus.close(timeout_s=1.0)


async def started(bus: ErrorBus) -> ErrorBus:
    await bus.start()
    await wait_until(lambda: bus.connected, "bus connected", lambda: bus.stats)
    return bus


@pytest.fixture
async def own_nats(tmp_path: Path) -> AsyncIterator[EmbeddedServer]:
    """A bundled nats-server of this test alone (not started yet): free to kill or reconfigure."""
    server = EmbeddedServer.nats("127.0.0.1", free_port(), tmp_path)
    yield server
    await server.stop()


def _fail_loading(shard: int) -> None:
    raise KeyError(f"shard {shard} missing")


# --------------------------------------------------------------------------- events


async def test_error_event_lands_in_errors_stream_with_exact_schema_and_msg_id(
    nats_url: str, unique_name: str, make_bus: Callable[..., ErrorBus]
) -> None:
    bus = await started(make_bus(nats_url, unique_name))
    before = datetime.now().astimezone()
    try:
        _fail_loading(17)
    except KeyError as exc:
        bus.report_error(
            "could not load shard 17",
            severity=Severity.CRITICAL,
            details={"shard": 17, "path": Path("/data/shard17"), "raw": object()},
            exc=exc,
        )
    await bus.flush()

    [(subject, headers, event)] = await stored(nats_url, errors_of(unique_name))
    assert subject == f"errors.{MACHINE}.critical.{unique_name}"
    assert set(event) == EVENT_KEYS
    assert headers["Nats-Msg-Id"] == event["id"]
    assert len(event["id"]) == 32 and int(event["id"], 16) >= 0
    stamp = datetime.fromisoformat(event["timestamp"])
    assert stamp.utcoffset() == timedelta(0)
    assert before - timedelta(seconds=1) <= stamp <= datetime.now().astimezone()
    assert (event["machine"], event["agent"], event["severity"]) == (
        MACHINE,
        unique_name,
        "critical",
    )
    assert (event["error_type"], event["message"]) == ("KeyError", "could not load shard 17")
    assert event["details"]["shard"] == 17
    assert event["details"]["path"] == "/data/shard17"
    assert event["details"]["raw"].startswith("<object object at")
    assert "in _fail_loading" in event["stack_trace"]
    assert "KeyError: 'shard 17 missing'" in event["stack_trace"]
    assert event["trace_id"] is None and "traceparent" not in headers
    assert event["fingerprint"] == fingerprint(
        unique_name, "KeyError", "could not load shard 17", event["stack_trace"]
    )
    assert bus.stats.published == 1


async def test_unknown_severity_lands_as_error_with_the_value_given(
    nats_url: str, unique_name: str, make_bus: Callable[..., ErrorBus]
) -> None:
    bus = await started(make_bus(nats_url, unique_name))
    bus.report_error("odd severity", severity="catastrophic")
    bus.report_error("plain")
    await bus.flush()
    events = await stored(nats_url, errors_of(unique_name))
    assert [(s.split(".")[2], e["details"]) for s, _, e in events] == [
        ("error", {"invalid_severity": "catastrophic"}),
        ("error", {}),
    ]
    assert [e["error_type"] for _, _, e in events] == ["Error", "Error"]


class Hostile:
    def __str__(self) -> str:
        raise RuntimeError("no str")

    def __repr__(self) -> str:
        raise RuntimeError("no repr")


class UnprintableError(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str")


async def test_hostile_arguments_still_become_well_formed_events(
    nats_url: str, unique_name: str, make_bus: Callable[..., ErrorBus]
) -> None:
    bus = await started(make_bus(nats_url, unique_name))
    circular: dict[Any, Any] = {}
    circular["self"] = circular
    try:
        raise UnprintableError()
    except UnprintableError as exc:
        unprintable = exc
    bus.report_error(Hostile())  # type: ignore[arg-type]
    nasty: dict[Any, Any] = {("a", 1): Hostile(), "loop": circular}
    bus.report_error("nasty details", details=nasty)
    bus.report_error("odd type", error_type=Hostile())  # type: ignore[arg-type]
    bus.report_error("unprintable exception", exc=unprintable)
    await bus.flush()

    events = {e["message"]: e for _, _, e in await stored(nats_url, errors_of(unique_name))}
    assert all(set(e) == EVENT_KEYS for e in events.values())
    assert set(events) == {
        "<unprintable Hostile>",
        "nasty details",
        "odd type",
        "unprintable exception",
    }
    assert events["nasty details"]["details"]["('a', 1)"] == "<unprintable Hostile>"
    assert events["odd type"]["error_type"] == "<unprintable Hostile>"
    assert "UnprintableError" in events["unprintable exception"]["stack_trace"]
    assert bus.stats.dropped == 0


async def test_a_resent_event_is_stored_once(
    nats_url: str, unique_name: str, make_bus: Callable[..., ErrorBus]
) -> None:
    bus = await started(make_bus(nats_url, unique_name))
    bus.report_error("sent twice")
    await bus.flush()
    [(subject, headers, event)] = await stored(nats_url, errors_of(unique_name))

    # What the bus does after a lost ack: the same bytes, the same Nats-Msg-Id.
    assert bus.js is not None
    ack = await bus.js.publish(subject, json.dumps(event).encode(), headers=headers)
    assert ack.duplicate is True
    assert [e["id"] for _, _, e in await stored(nats_url, errors_of(unique_name))] == [event["id"]]


async def test_streams_have_the_configuration_of_the_contract(
    nats_url: str, unique_name: str, make_bus: Callable[..., ErrorBus]
) -> None:
    bus = await started(make_bus(nats_url, unique_name))
    assert bus.js is not None
    for name, subject in ((ERRORS_STREAM, "errors.>"), (ALERTS_STREAM, "alerts.>")):
        config = (await bus.js.stream_info(name)).config
        assert config.subjects == [subject]
        assert config.storage == StorageType.FILE
        assert config.max_age == 7 * 24 * 3600
        assert config.max_msgs == 1_000_000
        assert config.duplicate_window == 120


async def test_trace_context_travels_in_headers_and_trace_id(
    nats_url: str, unique_name: str, make_bus: Callable[..., ErrorBus]
) -> None:
    bus = await started(make_bus(nats_url, unique_name))
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("train-step") as span:
        bus.report_error("inside a span")
        span_context = span.get_span_context()
    bus.report_error("outside any span")
    await bus.flush()

    [(_, headers, inside), (_, outside_headers, outside)] = await stored(
        nats_url, errors_of(unique_name)
    )
    trace_id = format(span_context.trace_id, "032x")
    assert inside["trace_id"] == trace_id
    flags = f"{span_context.trace_flags:02x}"
    assert headers["traceparent"] == f"00-{trace_id}-{span_context.span_id:016x}-{flags}"
    assert outside["trace_id"] is None and "traceparent" not in outside_headers


async def test_a_flood_of_identical_errors_becomes_two_events(
    nats_url: str, unique_name: str, make_bus: Callable[..., ErrorBus]
) -> None:
    bus = await started(make_bus(nats_url, unique_name, collapse_window_s=60.0))
    for step in range(10_000):
        bus.report_error(f"loss is NaN at step {step}")
    await bus.flush()

    first, folded = (e for _, _, e in await stored(nats_url, errors_of(unique_name)))
    assert first["message"] == "loss is NaN at step 0" and first["details"] == {}
    assert folded["message"] == "loss is NaN at step 1"  # the first repeat is the sample
    assert folded["details"]["count"] == 9_999
    assert folded["details"]["first_seen"] <= folded["details"]["last_seen"]
    assert first["fingerprint"] == folded["fingerprint"]
    stats = bus.stats
    assert (stats.reported, stats.collapsed, stats.published) == (10_000, 9_999, 2)


async def test_folded_repeats_are_published_when_their_window_closes(
    nats_url: str, unique_name: str, make_bus: Callable[..., ErrorBus]
) -> None:
    clock = FakeClock()
    bus = await started(make_bus(nats_url, unique_name, collapse_window_s=10.0, clock=clock))
    for _ in range(3):
        bus.report_error("disk almost full")
    await wait_until(lambda: bus.stats.published == 1, "first event", lambda: bus.stats)
    assert bus.stats.collapsed == 2

    clock.advance(10.0)
    bus.report_error("something else")  # wakes the publisher, which then sees the clock
    await wait_until(lambda: bus.stats.published == 3, "folded event", lambda: bus.stats)
    events = [e for _, _, e in await stored(nats_url, errors_of(unique_name))]
    assert sorted((e["message"], e["details"].get("count", 1)) for e in events) == [
        ("disk almost full", 1),
        ("disk almost full", 2),
        ("something else", 1),
    ]


class Payload:
    """Stands for what a failing training step's frame holds (tensors, batches)."""


def _fail_step(payload: Payload) -> None:
    raise RuntimeError("step failed")


async def test_folded_reports_do_not_keep_their_exceptions_alive(
    nats_url: str, unique_name: str, make_bus: Callable[..., ErrorBus]
) -> None:
    bus = await started(make_bus(nats_url, unique_name, collapse_window_s=60.0))
    held: list[weakref.ref[Payload]] = []
    for _ in range(3):
        payload = Payload()
        held.append(weakref.ref(payload))
        try:
            _fail_step(payload)
        except RuntimeError as exc:
            bus.report_error("step failed", exc=exc)
        del payload
    await wait_until(
        lambda: (bus.stats.published, bus.stats.collapsed) == (1, 2), "fold", lambda: bus.stats
    )
    gc.collect()
    assert [ref() for ref in held] == [None, None, None]

    await bus.flush()
    _, folded = (e for _, _, e in await stored(nats_url, errors_of(unique_name)))
    assert folded["details"]["count"] == 2
    assert "in _fail_step" in folded["stack_trace"]


async def test_reports_from_eight_threads_all_arrive(
    nats_url: str, unique_name: str, make_bus: Callable[..., ErrorBus]
) -> None:
    bus = await started(make_bus(nats_url, unique_name))
    barrier = threading.Barrier(8)

    def report(thread: int) -> None:
        barrier.wait(DEADLINE_S)
        for i in range(500):
            bus.report_error(f"thread{thread} report{i}")

    threads = [threading.Thread(target=report, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    await wait_until(
        lambda: not any(t.is_alive() for t in threads), "reporting threads done", lambda: bus.stats
    )
    await bus.flush()
    events = [e for _, _, e in await stored(nats_url, errors_of(unique_name))]
    assert len(events) == 4_000
    assert len({e["message"] for e in events}) == 4_000
    assert len({e["id"] for e in events}) == 4_000


async def test_publish_event_goes_to_jetstream_when_a_stream_covers_it_else_core(
    nats_url: str, unique_name: str, make_bus: Callable[..., ErrorBus]
) -> None:
    bus = await started(make_bus(nats_url, unique_name))
    assert bus.nc is not None
    core = await bus.nc.subscribe(f"events.agent.{unique_name}.>")
    alert = {"id": f"alert-{unique_name}", "kind": "flood", "count": 3}
    await bus.publish_event(f"alerts.warning.{unique_name}", alert)
    await bus.publish_event(f"events.agent.{unique_name}.started", {"agent": unique_name})
    await bus.flush()

    [(_, headers, body)] = await stored(nats_url, f"alerts.*.{unique_name}")
    assert body == alert and headers["Nats-Msg-Id"] == alert["id"]
    msg = await core.next_msg(timeout=DEADLINE_S)
    assert json.loads(msg.data) == {"agent": unique_name}
    assert bus.stats.published == 2
    with pytest.raises(ValueError, match="subject"):
        await bus.publish_event("events..bad", {})


# --------------------------------------------------------------------------- NATS away


async def test_first_connect_failing_is_retried_until_nats_comes(
    own_nats: EmbeddedServer, unique_name: str, make_bus: Callable[..., ErrorBus]
) -> None:
    bus = make_bus(own_nats.url, unique_name)
    await bus.start()
    for i in range(10):
        bus.report_error(f"early{i} report")
    assert not bus.connected and bus.stats.buffered == 10

    await own_nats.start()
    await bus.flush(timeout_s=DEADLINE_S)
    events = [e["message"] for _, _, e in await stored(own_nats.url, errors_of(unique_name))]
    assert events == [f"early{i} report" for i in range(10)]


async def test_nats_killed_and_restarted_delivers_each_buffered_event_once(
    own_nats: EmbeddedServer, unique_name: str, make_bus: Callable[..., ErrorBus]
) -> None:
    await own_nats.start()
    bus = await started(make_bus(own_nats.url, unique_name, buffer_size=200))
    assert own_nats.pid is not None and bus.nc is not None
    for i in range(50):
        bus.report_error(f"acked{i} before")
    await bus.flush()

    # Frozen, the server takes the next events into its socket but never acks them;
    # then it dies with them in flight.
    os.kill(own_nats.pid, signal.SIGSTOP)
    sent_before = bus.nc.stats["out_msgs"]
    for i in range(50):
        bus.report_error(f"inflight{i} at kill")
    await wait_until(
        lambda: bus.nc is not None and bus.nc.stats["out_msgs"] >= sent_before + 50,
        "events sent to the frozen server",
        lambda: bus.nc.stats if bus.nc else None,
    )
    os.kill(own_nats.pid, signal.SIGKILL)
    await wait_until(lambda: not own_nats.running, "nats-server exit", lambda: own_nats.pid)
    await wait_until(lambda: not bus.connected, "bus noticing", lambda: bus.stats)

    for i in range(300):
        bus.report_error(f"during{i} outage")
    stats = bus.stats
    assert (stats.buffered, stats.dropped) == (200, 150)

    await own_nats.start()
    await bus.flush(timeout_s=DEADLINE_S)
    events = [e for _, _, e in await stored(own_nats.url, errors_of(unique_name))]

    assert len({e["id"] for e in events}) == len(events)
    messages = [e["message"] for e in events if e["error_type"] != "ErrorBusOverflow"]
    # The newest reports were the ones dropped: the oldest 150 of the outage arrived.
    assert sorted(messages) == sorted(
        [f"acked{i} before" for i in range(50)]
        + [f"inflight{i} at kill" for i in range(50)]
        + [f"during{i} outage" for i in range(150)]
    )
    [overflow] = [e for e in events if e["error_type"] == "ErrorBusOverflow"]
    assert overflow["severity"] == "warning"
    assert overflow["details"] == {"dropped": 150}
    stats = bus.stats
    assert (stats.dropped, stats.buffered, stats.published) == (150, 0, 251)
    assert stats.reconnects == 1


async def test_nats_killed_while_a_thread_reports_loses_and_doubles_nothing(
    own_nats: EmbeddedServer, unique_name: str, make_bus: Callable[..., ErrorBus]
) -> None:
    await own_nats.start()
    bus = await started(make_bus(own_nats.url, unique_name, buffer_size=10_000))
    assert own_nats.pid is not None
    stop = threading.Event()
    reported = 0

    def report() -> None:
        nonlocal reported
        while reported < 3_000 and not stop.is_set():
            for _ in range(100):  # bursts, so events are in flight at any moment
                bus.report_error(f"report{reported} from thread")
                reported += 1
            stop.wait(0.002)

    reporter = threading.Thread(target=report)
    reporter.start()
    try:
        await wait_until(lambda: bus.stats.published >= 300, "300 acks", lambda: bus.stats)
        os.kill(own_nats.pid, signal.SIGKILL)
        await wait_until(lambda: not own_nats.running, "nats-server exit", lambda: own_nats.pid)
        await wait_until(lambda: not bus.connected, "bus noticing", lambda: bus.stats)
        await own_nats.start()
        await wait_until(lambda: not reporter.is_alive(), "reporter done", lambda: reported)
    finally:
        stop.set()
        reporter.join(DEADLINE_S)
    await bus.flush(timeout_s=DEADLINE_S)

    messages = [e["message"] for _, _, e in await stored(own_nats.url, errors_of(unique_name))]
    assert bus.stats.dropped == 0
    assert len(messages) == reported == 3_000
    assert set(messages) == {f"report{i} from thread" for i in range(reported)}


# --------------------------------------------------------------------------- ensure_streams


async def test_ensure_streams_updates_existing_streams_to_the_contract(
    own_nats: EmbeddedServer,
) -> None:
    await own_nats.start()
    nc = await nats.connect(own_nats.url)
    try:
        js = nc.jetstream()
        await js.add_stream(
            StreamConfig(
                name=ERRORS_STREAM,
                subjects=["errors.only.this"],
                storage=StorageType.FILE,
                max_age=60,
                max_msgs=10,
                duplicate_window=5,
            )
        )
        await js.add_stream(
            StreamConfig(name=ALERTS_STREAM, subjects=["alerts.>"], storage=StorageType.MEMORY)
        )
        await ensure_streams(js)
        await ensure_streams(js)  # idempotent

        errors = (await js.stream_info(ERRORS_STREAM)).config
        assert (errors.subjects, errors.max_age, errors.max_msgs, errors.duplicate_window) == (
            ["errors.>"],
            7 * 24 * 3600,
            1_000_000,
            120,
        )
        alerts = (await js.stream_info(ALERTS_STREAM)).config
        # Storage cannot change in place: kept, while the limits still get updated.
        assert alerts.storage == StorageType.MEMORY
        assert (alerts.max_msgs, alerts.duplicate_window) == (1_000_000, 120)
    finally:
        await nc.close()
