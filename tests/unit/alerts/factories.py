"""Events for the alerts engine's tests, at given times (seconds since the epoch)."""

from __future__ import annotations

import itertools
from typing import Any

from services.alerts.model import AgentEvent, ErrorEvent, format_time, parse_error_event

T0 = 1_800_000_000.0  # a fixed wall time: the tests' clock starts here

_ids = itertools.count()


def error(
    agent: str = "trainer",
    *,
    at: float = T0,
    error_type: str = "ValueError",
    message: str = "loss is NaN",
    severity: str = "error",
    count: int | None = None,
    details: dict[str, Any] | None = None,
    event_id: str | None = None,
    fingerprint: str | None = None,
) -> ErrorEvent:
    """An error event as the bus publishes it (fingerprint computed unless given)."""
    all_details = dict(details or {})
    if count is not None:
        all_details["count"] = count
    body: dict[str, Any] = {
        "id": event_id or f"ev{next(_ids):08d}",
        "timestamp": format_time(at),
        "machine": "mainpc",
        "agent": agent,
        "severity": severity,
        "error_type": error_type,
        "message": message,
        "details": all_details,
        "stack_trace": None,
        "trace_id": None,
    }
    if fingerprint is not None:
        body["fingerprint"] = fingerprint
    return parse_error_event(body)


def agent_event(
    agent: str,
    state: str,
    previous: str = "healthy",
    *,
    at: float = T0,
    restarts: int = 0,
    reason: str = "",
    pid: int | None = 4242,
) -> AgentEvent:
    return AgentEvent(
        agent=agent,
        state=state,
        previous=previous,
        group="core",
        machine="mainpc",
        reason=reason,
        pid=pid,
        restarts=restarts,
        timestamp=at,
        timestamp_text=format_time(at),
    )
