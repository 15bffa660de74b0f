"""The alerts the router raises (`canary_promoted`, `canary_rolled_back`, `drift`). Pure.

Each is the mesh's alert JSON (ARCHITECTURE.md, "Error bus and events"),
published on `alerts.<severity>.<agent>`:
`{"id", "timestamp", "kind", "severity", "agent", "fingerprint", "count",
"first_seen", "last_seen", "message", "sample"}`. The router raises each alert
once (`count` 1, first and last seen the same instant); `sample` carries the
facts behind it (model, versions, the figures compared). The fingerprint is the
sha256 of the kind and the thing it is about (model, version, feature), so
repeats of the same alert share it.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal

__all__ = ["AlertKind", "alert_subject", "make_alert"]

AlertKind = Literal["canary_promoted", "canary_rolled_back", "drift"]
AlertSeverity = Literal["debug", "info", "warning", "error", "critical"]


def alert_subject(severity: AlertSeverity, agent: str) -> str:
    """`alerts.<severity>.<agent>`."""
    return f"alerts.{severity}.{agent}"


def make_alert(
    kind: AlertKind,
    severity: AlertSeverity,
    *,
    agent: str,
    about: str,
    message: str,
    sample: Mapping[str, Any],
    now: datetime | None = None,
) -> dict[str, Any]:
    """One alert; `about` names its subject (e.g. `model:7`) for the fingerprint."""
    at = (now or datetime.now(UTC)).isoformat(timespec="microseconds")
    return {
        "id": uuid.uuid4().hex,
        "timestamp": at,
        "kind": kind,
        "severity": severity,
        "agent": agent,
        "fingerprint": hashlib.sha256(f"{agent}|{kind}|{about}".encode()).hexdigest()[:32],
        "count": 1,
        "first_seen": at,
        "last_seen": at,
        "message": message,
        "sample": dict(sample),
    }
