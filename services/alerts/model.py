"""What the alerts agent reads and writes: error events, supervisor events, alerts.

Pure: parsing, validation and the wire form of alerts; no I/O.

- An error event is the JSON object the error bus publishes on
  `errors.<machine>.<severity>.<agent>` (ARCHITECTURE.md, "Error bus and events").
  A folded event (the bus folds repeats of one error into one event per window)
  stands for `details["count"]` occurrences, between `details["first_seen"]` and
  its `timestamp`.
- A supervisor event is the JSON object on `events.agent.<agent>.<state>`.
- An alert is published on `alerts.<severity>.<agent>` as the JSON object
  `{"id", "timestamp", "kind", "severity", "agent", "fingerprint", "count",
  "first_seen", "last_seen", "message", "sample"}` with ISO 8601 UTC times.
  Alert ids are derived from what triggered them (`alert_id`), so the same input
  always yields the same id: a re-delivered event re-publishes the same alert,
  which JetStream's duplicate window (`Nats-Msg-Id`) stores once.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from common.bus import SEVERITIES, fingerprint

__all__ = [
    "SEVERITY_RANK",
    "AgentEvent",
    "Alert",
    "AlertKind",
    "ErrorEvent",
    "InvalidEventError",
    "alert_id",
    "alert_subject",
    "format_time",
    "parse_agent_event",
    "parse_alert",
    "parse_error_event",
    "parse_time",
    "severity_at_least",
]

SEVERITY_RANK: dict[str, int] = {name: rank for rank, name in enumerate(SEVERITIES)}

# Bounds on what an alert carries of its sample event: alerts go to chat hooks and
# terminals, and one runaway message must not make every alert of a flood huge.
_SAMPLE_TEXT_CHARS = 2_000
_SAMPLE_STACK_CHARS = 4_000
_SAMPLE_DETAILS_CHARS = 2_000

_BAD_TOKEN_CHARS = re.compile(r"[\s.*>]")


class AlertKind(StrEnum):
    """The `kind` of an alert (the contract's list)."""

    ERROR = "error"
    FLOOD = "flood"
    AGENT_DOWN = "agent_down"
    AGENT_RESTARTED = "agent_restarted"
    BREAKER_OPEN = "breaker_open"
    DRIFT = "drift"
    CANARY_PROMOTED = "canary_promoted"
    CANARY_ROLLED_BACK = "canary_rolled_back"


class InvalidEventError(ValueError):
    """A message on the bus that is not a valid event; it is counted and skipped."""


def alert_id(*parts: str) -> str:
    """The id of the alert that `parts` trigger: 32 hex digits, the same for the same parts."""
    text = "\x1f".join(parts)
    return hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=16).hexdigest()


def severity_at_least(severity: str, minimum: str) -> bool:
    """Whether `severity` is `minimum` or worse (unknown severities count as `error`)."""
    return SEVERITY_RANK.get(severity, SEVERITY_RANK["error"]) >= SEVERITY_RANK[minimum]


