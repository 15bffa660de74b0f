"""The console's forms: what a browser posts, turned into the contracts' requests.

Pure. Each form is checked only for what the console itself must read (numbers
are numbers, JSON is JSON); the meaning is checked by the agent that owns it
(the trainer validates a job spec, the compiler a blueprint), and the field path
of its INVALID_ARGUMENT is mapped back onto the form field it came from
(`field_for`), so the error shows next to that field.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from google.protobuf import json_format

from common.stubs import compiler_pb2, trainer_pb2

__all__ = [
    "BLUEPRINT_DEFAULTS",
    "BLUEPRINT_FIELDS",
    "JOB_DEFAULTS",
    "JOB_FIELDS",
    "STRATEGIES",
    "FormResult",
    "blueprint_field_for",
    "compile_request",
    "job_field_for",
    "job_spec",
    "job_spec_from_json",
]

STRATEGIES: Final = ("ucb1", "thompson", "epsilon_greedy", "linucb")
_MAX_TEXT: Final = 20_000

# A small growing job that finishes in seconds on a CPU: the form's defaults.
JOB_DEFAULTS: Final[Mapping[str, str]] = {
    "name": "spirals-console",
    "template": "mlp",
    "model_params": '{"hidden": [8, 8]}',
    "slots": "blocks.0.fc, blocks.1.fc",
    "dataset": "two_spirals",
    "batch_size": "32",
    "data_params": '{"samples": 600, "test_samples": 200}',
    "optimizer": "adamw",
    "lr": "0.01",
    "max_steps": "200",
    "eval_every_steps": "10",
    "seed": "7",
    "device": "cpu",
    "growth": "on",
    "strategy": "ucb1",
    "blueprints": "bottleneck_mlp",
    "plateau_patience": "1",
    "plateau_min_delta": "10",
    "seed_training_steps": "20",
    "blend_steps": "20",
    "holding_steps": "10",
    "embargo_steps": "20",
    "register_as": "",
}
JOB_FIELDS: Final = tuple(JOB_DEFAULTS)
BLUEPRINT_FIELDS: Final = ("name", "slot_kind", "features", "height", "width", "nodes", "output")
# A bottleneck for a 16-wide linear slot: the blueprint form's defaults.
BLUEPRINT_DEFAULTS: Final[Mapping[str, str]] = {
    "name": "my_bottleneck",
    "slot_kind": "linear",
    "features": "16",
    "height": "",
    "width": "",
    "nodes": (
        '[{"name": "down", "op": "linear", "inputs": ["input"], "attrs": {"out_features": 4}},\n'
        ' {"name": "act", "op": "gelu", "inputs": ["down"]},\n'
        ' {"name": "up", "op": "linear", "inputs": ["act"],'
        ' "attrs": {"out_features": "out", "zero_init": true}}]'
    ),
    "output": "up",
}

# Trainer field paths (longest prefix first) -> the form field that sets them.
_JOB_PATHS: Final[Sequence[tuple[str, str]]] = (
    ("spec.model.params", "model_params"),
    ("spec.model", "template"),
    ("spec.slots", "slots"),
    ("spec.data.dataset", "dataset"),
    ("spec.data.batch_size", "batch_size"),
    ("spec.data", "data_params"),
    ("spec.optimizer.lr", "lr"),
    ("spec.optimizer", "optimizer"),
    ("spec.epochs", "max_steps"),
    ("spec.max_steps", "max_steps"),
    ("spec.eval_every_steps", "eval_every_steps"),
    ("spec.seed", "seed"),
    ("spec.device", "device"),
    ("spec.name", "name"),
    ("spec.register_as", "register_as"),
    ("spec.growth.strategy", "strategy"),
    ("spec.growth.blueprints", "blueprints"),
    ("spec.growth.plateau_patience", "plateau_patience"),
    ("spec.growth.plateau_min_delta", "plateau_min_delta"),
    ("spec.growth.seed_training_steps", "seed_training_steps"),
    ("spec.growth.blend_steps", "blend_steps"),
    ("spec.growth.holding_steps", "holding_steps"),
    ("spec.growth.embargo_steps", "embargo_steps"),
    ("spec.growth", "growth"),
)
_BLUEPRINT_PATHS: Final[Sequence[tuple[str, str]]] = (
    ("blueprint.ir.name", "name"),
    ("blueprint.ir.output", "output"),
    ("blueprint.ir.nodes", "nodes"),
    ("blueprint.ir", "nodes"),
    ("blueprint", "nodes"),
    ("target.linear", "features"),
    ("target.conv2d.height", "height"),
    ("target.conv2d.width", "width"),
    ("target.conv2d", "features"),
    ("target", "slot_kind"),
)


def _field_for(path: str, table: Sequence[tuple[str, str]]) -> str | None:
    for prefix, name in table:
        if path == prefix or path.startswith((prefix + ".", prefix + "[")):
            return name
    return None


def job_field_for(path: str) -> str | None:
    """The job form's field for a trainer field path (`spec.growth.blend_steps`)."""
    return _field_for(path, _JOB_PATHS)


