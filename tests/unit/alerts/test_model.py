"""Parsing events and the wire form of alerts."""

from __future__ import annotations

import json

import pytest

from common.bus import fingerprint
from services.alerts.model import (
    Alert,
    AlertKind,
    InvalidEventError,
    alert_id,
    alert_subject,
    format_time,
    parse_agent_event,
    parse_alert,
    parse_error_event,
    parse_time,
)
from tests.unit.alerts.factories import T0

CONTRACT_ALERT_KEYS = {
    "id",
    "timestamp",
    "kind",
    "severity",
    "agent",
    "fingerprint",
    "count",
    "first_seen",
    "last_seen",
    "message",
    "sample",
}


def _event(**overrides: object) -> dict[str, object]:
    body: dict[str, object] = {
        "id": "e1",
        "timestamp": format_time(T0),
        "machine": "mainpc",
        "agent": "trainer",
        "severity": "error",
        "error_type": "ValueError",
        "message": "loss is NaN",
        "details": {"step": 3},
        "stack_trace": None,
        "trace_id": None,
        "fingerprint": "f" * 32,
    }
    body.update(overrides)
    return body


def test_error_event_is_parsed_from_the_bus_json() -> None:
    event = parse_error_event(json.dumps(_event()).encode())
    assert event.id == "e1" and event.agent == "trainer" and event.severity == "error"
    assert event.timestamp == pytest.approx(T0)
    assert event.details == {"step": 3} and event.fingerprint == "f" * 32
    assert event.occurrences == 1 and event.first_seen == pytest.approx(T0)


def test_folded_event_stands_for_its_count_since_its_first_seen() -> None:
    event = parse_error_event(
        _event(details={"count": 7, "first_seen": format_time(T0 - 9), "last_seen": "x"})
    )
    assert event.occurrences == 7
    assert event.first_seen == pytest.approx(T0 - 9)


@pytest.mark.parametrize("count", [0, -3, "7", True, 2.5])
def test_a_count_that_is_not_a_positive_int_counts_once(count: object) -> None:
    assert parse_error_event(_event(details={"count": count})).occurrences == 1


def test_missing_fingerprint_is_computed_as_the_bus_does() -> None:
    event = parse_error_event(_event(fingerprint=None))
    assert event.fingerprint == fingerprint("trainer", "ValueError", "loss is NaN", None)


def test_unknown_severity_counts_as_error_and_bad_timestamp_as_unknown() -> None:
    event = parse_error_event(_event(severity="apocalyptic", timestamp="yesterday"))
    assert event.severity == "error" and event.timestamp is None


@pytest.mark.parametrize(
    "data",
    [b"not json", b"[1, 2]", json.dumps(_event(id="")), json.dumps(_event(agent=None))],
)
def test_what_is_not_an_error_event_is_refused(data: bytes | str) -> None:
    with pytest.raises(InvalidEventError):
        parse_error_event(data)


def test_sample_clips_long_texts() -> None:
    event = parse_error_event(_event(message="x" * 10_000, stack_trace="y" * 50_000))
    sample = event.sample()
    assert len(sample["message"]) < 2_100 and len(sample["stack_trace"]) < 4_100
    assert sample["id"] == "e1" and sample["fingerprint"] == "f" * 32


def test_agent_event_takes_agent_and_state_from_the_subject_in_lower_case() -> None:
    body = {
        "agent": "trainer",
        "group": "core",
        "machine": "mainpc",
        "state": "FAILED",
        "previous": "BACKOFF",
        "reason": "breaker open",
        "pid": None,
        "restarts": 5,
        "timestamp": format_time(T0),
    }
    event = parse_agent_event("events.agent.trainer.failed", json.dumps(body))
    assert (event.agent, event.state, event.previous, event.restarts) == (
        "trainer",
        "failed",
        "backoff",
        5,
    )
    assert event.timestamp == pytest.approx(T0) and event.payload()["reason"] == "breaker open"


@pytest.mark.parametrize("subject", ["events.agent.trainer", "events.job.j1.done", "x.y.z.w"])
def test_agent_event_on_another_subject_is_refused(subject: str) -> None:
    with pytest.raises(InvalidEventError):
        parse_agent_event(subject, b"{}")


def test_alert_wire_form_has_exactly_the_contract_keys_and_round_trips() -> None:
    alert = Alert(
        id=alert_id("error", "e1"),
        timestamp=T0,
        kind=AlertKind.FLOOD,
        severity="critical",
        agent="trainer",
        fingerprint="f" * 32,
        count=12,
        first_seen=T0 - 5,
        last_seen=T0,
        message="many",
        sample={"id": "e1"},
    )
    wire = json.loads(alert.encode())
    assert set(wire) == CONTRACT_ALERT_KEYS
    assert wire["kind"] == "flood" and wire["timestamp"].endswith("+00:00")
    assert parse_alert(alert.encode()) == alert
    assert alert.subject == "alerts.critical.trainer"


def test_alert_ids_are_32_hex_digits_and_depend_only_on_their_parts() -> None:
    first = alert_id("flood", "connection", "trainer", "e1")
    assert first == alert_id("flood", "connection", "trainer", "e1")
    assert first != alert_id("flood", "connection", "trainer", "e2")
    assert len(first) == 32 and int(first, 16) >= 0


def test_alert_subject_keeps_tokens_valid() -> None:
    assert alert_subject("error", "a.b c") == "alerts.error.a_b_c"


def test_naive_times_are_utc() -> None:
    assert parse_time("2027-01-15T08:00:00") == parse_time("2027-01-15T08:00:00+00:00")
    assert parse_time(None) is None and parse_time("") is None