def parse_time(value: object) -> float | None:
    """Seconds since the epoch of an ISO 8601 time (naive times are UTC), else None."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def format_time(epoch_s: float) -> str:
    """ISO 8601 UTC with microseconds, as the error bus writes its timestamps."""
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="microseconds")


def alert_subject(severity: str, agent: str) -> str:
    """`alerts.<severity>.<agent>`; characters a subject token cannot hold become `_`."""
    return f"alerts.{severity}.{_BAD_TOKEN_CHARS.sub('_', agent) or '_'}"


def _text(value: object, default: str = "") -> str:
    if value is None:
        return default
    return value if isinstance(value, str) else str(value)


def _clip(text: str | None, limit: int) -> str | None:
    if text is None or len(text) <= limit:
        return text
    return f"{text[:limit]}... [{len(text) - limit} more characters]"


@dataclass(frozen=True)
class ErrorEvent:
    """One error event from the bus, checked and with its times parsed.

    `timestamp` is None when the event's own time was missing or unreadable; the
    engine then uses the time it processed the event.
    """

    id: str
    timestamp: float | None
    machine: str
    agent: str
    severity: str
    error_type: str
    message: str
    details: Mapping[str, Any]
    stack_trace: str | None
    trace_id: str | None
    fingerprint: str
    timestamp_text: str = ""

    @property
    def occurrences(self) -> int:
        """How many reports this event stands for: `details["count"]` of a folded event, else 1."""
        count = self.details.get("count")
        if isinstance(count, int) and not isinstance(count, bool) and count >= 1:
            return count
        return 1

    @property
    def first_seen(self) -> float | None:
        """When the first report it stands for was made (`details["first_seen"]`, else its time)."""
        first = parse_time(self.details.get("first_seen"))
        return first if first is not None else self.timestamp

    def sample(self) -> dict[str, Any]:
        """The event as an alert's `sample`: every field, long texts clipped."""
        details: Any = dict(self.details)
        encoded = json.dumps(details, default=str)
        if len(encoded) > _SAMPLE_DETAILS_CHARS:
            details = {"truncated": _clip(encoded, _SAMPLE_DETAILS_CHARS)}
        return {
            "id": self.id,
            "timestamp": self.timestamp_text,
            "machine": self.machine,
            "agent": self.agent,
            "severity": self.severity,
            "error_type": self.error_type,
            "message": _clip(self.message, _SAMPLE_TEXT_CHARS),
            "details": details,
            "stack_trace": _clip(self.stack_trace, _SAMPLE_STACK_CHARS),
            "trace_id": self.trace_id,
            "fingerprint": self.fingerprint,
        }


def _load_object(data: bytes | str | Mapping[str, Any], what: str) -> Mapping[str, Any]:
    if isinstance(data, Mapping):
        return data
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise InvalidEventError(f"{what} is not JSON: {err}") from None
    if not isinstance(obj, dict):
        raise InvalidEventError(f"{what} is not a JSON object")
    return obj


def parse_error_event(data: bytes | str | Mapping[str, Any]) -> ErrorEvent:
    """An `ErrorEvent` from its JSON; InvalidEventError when it is not one.

    Only `id` and `agent` are required. An unknown severity counts as `error`; a
    missing fingerprint is computed the way the bus computes it.
    """
    obj = _load_object(data, "error event")
    event_id = obj.get("id")
    if not isinstance(event_id, str) or not event_id:
        raise InvalidEventError("error event has no id")
    agent = obj.get("agent")
    if not isinstance(agent, str) or not agent:
        raise InvalidEventError(f"error event {event_id} has no agent")
    severity = _text(obj.get("severity"), "error").lower()
    if severity not in SEVERITY_RANK:
        severity = "error"
    error_type = _text(obj.get("error_type"), "Error")
    message = _text(obj.get("message"))
    details = obj.get("details")
    stack = obj.get("stack_trace")
    stack_trace = _text(stack) if stack is not None else None
    fp = obj.get("fingerprint")
    timestamp_text = _text(obj.get("timestamp"))
    trace_id = obj.get("trace_id")
    return ErrorEvent(
        id=event_id,
        timestamp=parse_time(timestamp_text),
        machine=_text(obj.get("machine")),
        agent=agent,
        severity=severity,
        error_type=error_type,
        message=message,
        details=details if isinstance(details, dict) else {},
        stack_trace=stack_trace,
        trace_id=trace_id if isinstance(trace_id, str) else None,
        fingerprint=fp
        if isinstance(fp, str) and fp
        else fingerprint(agent, error_type, message, stack_trace),
        timestamp_text=timestamp_text,
    )


@dataclass(frozen=True)
class AgentEvent:
    """A supervisor state change (`events.agent.<agent>.<state>`), states in lower case."""

    agent: str
    state: str
    previous: str
    group: str = ""
    machine: str = ""
    reason: str = ""
    pid: int | None = None
    restarts: int = 0
    timestamp: float | None = None
    timestamp_text: str = ""

    def payload(self) -> dict[str, Any]:
        """The event as the supervisor published it: an alert's `sample`."""
        return {
            "agent": self.agent,
            "group": self.group,
            "machine": self.machine,
            "state": self.state,
            "previous": self.previous,
            "reason": self.reason,
            "pid": self.pid,
            "restarts": self.restarts,
            "timestamp": self.timestamp_text,
        }