def blueprint_field_for(path: str) -> str | None:
    """The blueprint form's field for a compiler field path (`blueprint.ir.nodes[0]...`)."""
    return _field_for(path, _BLUEPRINT_PATHS)


@dataclass
class FormResult:
    """A form read: the values as posted (to show again) and the problems per field."""

    values: dict[str, str]
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors


def _values(form: Mapping[str, Any], names: Sequence[str]) -> dict[str, str]:
    out = {}
    for name in names:
        raw = form.get(name, "")
        out[name] = (raw if isinstance(raw, str) else "")[:_MAX_TEXT].strip()
    return out


def _int(result: FormResult, name: str, *, minimum: int = 0, required: bool = False) -> int:
    raw = result.values.get(name, "")
    if not raw:
        if required:
            result.errors[name] = "required"
        return 0
    try:
        value = int(raw)
    except ValueError:
        result.errors[name] = f"{raw!r} is not a whole number"
        return 0
    if value < minimum:
        result.errors[name] = f"must be >= {minimum}"
    return value


def _float(result: FormResult, name: str) -> float:
    raw = result.values.get(name, "")
    if not raw:
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        result.errors[name] = f"{raw!r} is not a number"
        return 0.0
    if not math.isfinite(value):
        result.errors[name] = "must be a finite number"
    return value


def _json_object(result: FormResult, name: str) -> dict[str, Any]:
    raw = result.values.get(name, "")
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        result.errors[name] = f"not JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        return {}
    if not isinstance(value, dict):
        result.errors[name] = 'a JSON object, e.g. {"hidden": [8, 8]}'
        return {}
    return value


def _names(raw: str) -> list[str]:
    return [part for part in re.split(r"[\s,]+", raw) if part]


