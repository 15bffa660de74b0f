"""The alert JSON, model event subjects, and an alias's earlier versions from its history."""

from __future__ import annotations

from datetime import UTC, datetime

from common.stubs import registry_pb2
from services.router import alert_subject, make_alert
from services.router.catalog import previous_versions
from services.router.events import model_of

SET, ROLLBACK = registry_pb2.ALIAS_ACTION_SET, registry_pb2.ALIAS_ACTION_ROLLBACK


def test_alerts_carry_exactly_the_mesh_alert_keys() -> None:
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    alert = make_alert(
        "drift", "warning", agent="router", about="m:3", message="drift", sample={"v": 3}, now=at
    )
    assert set(alert) == {
        "id", "timestamp", "kind", "severity", "agent", "fingerprint", "count",
        "first_seen", "last_seen", "message", "sample",
    }  # fmt: skip
    assert (
        alert["timestamp"]
        == alert["first_seen"]
        == alert["last_seen"]
        == at.isoformat(timespec="microseconds")
    )
    assert alert["count"] == 1 and alert["sample"] == {"v": 3}
    again = make_alert("drift", "warning", agent="router", about="m:3", message="x", sample={})
    other = make_alert("drift", "warning", agent="router", about="m:4", message="x", sample={})
    assert again["fingerprint"] == alert["fingerprint"] != other["fingerprint"]
    assert again["id"] != alert["id"]
    assert alert_subject("warning", "router") == "alerts.warning.router"


def test_model_events_name_their_model() -> None:
    assert model_of("events.model.mnist-1.promoted") == "mnist-1"
    assert model_of("events.model.m.registered") == "m"
    assert model_of("events.model.m.rolled_back") == "m"
    assert model_of("events.model.m.deleted") is None
    assert model_of("events.job.j.done") is None
    assert model_of("events.model.m") is None


def entry(from_version: int, to_version: int, action: int = SET) -> registry_pb2.AliasHistoryEntry:
    return registry_pb2.AliasHistoryEntry(
        from_version=from_version,
        to_version=to_version,
        action=action,  # type: ignore[arg-type]
    )


def test_previous_versions_are_where_the_alias_pointed_before_newest_first() -> None:
    history = [entry(2, 3), entry(1, 2), entry(0, 1)]
    assert previous_versions(history, current=3, keep=2) == [2, 1]
    assert previous_versions(history, current=3, keep=1) == [2]
    assert previous_versions([entry(0, 1)], current=1, keep=1) == []


def test_a_version_rolled_back_away_from_is_no_fallback() -> None:
    history = [entry(3, 2, ROLLBACK), entry(2, 3), entry(1, 2), entry(0, 1)]
    assert previous_versions(history, current=2, keep=2) == [1]