def parse_agent_event(subject: str, data: bytes | str | Mapping[str, Any]) -> AgentEvent:
    """An `AgentEvent` from `events.agent.<agent>.<state>` and its JSON; InvalidEventError else.

    The subject names the agent and the state; the body may spell the state in
    capitals (the supervisor's `AgentState` values), which is normalised.
    """
    tokens = subject.split(".")
    if len(tokens) != 4 or tokens[:2] != ["events", "agent"]:
        raise InvalidEventError(f"{subject!r} is not an events.agent.<agent>.<state> subject")
    obj = _load_object(data, f"event on {subject}")
    agent, state = tokens[2], tokens[3].lower()
    pid = obj.get("pid")
    restarts = obj.get("restarts")
    timestamp_text = _text(obj.get("timestamp"))
    return AgentEvent(
        agent=agent,
        state=state,
        previous=_text(obj.get("previous")).lower(),
        group=_text(obj.get("group")),
        machine=_text(obj.get("machine")),
        reason=_text(obj.get("reason")),
        pid=pid if isinstance(pid, int) and not isinstance(pid, bool) else None,
        restarts=restarts if isinstance(restarts, int) and not isinstance(restarts, bool) else 0,
        timestamp=parse_time(timestamp_text),
        timestamp_text=timestamp_text,
    )


@dataclass(frozen=True)
class Alert:
    """One alert; `to_json()` is its wire form. Times are seconds since the epoch."""

    id: str
    timestamp: float
    kind: AlertKind
    severity: str
    agent: str
    fingerprint: str
    count: int
    first_seen: float
    last_seen: float
    message: str
    sample: Mapping[str, Any] | None = field(default=None)

    @property
    def subject(self) -> str:
        """Where it is published: `alerts.<severity>.<agent>`."""
        return alert_subject(self.severity, self.agent)

    def to_json(self) -> dict[str, Any]:
        """The wire form: exactly the contract's keys, times as ISO 8601 UTC."""
        return {
            "id": self.id,
            "timestamp": format_time(self.timestamp),
            "kind": self.kind.value,
            "severity": self.severity,
            "agent": self.agent,
            "fingerprint": self.fingerprint,
            "count": self.count,
            "first_seen": format_time(self.first_seen),
            "last_seen": format_time(self.last_seen),
            "message": self.message,
            "sample": dict(self.sample) if self.sample is not None else None,
        }

    def encode(self) -> bytes:
        """`to_json()` as compact UTF-8 JSON."""
        return json.dumps(self.to_json(), separators=(",", ":"), default=str).encode()


def parse_alert(data: bytes | str | Mapping[str, Any]) -> Alert:
    """An `Alert` from its wire form; InvalidEventError when it is not one."""
    obj = _load_object(data, "alert")
    try:
        kind = AlertKind(str(obj.get("kind")))
    except ValueError:
        raise InvalidEventError(f"alert has an unknown kind {obj.get('kind')!r}") from None
    alert_id_value = obj.get("id")
    if not isinstance(alert_id_value, str) or not alert_id_value:
        raise InvalidEventError("alert has no id")
    timestamp = parse_time(obj.get("timestamp"))
    if timestamp is None or not math.isfinite(timestamp):
        raise InvalidEventError(f"alert {alert_id_value} has no valid timestamp")
    first = parse_time(obj.get("first_seen"))
    last = parse_time(obj.get("last_seen"))
    count = obj.get("count")
    sample = obj.get("sample")
    severity = _text(obj.get("severity"), "error").lower()
    return Alert(
        id=alert_id_value,
        timestamp=timestamp,
        kind=kind,
        severity=severity if severity in SEVERITY_RANK else "error",
        agent=_text(obj.get("agent")),
        fingerprint=_text(obj.get("fingerprint")),
        count=count if isinstance(count, int) and not isinstance(count, bool) else 0,
        first_seen=first if first is not None else timestamp,
        last_seen=last if last is not None else timestamp,
        message=_text(obj.get("message")),
        sample=sample if isinstance(sample, dict) else None,
    )
