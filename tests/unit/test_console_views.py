"""What the console shows: alert groups, blueprint graphs, parameters over time."""

from __future__ import annotations

import json

from common.stubs import common_pb2, trainer_pb2
from services.console import views


def alert(alert_id: str, fingerprint: str, at: float, **extra: object) -> dict[str, object]:
    data: dict[str, object] = {
        "id": alert_id,
        "kind": "error",
        "severity": "error",
        "agent": "trainer",
        "fingerprint": fingerprint,
        "count": 1,
        "timestamp": at,
        "message": "boom",
    }
    data.update(extra)
    return data


def test_alert_view_refuses_what_is_not_an_alert() -> None:
    assert views.alert_view([1]) is None
    assert views.alert_view({"id": "a"}) is None
    parsed = views.alert_view(alert("a", "f", 1.0, timestamp="2026-01-01T00:00:00+00:00"))
    assert parsed is not None
    assert parsed["timestamp"] == 1767225600.0


def test_alerts_group_by_fingerprint_and_floods_show_their_summary() -> None:
    raw = [
        alert("1", "f1", 1.0),
        alert("2", "flood", 2.0, kind="flood", count=10, message="connection: 10 errors"),
        alert("3", "f1", 3.0, count=4),
        alert("4", "flood", 4.0, kind="flood", count=25, message="connection is over: 25 errors"),
    ]
    groups = views.alert_groups(v for v in map(views.alert_view, raw) if v is not None)
    assert [g["fingerprint"] for g in groups] == ["flood", "f1"]
    flood, errors = groups
    assert flood["summary"] and flood["count"] == 25 and flood["alerts"] == 2
    assert not errors["flood"] and errors["count"] == 4 and errors["alerts"] == 2


def test_graph_layout_places_nodes_by_their_longest_path_from_input() -> None:
    blueprint = {
        "nodes": [
            {"id": "up", "op": "linear", "inputs": ["act"], "params": {"out_features": 8}},
            {"id": "skip", "op": "add", "inputs": ["input", "up"]},
            {"id": "down", "op": "linear", "inputs": ["input"], "params": {}},
            {"id": "act", "op": "gelu", "inputs": ["down"]},
        ],
        "output": "skip",
    }
    layout = views.graph_layout(json.dumps(blueprint))
    assert layout is not None
    rows = {n["id"]: n["y"] for n in layout["nodes"]}
    assert rows["input"] < rows["down"] < rows["act"] < rows["up"] < rows["skip"]
    assert len(layout["edges"]) == 5
    assert [n["output"] for n in layout["nodes"] if n["id"] == "skip"] == [True]


def test_graph_layout_of_a_cycle_or_garbage_is_bounded_or_none() -> None:
    cycle = {
        "nodes": [
            {"id": "a", "op": "relu", "inputs": ["b"]},
            {"id": "b", "op": "relu", "inputs": ["a"]},
        ]
    }
    assert views.graph_layout(json.dumps(cycle)) is not None
    assert views.graph_layout("not json") is None
    assert views.graph_layout('{"nodes": 3}') is None


def test_job_event_view_of_each_payload() -> None:
    progress = trainer_pb2.JobEvent(
        sequence=3, step=10, progress=trainer_pb2.TrainingProgress(train_loss=0.5)
    )
    view = views.job_event_view(progress)
    assert view["kind"] == "progress" and view["val_loss"] is None and view["train_loss"] == 0.5
    moved = views.job_event_view(
        trainer_pb2.JobEvent(
            sequence=4,
            slot_transition=trainer_pb2.SlotTransition(
                slot_id="a",
                from_state=common_pb2.SEED_STATE_DORMANT,
                to_state=common_pb2.SEED_STATE_GERMINATED,
            ),
        )
    )
    assert (moved["from_state"], moved["to_state"]) == ("DORMANT", "GERMINATED")
    nan = views.job_event_view(
        trainer_pb2.JobEvent(progress=trainer_pb2.TrainingProgress(train_loss=float("nan")))
    )
    assert nan["train_loss"] is None