def job_spec(form: Mapping[str, Any]) -> tuple[trainer_pb2.JobSpec | None, FormResult]:
    """The `JobSpec` of the job form; None with the form's problems when it cannot be read."""
    result = FormResult(_values(form, JOB_FIELDS))
    v = result.values
    spec: dict[str, Any] = {
        "name": v["name"],
        "model": {"template": v["template"], "params": _json_object(result, "model_params")},
        "slots": [{"module_path": p} for p in _names(v["slots"])],
        "data": {
            "dataset": v["dataset"],
            "batch_size": _int(result, "batch_size"),
            "params": _json_object(result, "data_params"),
        },
        "optimizer": {"name": v["optimizer"], "lr": _float(result, "lr")},
        "max_steps": _int(result, "max_steps", minimum=1, required=True),
        "eval_every_steps": _int(result, "eval_every_steps"),
        "seed": _int(result, "seed"),
        "device": v["device"],
        "register_as": v["register_as"],
    }
    if v["growth"] in ("on", "true", "1"):
        strategy = v["strategy"] or "ucb1"
        if strategy not in STRATEGIES:
            result.errors["strategy"] = f"one of {', '.join(STRATEGIES)}"
        spec["growth"] = {
            "enabled": True,
            "strategy": "SELECTION_STRATEGY_" + strategy.upper(),
            "blueprints": _names(v["blueprints"]),
            "plateau_patience": _int(result, "plateau_patience"),
            "plateau_min_delta": _float(result, "plateau_min_delta"),
            "seed_training_steps": _int(result, "seed_training_steps"),
            "blend_steps": _int(result, "blend_steps"),
            "holding_steps": _int(result, "holding_steps"),
            "embargo_steps": _int(result, "embargo_steps"),
        }
    if not result.ok:
        return None, result
    try:
        return json_format.ParseDict(spec, trainer_pb2.JobSpec()), result
    except json_format.ParseError as exc:
        result.errors["form"] = str(exc)
        return None, result


def job_spec_from_json(data: object) -> trainer_pb2.JobSpec:
    """The `JobSpec` of an API body's `spec` (the proto's JSON form); ValueError says why."""
    if not isinstance(data, dict):
        raise ValueError("spec: a JSON object with JobSpec's fields")
    try:
        return json_format.ParseDict(data, trainer_pb2.JobSpec())
    except json_format.ParseError as exc:
        raise ValueError(f"spec: {exc}") from None


def _node(raw: object, index: int) -> dict[str, Any]:
    """A node in BlueprintIR's JSON form; the README's form (`id`, `params`) is accepted too."""
    if not isinstance(raw, dict):
        raise ValueError(f"nodes[{index}]: a JSON object with name, op, inputs and attrs")
    node = dict(raw)
    if "id" in node and "name" not in node:
        node["name"] = node.pop("id")
    if "params" in node and "attrs" not in node:
        node["attrs"] = node.pop("params")
    return node


def compile_request(
    form: Mapping[str, Any],
) -> tuple[compiler_pb2.CompileRequest | None, FormResult]:
    """The `CompileRequest` of the blueprint form; None with its problems when unreadable."""
    result = FormResult(_values(form, BLUEPRINT_FIELDS))
    v = result.values
    kind = v["slot_kind"] or "linear"
    target = compiler_pb2.SlotSpec()
    if kind == "linear":
        width = _int(result, "features", minimum=1, required=True)
        target.linear.in_features = target.linear.out_features = width
    elif kind == "conv2d":
        channels = _int(result, "features", minimum=1, required=True)
        target.conv2d.in_channels = target.conv2d.out_channels = channels
        target.conv2d.height = _int(result, "height", minimum=1, required=True)
        target.conv2d.width = _int(result, "width", minimum=1, required=True)
    else:
        result.errors["slot_kind"] = "linear or conv2d"
    nodes: list[dict[str, Any]] = []
    if not v["nodes"]:
        result.errors["nodes"] = "required: a JSON list of nodes"
    else:
        try:
            raw = json.loads(v["nodes"])
            if not isinstance(raw, list):
                raise ValueError("a JSON list of nodes")
            nodes = [_node(item, i) for i, item in enumerate(raw)]
        except json.JSONDecodeError as exc:
            result.errors["nodes"] = f"not JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        except ValueError as exc:
            result.errors["nodes"] = str(exc)
    if not result.ok:
        return None, result
    try:
        ir = json_format.ParseDict(
            {"ir_version": 1, "name": v["name"], "nodes": nodes, "output": v["output"]},
            compiler_pb2.BlueprintIR(),
        )
    except json_format.ParseError as exc:
        result.errors["nodes"] = str(exc)
        return None, result
    spec = compiler_pb2.BlueprintSpec(ir=ir)
    return compiler_pb2.CompileRequest(blueprint=spec, target=target), result
