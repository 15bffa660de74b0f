"""What the pages and the JSON API show: the contracts' messages as plain data.

Pure: protos (and alert JSON) in, dicts of JSON-able values out; no I/O. The
templates and `/api/...` render the same dicts, so the page and the API never
disagree.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final

from google.protobuf import json_format, timestamp_pb2

from common.stubs import (
    common_pb2,
    compiler_pb2,
    registry_pb2,
    router_pb2,
    supervisor_pb2,
    trainer_pb2,
)

__all__ = [
    "agent_view",
    "alert_groups",
    "alert_view",
    "blueprint_views",
    "graph_layout",
    "history_view",
    "job_event_view",
    "job_view",
    "mesh_view",
    "model_summary_view",
    "route_view",
    "stats_view",
    "version_view",
]

View = dict[str, Any]

_SEVERITIES: Final = ("debug", "info", "warning", "error", "critical")


def _when(stamp: timestamp_pb2.Timestamp) -> str | None:
    if not stamp.seconds and not stamp.nanos:
        return None
    return stamp.ToDatetime(tzinfo=UTC).isoformat(timespec="seconds")


def _enum(enum: Any, value: int, prefix: str) -> str:
    try:
        name: str = enum.Name(value)
    except ValueError:
        return "UNKNOWN"
    return name.removeprefix(prefix)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _metrics(values: Mapping[str, float]) -> dict[str, float | None]:
    return {k: _finite(v) for k, v in sorted(values.items())}


# ----------------------------------------------------------------------------- mesh


def agent_view(a: supervisor_pb2.AgentStatus) -> View:
    return {
        "agent": a.agent,
        "group": a.group,
        "machine": a.machine,
        "state": _enum(supervisor_pb2.AgentState, a.state, "AGENT_STATE_"),
        "pid": a.pid or None,
        "uptime_s": round(a.uptime_s, 1),
        "restarts": a.restarts,
        "breaker": _enum(supervisor_pb2.BreakerState, a.breaker_state, "BREAKER_STATE_").lower(),
        "required": a.required,
        "port": a.port or None,
        "health": _enum(common_pb2.HealthStatus, a.last_health_status, "HEALTH_STATUS_").lower(),
        "health_latency_ms": round(a.last_health_latency_ms, 2)
        if a.last_health_latency_ms
        else None,
        "issues": list(a.last_health_issues),
        "message": a.message,
    }


def mesh_view(reply: supervisor_pb2.GetStatusResponse) -> View:
    return {
        "machine": reply.machine,
        "groups": list(reply.groups),
        "mesh_state": _enum(supervisor_pb2.MeshState, reply.mesh_state, "MESH_STATE_"),
        "agents": [agent_view(a) for a in reply.agents],
        "timestamp": _when(reply.timestamp),
    }


def _text(value: object, limit: int = 2000) -> str:
    text = value if isinstance(value, str) else ("" if value is None else str(value))
    return text if len(text) <= limit else text[:limit] + "..."


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _time(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def alert_view(data: object) -> View | None:
    """An alert of the `ALERTS` stream as shown; None for a message that is not one."""
    if not isinstance(data, Mapping):
        return None
    alert_id, kind, agent = data.get("id"), data.get("kind"), data.get("agent")
    if not all(isinstance(v, str) and v for v in (alert_id, kind, agent)):
        return None
    severity = data.get("severity")
    count = _number(data.get("count"))
    return {
        "id": alert_id,
        "kind": kind,
        "severity": severity if severity in _SEVERITIES else "error",
        "agent": agent,
        "fingerprint": _text(data.get("fingerprint"), 128) or str(alert_id),
        "count": int(count) if count is not None else 1,
        "timestamp": _time(data.get("timestamp")),
        "first_seen": _time(data.get("first_seen")),
        "last_seen": _time(data.get("last_seen")),
        "message": _text(data.get("message")),
    }


def alert_groups(alerts: Iterable[View]) -> list[View]:
    """Alerts grouped by fingerprint, newest group first.

    A group shows its latest alert, how many alerts it had and the count they
    stand for (the latest count: alerts carry running totals). A `flood` group
    whose latest alert is the summary (`... is over ...`) is marked `summary`.
    """
    groups: dict[str, View] = {}
    for alert in alerts:
        key = str(alert["fingerprint"])
        group = groups.get(key)
        if group is None:
            group = groups[key] = {"alerts": 0, "latest": alert, "first": alert}
        group["alerts"] += 1
        if (alert["timestamp"] or 0) >= (group["latest"]["timestamp"] or 0):
            group["latest"] = alert
    out = []
    for key, group in groups.items():
        latest = group["latest"]
        out.append(
            {
                "fingerprint": key,
                "kind": latest["kind"],
                "severity": latest["severity"],
                "agent": latest["agent"],
                "message": latest["message"],
                "count": latest["count"],
                "alerts": group["alerts"],
                "first_seen": group["first"]["first_seen"] or group["first"]["timestamp"],
                "last_seen": latest["last_seen"] or latest["timestamp"],
                "timestamp": latest["timestamp"],
                "flood": latest["kind"] == "flood",
                "summary": latest["kind"] == "flood" and " is over" in latest["message"],
            }
        )
    out.sort(key=lambda g: g["timestamp"] or 0, reverse=True)
    return out


# ----------------------------------------------------------------------------- training


def job_state(value: int) -> str:
    return _enum(common_pb2.JobState, value, "JOB_STATE_")


def seed_state(value: int) -> str:
    return _enum(common_pb2.SeedState, value, "SEED_STATE_")


def job_view(job: trainer_pb2.Job, *, detail: bool = False) -> View:
    p = job.progress
    view: View = {
        "job_id": job.job_id,
        "name": job.spec.name,
        "state": job_state(job.state),
        "message": job.message,
        "step": p.step,
        "epoch": p.epoch,
        "total_steps": p.total_steps or None,
        "train_loss": _finite(p.train_loss),
        "val_loss": _finite(p.val_loss) if p.HasField("val_loss") else None,
        "metrics": _metrics(p.metrics),
        "param_count": p.param_count,
        "created_at": _when(job.created_at),
        "started_at": _when(job.started_at),
        "finished_at": _when(job.finished_at),
        "registered": (
            {"name": job.registered_model.name, "version": job.registered_model.version}
            if job.registered_model.name
            else None
        ),
        "last_event_sequence": job.last_event_sequence,
    }
    if detail:
        view["slots"] = [
            {
                "slot_id": s.slot_id,
                "kind": _enum(common_pb2.SlotKind, s.kind, "SLOT_KIND_").lower(),
                "state": seed_state(s.state),
                "blueprint": s.blueprint,
                "kernel_id": s.kernel_id,
                "alpha": _finite(s.alpha),
                "added_params": s.added_params,
                "steps_in_state": s.steps_in_state,
            }
            for s in job.slots
        ]
        view["checkpoint_path"] = job.checkpoint_path
        view["spec"] = json_format.MessageToDict(job.spec, preserving_proto_field_name=True)
    return view


def job_event_view(event: trainer_pb2.JobEvent) -> View:
    view: View = {
        "sequence": event.sequence,
        "step": event.step,
        "epoch": event.epoch,
        "timestamp": _when(event.timestamp),
    }
    kind = event.WhichOneof("payload")
    view["kind"] = kind or "unknown"
    if kind == "progress":
        p = event.progress
        view.update(
            train_loss=_finite(p.train_loss),
            val_loss=_finite(p.val_loss) if p.HasField("val_loss") else None,
            metrics=_metrics(p.metrics),
            learning_rate=_finite(p.learning_rate),
            samples_per_s=_finite(p.samples_per_s),
            # 0 until the job has built its model.
            param_count=p.param_count or None,
        )
    elif kind == "slot_transition":
        t = event.slot_transition
        view.update(
            slot_id=t.slot_id,
            from_state=seed_state(t.from_state),
            to_state=seed_state(t.to_state),
            alpha=_finite(t.alpha),
            blueprint=t.blueprint,
            kernel_id=t.kernel_id,
            reason=t.reason,
        )
    elif kind == "checkpoint_saved":
        saved = event.checkpoint_saved
        view.update(path=saved.path, size_bytes=saved.size_bytes)
    elif kind == "state_change":
        c = event.state_change
        view.update(
            from_state=job_state(c.from_state), to_state=job_state(c.to_state), message=c.message
        )
    return view


# ----------------------------------------------------------------------------- models


def model_summary_view(s: registry_pb2.ModelSummary) -> View:
    return {
        "name": s.name,
        "latest_version": s.latest_version,
        "version_count": s.version_count,
        "aliases": dict(sorted(s.aliases.items())),
        "metrics": {},
        "created_at": _when(s.created_at),
        "updated_at": _when(s.updated_at),
    }


def version_view(v: registry_pb2.ModelVersion) -> View:
    return {
        "name": v.name,
        "version": v.version,
        "description": v.description,
        "metrics": _metrics(v.metrics),
        "tags": dict(sorted(v.tags.items())),
        "lineage": {
            "job_id": v.lineage.job_id,
            "kernel_ids": list(v.lineage.kernel_ids),
            "parent_version": v.lineage.parent_version or None,
        },
        "aliases": list(v.aliases),
        "created_at": _when(v.created_at),
        "size_bytes": sum(f.size_bytes for f in v.files),
    }


def history_view(e: registry_pb2.AliasHistoryEntry) -> View:
    return {
        "alias": e.alias,
        "from_version": e.from_version or None,
        "to_version": e.to_version or None,
        "action": _enum(registry_pb2.AliasAction, e.action, "ALIAS_ACTION_").lower(),
        "actor": e.actor,
        "reason": e.reason,
        "timestamp": _when(e.timestamp),
    }


def route_view(r: router_pb2.Route) -> View:
    total = sum(t.weight for t in r.targets if t.weight > 0)
    return {
        "model_name": r.model_name,
        "alias": r.alias,
        "targets": [
            {
                "version": t.version,
                "weight": t.weight,
                "share": (t.weight / total) if total > 0 and t.weight > 0 else 0.0,
            }
            for t in r.targets
        ],
        "explicit": r.explicit,
        "actor": r.actor,
        "reason": r.reason,
        "updated_at": _when(r.updated_at),
    }


def _serving(s: router_pb2.ServingStats) -> View:
    return {
        "requests": s.requests,
        "errors": s.errors,
        "p50_ms": round(s.latency_p50_us / 1000, 3),
        "p99_ms": round(s.latency_p99_us / 1000, 3),
        "cost": _finite(s.cost),
    }


def stats_view(reply: router_pb2.RouterServiceGetStatsResponse) -> View:
    """Serving stats per version (keyed by version number as text, for JSON)."""
    versions: dict[str, View] = {}
    for v in reply.versions:
        versions[str(v.version)] = {
            **_serving(v.stats),
            "traffic_share": {a: round(s, 4) for a, s in sorted(v.traffic_share.items())},
        }
    return {
        "window_s": reply.window_s,
        "versions": versions,
        "replicas": [
            {
                "replica_id": r.replica_id,
                "version": r.version,
                "device": r.device,
                "health": _enum(common_pb2.HealthStatus, r.health, "HEALTH_STATUS_").lower(),
                "ejected": r.ejected,
                "in_flight": r.in_flight,
                "cost_per_request": _finite(r.cost_per_request),
                **_serving(r.stats),
            }
            for r in reply.replicas
        ],
    }


# ----------------------------------------------------------------------------- blueprints

_NODE_W: Final = 150
_NODE_H: Final = 34
_GAP_X: Final = 24
_GAP_Y: Final = 22


def graph_layout(blueprint_json: str) -> View | None:
    """Boxes and arrows for a blueprint's graph, laid out top (input) to bottom (output).

    Each node sits on the row of its longest path from `input`; None when the text
    is not a blueprint graph (an older or foreign format).
    """
    try:
        data = json.loads(blueprint_json)
    except (json.JSONDecodeError, TypeError):
        return None
    raw_nodes = data.get("nodes") if isinstance(data, dict) else None
    if not isinstance(raw_nodes, list) or not raw_nodes:
        return None
    nodes: dict[str, tuple[str, list[str], Mapping[str, Any]]] = {}
    for raw in raw_nodes[:200]:
        if not isinstance(raw, dict):
            return None
        node_id = raw.get("id", raw.get("name"))
        inputs = raw.get("inputs", [])
        params = raw.get("params", raw.get("attrs", {}))
        if not isinstance(node_id, str) or not isinstance(inputs, list):
            return None
        nodes[node_id] = (
            str(raw.get("op", "?")),
            [str(i) for i in inputs],
            params if isinstance(params, dict) else {},
        )
    depth: dict[str, int] = {"input": 0}
    # Longest path by relaxation, bounded by the node count (a cycle never settles).
    for _ in range(len(nodes) + 1):
        changed = False
        for node_id, (_, inputs, _) in nodes.items():
            want = 1 + max((depth.get(i, 0) for i in inputs), default=0)
            if depth.get(node_id) != want:
                depth[node_id] = want
                changed = True
        if not changed:
            break
    rows: dict[int, list[str]] = {}
    for node_id in ["input", *nodes]:
        rows.setdefault(depth.get(node_id, 0), []).append(node_id)
    widest = max(len(r) for r in rows.values())
    width = widest * (_NODE_W + _GAP_X) + _GAP_X
    centres: dict[str, tuple[float, float]] = {}
    boxes = []
    for row, members in sorted(rows.items()):
        span = len(members) * (_NODE_W + _GAP_X) - _GAP_X
        left = (width - span) / 2
        for i, node_id in enumerate(members):
            x = left + i * (_NODE_W + _GAP_X)
            y = _GAP_Y + row * (_NODE_H + _GAP_Y)
            centres[node_id] = (x + _NODE_W / 2, y + _NODE_H / 2)
            op, _, params = nodes.get(node_id, ("input", [], {}))
            label = node_id if op == "input" else f"{node_id}: {op}"
            boxes.append(
                {
                    "id": node_id,
                    "op": op,
                    "label": label[:24],
                    "params": ", ".join(f"{k}={v}" for k, v in sorted(params.items()))[:60],
                    "x": round(x, 1),
                    "y": round(y, 1),
                    "output": node_id == data.get("output"),
                }
            )
    edges = []
    for node_id, (_, inputs, _) in nodes.items():
        for source in inputs:
            if source in centres:
                (x1, y1), (x2, y2) = centres[source], centres[node_id]
                edges.append(
                    {
                        "x1": round(x1, 1),
                        "y1": round(y1 + _NODE_H / 2, 1),
                        "x2": round(x2, 1),
                        "y2": round(y2 - _NODE_H / 2, 1),
                    }
                )
    height = (max(rows) + 1) * (_NODE_H + _GAP_Y) + _GAP_Y
    return {
        "nodes": boxes,
        "edges": edges,
        "width": width,
        "height": height,
        "node_w": _NODE_W,
        "node_h": _NODE_H,
    }


def _target(spec: compiler_pb2.SlotSpec) -> str:
    kind = spec.WhichOneof("kind")
    if kind == "linear":
        return f"linear {spec.linear.in_features}->{spec.linear.out_features}"
    if kind == "conv2d":
        c = spec.conv2d
        return f"conv2d {c.in_channels}x{c.height}x{c.width}->{c.out_channels}"
    return "-"


def kernel_view(k: compiler_pb2.KernelInfo) -> View:
    meta, report = k.metadata, k.validation
    return {
        "kernel_id": k.kernel.kernel_id,
        "blueprint_name": meta.blueprint_name,
        "target": _target(meta.target),
        "param_count": meta.param_count,
        "latency_ratio": _finite(report.latency_ratio) if report.latency_ratio else None,
        "passed": report.passed,
        "size_bytes": k.kernel.size_bytes,
        "hits": k.hits,
        "created_at": _when(meta.created_at),
        "graph": graph_layout(meta.blueprint_json),
    }


def blueprint_views(
    catalogue: Sequence[compiler_pb2.BlueprintInfo], kernels: Sequence[compiler_pb2.KernelInfo]
) -> tuple[list[View], list[View]]:
    """The catalogue, each entry with its newest kernel (graph, latency ratio) when one is
    stored, and the kernels of custom blueprints (names the catalogue does not hold)."""
    newest: dict[str, View] = {}
    custom: list[View] = []
    names = {b.name for b in catalogue}
    for k in kernels:  # most recently used first
        view = kernel_view(k)
        if view["blueprint_name"] in names:
            newest.setdefault(view["blueprint_name"], view)
        else:
            custom.append(view)
    entries = [
        {
            "name": b.name,
            "description": b.description,
            "slot_kinds": [
                _enum(common_pb2.SlotKind, s, "SLOT_KIND_").lower() for s in b.slot_kinds
            ],
            "param_count": b.param_count,
            "target": _target(b.param_count_target),
            "default_params": json_format.MessageToDict(b.default_params),
            "kernel": newest.get(b.name),
        }
        for b in catalogue
    ]
    return entries, custom
