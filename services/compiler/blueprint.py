"""The blueprint IR: a small declarative DAG of whitelisted ops that a seed slot can grow.

A blueprint names the slot it targets (`LinearSlot`: (B, F) -> (B, F), or
`Conv2dSlot`: (B, C, H, W) -> (B, C, H, W)) and lists its nodes; each node has
an `id`, an `op`, the op's `params` and its `inputs` (node ids, or `"input"` for
the kernel's input). `output` names the node whose value the kernel returns.

    {"name": "bottleneck_mlp", "version": 1,
     "slot": {"kind": "linear", "features": 64},
     "nodes": [
       {"id": "down", "op": "linear", "params": {"out_features": 16}, "inputs": ["input"]},
       {"id": "act", "op": "gelu", "inputs": ["down"]},
       {"id": "up", "op": "linear", "params": {"out_features": 64, "zero_init": true},
        "inputs": ["act"]}],
     "output": "up"}

Shapes below leave the batch dimension out: `(F,)` for features, `(C, H, W)` for
images. Ops and their params (defaults in brackets):

- `linear` (F,) -> (out_features,): out_features, bias [true], zero_init [false]
- `conv2d` (C, H, W) -> (out_channels, H', W'): out_channels, kernel_size,
  stride [1], padding [0] (an int, or "same" for stride 1 and an odd effective
  kernel), dilation [1], groups [1] (depthwise: groups = C = out_channels),
  bias [true], zero_init [false]
- `batch_norm`, `layer_norm` (shape kept): eps [1e-5], affine [true], zero_init
  [false] (zeroes the scale); batch_norm also momentum [0.1]. On images,
  layer_norm normalises the channels of each position (ConvNeXt style).
- `relu`, `silu` (no params), `gelu`: approximate ["none"] or "tanh"
- `add`, `mul` (two or more inputs of one shape; `mul` gates one branch by another)
- `squeeze_excite` (shape kept): reduction [4]; scales each channel (feature)
  by a sigmoid gate computed from the pooled input
- `attention_head` (shape kept): single-head self-attention with projections to
  head_dim and back, bias [true], zero_init [false] (zeroes the output
  projection). On images the tokens are the H*W positions with C features each;
  on features, `tokens` splits the F features into `tokens` tokens of F/tokens
  features each (tokens must divide F).
- `low_rank` (LoRA-style adapter, no bias): rank, out_features [input width;
  channels on images, through 1x1 convolutions], scale [1.0], zero_init [true]
  (zeroes the up projection).

`zero_init` is how a blueprint makes its output exactly zero at graft time:
zero the last projection, whose weight still gets a gradient at init.

`parse_blueprint` turns untrusted data into a `Blueprint` and `analyse_blueprint`
checks it against its slot and the limits; both raise `InvalidArgumentError`
whose `field` is the path of the offending value (`nodes[3].params.out_features`),
or `ResourceExhaustedError` when a limit is exceeded.
"""

from __future__ import annotations

import heapq
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal, TypeAlias

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StringConstraints,
    TypeAdapter,
    ValidationError,
)
from pydantic_core import ErrorDetails
from torch import nn

from common.errors import InvalidArgumentError, ResourceExhaustedError

__all__ = [
    "INPUT",
    "OPS",
    "AddNode",
    "AttentionHeadNode",
    "AttentionHeadParams",
    "BatchNormNode",
    "BatchNormParams",
    "Blueprint",
    "BlueprintAnalysis",
    "BlueprintLimits",
    "Conv2dNode",
    "Conv2dParams",
    "Conv2dSlot",
    "GeluNode",
    "GeluParams",
    "LayerNormNode",
    "LayerNormParams",
    "LinearNode",
    "LinearParams",
    "LinearSlot",
    "LowRankNode",
    "LowRankParams",
    "MulNode",
    "NoParams",
    "Node",
    "ReluNode",
    "SiluNode",
    "SlotSpec",
    "SqueezeExciteNode",
    "SqueezeExciteParams",
    "analyse_blueprint",
    "canonical_json",
    "count_parameters",
    "parse_blueprint",
    "parse_slot",
    "slot_shape",
]

INPUT: Final = "input"
"""The name by which a node's `inputs` refer to the kernel's input."""

PositiveInt = Annotated[StrictInt, Field(gt=0)]
NonNegativeInt = Annotated[StrictInt, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NodeId = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,31}$")]
NodeRef = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- slots ------------------------------------------------------------------------------------


class LinearSlot(_Frozen):
    """A slot after a Linear layer: the kernel maps (B, features) -> (B, features)."""

    kind: Literal["linear"] = "linear"
    features: PositiveInt


class Conv2dSlot(_Frozen):
    """A slot after a Conv2d layer: the kernel maps (B, C, H, W) -> (B, C, H, W)."""

    kind: Literal["conv2d"] = "conv2d"
    channels: PositiveInt
    height: PositiveInt
    width: PositiveInt


SlotSpec: TypeAlias = Annotated[LinearSlot | Conv2dSlot, Field(discriminator="kind")]
_SLOT_ADAPTER: TypeAdapter[LinearSlot | Conv2dSlot] = TypeAdapter(SlotSpec)
_SLOT_KINDS: Final = frozenset({"linear", "conv2d"})


def slot_shape(slot: LinearSlot | Conv2dSlot) -> tuple[int, ...]:
    """The kernel's input and output shape for `slot`, without the batch dimension."""
    if isinstance(slot, LinearSlot):
        return (slot.features,)
    return (slot.channels, slot.height, slot.width)


# --- op params --------------------------------------------------------------------------------


class NoParams(_Frozen):
    """Params of an op that takes none (relu, silu, add, mul)."""


class LinearParams(_Frozen):
    out_features: PositiveInt
    bias: StrictBool = True
    zero_init: StrictBool = False


class Conv2dParams(_Frozen):
    out_channels: PositiveInt
    kernel_size: PositiveInt
    stride: PositiveInt = 1
    padding: NonNegativeInt | Literal["same"] = 0
    dilation: PositiveInt = 1
    groups: PositiveInt = 1
    bias: StrictBool = True
    zero_init: StrictBool = False


class BatchNormParams(_Frozen):
    eps: PositiveFloat = 1e-5
    momentum: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 0.1
    affine: StrictBool = True
    zero_init: StrictBool = False


class LayerNormParams(_Frozen):
    eps: PositiveFloat = 1e-5
    affine: StrictBool = True
    zero_init: StrictBool = False


class GeluParams(_Frozen):
    approximate: Literal["none", "tanh"] = "none"


class SqueezeExciteParams(_Frozen):
    reduction: PositiveInt = 4


class AttentionHeadParams(_Frozen):
    head_dim: PositiveInt
    tokens: PositiveInt | None = None
    bias: StrictBool = True
    zero_init: StrictBool = False


class LowRankParams(_Frozen):
    rank: PositiveInt
    out_features: PositiveInt | None = None
    scale: PositiveFloat = 1.0
    zero_init: StrictBool = True


# --- nodes ------------------------------------------------------------------------------------


class _NodeBase(_Frozen):
    id: NodeId
    inputs: tuple[NodeRef, ...] = Field(min_length=1)


class LinearNode(_NodeBase):
    op: Literal["linear"]
    params: LinearParams


class Conv2dNode(_NodeBase):
    op: Literal["conv2d"]
    params: Conv2dParams


class BatchNormNode(_NodeBase):
    op: Literal["batch_norm"]
    params: BatchNormParams = BatchNormParams()


class LayerNormNode(_NodeBase):
    op: Literal["layer_norm"]
    params: LayerNormParams = LayerNormParams()


class ReluNode(_NodeBase):
    op: Literal["relu"]
    params: NoParams = NoParams()


class GeluNode(_NodeBase):
    op: Literal["gelu"]
    params: GeluParams = GeluParams()


class SiluNode(_NodeBase):
    op: Literal["silu"]
    params: NoParams = NoParams()


class AddNode(_NodeBase):
    op: Literal["add"]
    params: NoParams = NoParams()


class MulNode(_NodeBase):
    op: Literal["mul"]
    params: NoParams = NoParams()


class SqueezeExciteNode(_NodeBase):
    op: Literal["squeeze_excite"]
    params: SqueezeExciteParams = SqueezeExciteParams()


class AttentionHeadNode(_NodeBase):
    op: Literal["attention_head"]
    params: AttentionHeadParams


class LowRankNode(_NodeBase):
    op: Literal["low_rank"]
    params: LowRankParams


_NodeUnion: TypeAlias = (
    LinearNode
    | Conv2dNode
    | BatchNormNode
    | LayerNormNode
    | ReluNode
    | GeluNode
    | SiluNode
    | AddNode
    | MulNode
    | SqueezeExciteNode
    | AttentionHeadNode
    | LowRankNode
)
Node: TypeAlias = Annotated[_NodeUnion, Field(discriminator="op")]

OPS: Final[tuple[str, ...]] = (
    "linear",
    "conv2d",
    "batch_norm",
    "layer_norm",
    "relu",
    "gelu",
    "silu",
    "add",
    "mul",
    "squeeze_excite",
    "attention_head",
    "low_rank",
)
_MULTI_INPUT_OPS: Final = frozenset({"add", "mul"})
# Node ids become submodule names; these would shadow what a module already has.
_RESERVED_IDS: Final = frozenset(dir(nn.ModuleDict()))


class Blueprint(_Frozen):
    """A blueprint whose structure is valid; `analyse_blueprint` checks its graph and shapes."""

    name: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
    version: PositiveInt = 1
    description: Annotated[str, StringConstraints(max_length=2000)] = ""
    slot: SlotSpec
    nodes: tuple[Node, ...] = Field(min_length=1)
    output: NodeId


class BlueprintLimits(_Frozen):
    """What one kernel may cost; exceeding any is a `ResourceExhaustedError`."""

    max_nodes: PositiveInt = 32
    max_depth: PositiveInt = 24
    max_params: PositiveInt = 5_000_000
    # Per sample, for any one node's output (and an attention map).
    max_activation_elements: PositiveInt = 4_194_304
    max_attention_tokens: PositiveInt = 1024


# --- parsing ----------------------------------------------------------------------------------


def parse_blueprint(data: Mapping[str, Any] | str | bytes) -> Blueprint:
    """A `Blueprint` from a mapping or JSON text; bad structure names its field.

    Raises `InvalidArgumentError` with `field` set to the path of the first
    problem (`nodes[3].op` for an unknown op, `nodes[3].params.foo` for an unknown
    param, `nodes[3].params.out_features` for a non-positive size).
    """
    try:
        if isinstance(data, str | bytes):
            return Blueprint.model_validate_json(data)
        return Blueprint.model_validate(data)
    except ValidationError as exc:
        raise _invalid_argument(exc, "") from None


def parse_slot(data: Mapping[str, Any] | str | bytes) -> LinearSlot | Conv2dSlot:
    """A slot spec from a mapping or JSON text; errors name the field under `slot`."""
    try:
        if isinstance(data, str | bytes):
            return _SLOT_ADAPTER.validate_json(data)
        return _SLOT_ADAPTER.validate_python(data)
    except ValidationError as exc:
        raise _invalid_argument(exc, "slot") from None


def _invalid_argument(exc: ValidationError, prefix: str) -> InvalidArgumentError:
    errors = exc.errors(include_url=False)
    first = errors[0]
    field, message = _describe(first, prefix)
    more = len(errors) - 1
    if more:
        message += f" (and {more} more problem{'s' if more > 1 else ''})"
    return InvalidArgumentError(message, field=field)


def _describe(error: ErrorDetails, prefix: str) -> tuple[str, str]:
    loc = [prefix, *error["loc"]] if prefix else list(error["loc"])
    # The tagged unions (a node by `op`, a slot by `kind`) put the tag in the location:
    # ("nodes", 3, "linear", "params", ...) and ("slot", "conv2d", "height").
    if len(loc) > 2 and loc[0] == "nodes" and isinstance(loc[1], int) and loc[2] in OPS:
        del loc[2]
    if len(loc) > 1 and loc[0] == "slot" and loc[1] in _SLOT_KINDS:
        del loc[1]
    field = ""
    for item in loc:
        field += f"[{item}]" if isinstance(item, int) else (f".{item}" if field else str(item))
    kind = error["type"]
    ctx = error.get("ctx", {})
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        tag_name = str(ctx.get("discriminator", "")).strip("'")
        field = f"{field}.{tag_name}" if field else tag_name
        if kind == "union_tag_not_found":
            return field, "missing"
        allowed = OPS if tag_name == "op" else tuple(sorted(_SLOT_KINDS))
        return field, f"unknown {tag_name} {ctx.get('tag')!r}; expected one of {', '.join(allowed)}"
    if kind == "extra_forbidden":
        in_params = len(loc) > 1 and loc[-2] == "params"
        return field, "unknown parameter" if in_params else "unknown field"
    if kind == "missing":
        return field, "missing"
    return field, f"{error['msg']} (got {_short(error.get('input'))})"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --- analysis ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlueprintAnalysis:
    """What `analyse_blueprint` learnt about a valid blueprint.

    `order` is the evaluation order of the node ids (topological, ties broken by
    id, so it does not depend on how the nodes were listed); `shapes` gives each
    node's output shape without the batch dimension; `param_counts` the
    trainable parameters of each node; `depth` the longest chain of nodes from
    the input to the output; `batch_statistics` whether a `batch_norm` normalises
    a (B, F) tensor (in training it needs a batch of at least 2).
    """

    order: tuple[str, ...]
    shapes: Mapping[str, tuple[int, ...]]
    param_counts: Mapping[str, int]
    depth: int
    batch_statistics: bool

    @property
    def param_count(self) -> int:
        """Trainable parameters of the whole kernel."""
        return sum(self.param_counts.values())


def analyse_blueprint(
    blueprint: Blueprint,
    slot: LinearSlot | Conv2dSlot | None = None,
    limits: BlueprintLimits | None = None,
) -> BlueprintAnalysis:
    """Check the blueprint's graph, shapes and costs; return what the checks learnt.

    `slot`, when given, must be the slot the blueprint targets. Raises
    `InvalidArgumentError` (field = path of the offending value) for unknown
    references, a wrong number of inputs, cycles, nodes that do not reach the
    output, shape mismatches and an output shape other than the slot's; and
    `ResourceExhaustedError` when a limit of `limits` is exceeded.
    """
    limits = limits or BlueprintLimits()
    if slot is not None and slot != blueprint.slot:
        raise InvalidArgumentError(
            f"the blueprint targets {_slot_text(blueprint.slot)}, not {_slot_text(slot)}",
            field="slot",
        )
    nodes = blueprint.nodes
    if len(nodes) > limits.max_nodes:
        raise ResourceExhaustedError(
            f"nodes: {len(nodes)} nodes, more than the limit of {limits.max_nodes}"
        )
    index = _index_nodes(blueprint)
    order = _topological_order(blueprint, index)
    _check_reaches_output(blueprint, index)
    depth = _depth(blueprint, order, index)
    if depth > limits.max_depth:
        raise ResourceExhaustedError(
            f"nodes: depth {depth} (longest chain from input to output), "
            f"more than the limit of {limits.max_depth}"
        )

    shapes: dict[str, tuple[int, ...]] = {INPUT: slot_shape(blueprint.slot)}
    counts: dict[str, int] = {}
    batch_statistics = False
    for node_id in order:
        i = index[node_id]
        node = nodes[i]
        where = f"nodes[{i}]"
        in_shapes = [shapes[ref] for ref in node.inputs]
        out_shape, count = _infer(node, in_shapes, where, limits)
        elements = math.prod(out_shape)
        if elements > limits.max_activation_elements:
            raise ResourceExhaustedError(
                f"{where}: output of {elements} elements per sample, more than the limit "
                f"of {limits.max_activation_elements}"
            )
        shapes[node_id] = out_shape
        counts[node_id] = count
        if isinstance(node, BatchNormNode) and len(in_shapes[0]) == 1:
            batch_statistics = True

    total = sum(counts.values())
    if total > limits.max_params:
        raise ResourceExhaustedError(
            f"nodes: {total} parameters, more than the limit of {limits.max_params}"
        )
    expected = slot_shape(blueprint.slot)
    got = shapes[blueprint.output]
    if got != expected:
        raise InvalidArgumentError(
            f"node {blueprint.output!r} gives shape {_shape_text(got)}, but the slot "
            f"needs {_shape_text(expected)}",
            field="output",
        )
    del shapes[INPUT]
    return BlueprintAnalysis(
        order=order,
        shapes=shapes,
        param_counts=counts,
        depth=depth,
        batch_statistics=batch_statistics,
    )


def count_parameters(blueprint: Blueprint) -> int:
    """Trainable parameters of the kernel, computed from the IR without building it.

    Checks the blueprint first (with no practical limits), so it raises what
    `analyse_blueprint` raises for an invalid one.
    """
    huge = 2**62
    unlimited = BlueprintLimits(
        max_nodes=huge,
        max_depth=huge,
        max_params=huge,
        max_activation_elements=huge,
        max_attention_tokens=huge,
    )
    return analyse_blueprint(blueprint, limits=unlimited).param_count


def _index_nodes(blueprint: Blueprint) -> dict[str, int]:
    index: dict[str, int] = {}
    for i, node in enumerate(blueprint.nodes):
        if node.id == INPUT:
            raise InvalidArgumentError(
                f"{INPUT!r} is reserved for the kernel's input", f"nodes[{i}].id"
            )
        if node.id in _RESERVED_IDS:
            raise InvalidArgumentError(
                f"{node.id!r} is reserved (a torch.nn.Module attribute); choose another id",
                f"nodes[{i}].id",
            )
        if node.id in index:
            raise InvalidArgumentError(
                f"duplicate node id {node.id!r} (first at nodes[{index[node.id]}])",
                f"nodes[{i}].id",
            )
        index[node.id] = i
    for i, node in enumerate(blueprint.nodes):
        for j, ref in enumerate(node.inputs):
            if ref != INPUT and ref not in index:
                raise InvalidArgumentError(
                    f"unknown node {ref!r} (inputs name node ids or {INPUT!r})",
                    f"nodes[{i}].inputs[{j}]",
                )
        if node.op in _MULTI_INPUT_OPS:
            if len(node.inputs) < 2:
                raise InvalidArgumentError(
                    f"{node.op} takes two or more inputs, got {len(node.inputs)}",
                    f"nodes[{i}].inputs",
                )
        elif len(node.inputs) != 1:
            raise InvalidArgumentError(
                f"{node.op} takes exactly one input, got {len(node.inputs)}", f"nodes[{i}].inputs"
            )
    if blueprint.output not in index:
        raise InvalidArgumentError(f"unknown node {blueprint.output!r}", "output")
    return index


def _topological_order(blueprint: Blueprint, index: Mapping[str, int]) -> tuple[str, ...]:
    nodes = blueprint.nodes
    missing = {node.id: {r for r in node.inputs if r != INPUT} for node in nodes}
    consumers: dict[str, list[str]] = {node.id: [] for node in nodes}
    for node in nodes:
        for ref in set(node.inputs) - {INPUT}:
            consumers[ref].append(node.id)
    ready = [node_id for node_id, deps in missing.items() if not deps]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        node_id = heapq.heappop(ready)
        order.append(node_id)
        for consumer in consumers[node_id]:
            missing[consumer].discard(node_id)
            if not missing[consumer]:
                heapq.heappush(ready, consumer)
    if len(order) < len(nodes):
        cycle = _find_cycle({k: v for k, v in missing.items() if v})
        first = min(cycle[:-1], key=lambda n: index[n])
        raise InvalidArgumentError(
            "cycle: " + " -> ".join(_rotate(cycle, first)), f"nodes[{index[first]}].inputs"
        )
    return tuple(order)


def _find_cycle(waiting: Mapping[str, set[str]]) -> list[str]:
    # Every node left waits on another node that is left, so walking any chain of
    # dependencies must come back to a node already on the path.
    node = min(waiting)
    path: list[str] = []
    seen: dict[str, int] = {}
    while node not in seen:
        seen[node] = len(path)
        path.append(node)
        node = min(waiting[node])
    return [*path[seen[node] :], node]


def _rotate(cycle: list[str], first: str) -> list[str]:
    # `cycle` follows inputs (consumer -> producer); the message follows the data.
    ring = cycle[:-1][::-1]
    start = ring.index(first)
    ring = ring[start:] + ring[:start]
    return [*ring, first]


def _check_reaches_output(blueprint: Blueprint, index: Mapping[str, int]) -> None:
    reached = {blueprint.output}
    frontier = [blueprint.output]
    while frontier:
        node = blueprint.nodes[index[frontier.pop()]]
        for ref in node.inputs:
            if ref != INPUT and ref not in reached:
                reached.add(ref)
                frontier.append(ref)
    for i, node in enumerate(blueprint.nodes):
        if node.id not in reached:
            raise InvalidArgumentError(
                f"node {node.id!r} does not contribute to the output {blueprint.output!r}",
                f"nodes[{i}]",
            )


def _depth(blueprint: Blueprint, order: tuple[str, ...], index: Mapping[str, int]) -> int:
    depth: dict[str, int] = {INPUT: 0}
    for node_id in order:
        node = blueprint.nodes[index[node_id]]
        depth[node_id] = 1 + max(depth[ref] for ref in node.inputs)
    return depth[blueprint.output]


def _infer(
    node: _NodeUnion, in_shapes: list[tuple[int, ...]], where: str, limits: BlueprintLimits
) -> tuple[tuple[int, ...], int]:
    """Output shape and trainable parameter count of `node` given its input shapes."""
    shape = in_shapes[0]
    p = f"{where}.params"
    if isinstance(node, LinearNode):
        _need_features(node, shape, where)
        prm = node.params
        return (prm.out_features,), shape[0] * prm.out_features + (
            prm.out_features if prm.bias else 0
        )
    if isinstance(node, Conv2dNode):
        _need_image(node, shape, where)
        return _conv2d(node.params, shape, p)
    if isinstance(node, BatchNormNode | LayerNormNode):
        prm_norm = node.params
        if prm_norm.zero_init and not prm_norm.affine:
            raise InvalidArgumentError(
                "zero_init needs affine: true (it zeroes the scale)", f"{p}.zero_init"
            )
        return shape, 2 * shape[0] if prm_norm.affine else 0
    if isinstance(node, ReluNode | GeluNode | SiluNode):
        return shape, 0
    if isinstance(node, AddNode | MulNode):
        for j, other in enumerate(in_shapes[1:], start=1):
            if other != shape:
                raise InvalidArgumentError(
                    f"{node.op} needs inputs of one shape: {node.inputs[0]!r} is "
                    f"{_shape_text(shape)}, {node.inputs[j]!r} is {_shape_text(other)}",
                    f"{where}.inputs[{j}]",
                )
        return shape, 0
    if isinstance(node, SqueezeExciteNode):
        channels = shape[0]
        hidden = max(1, channels // node.params.reduction)
        return shape, 2 * channels * hidden + hidden + channels
    if isinstance(node, AttentionHeadNode):
        return _attention(node.params, shape, p, limits)
    if isinstance(node, LowRankNode):
        prm_lr = node.params
        width = shape[0]
        out = prm_lr.out_features or width
        if prm_lr.rank > min(width, out):
            raise InvalidArgumentError(
                f"rank {prm_lr.rank} is more than min(in, out) = {min(width, out)}",
                f"{p}.rank",
            )
        return (out, *shape[1:]), prm_lr.rank * (width + out)
    raise AssertionError(f"no shape rule for op {node.op!r}")  # pragma: no cover


def _need_features(node: _NodeUnion, shape: tuple[int, ...], where: str) -> None:
    if len(shape) != 1:
        raise InvalidArgumentError(
            f"{node.op} needs a (features,) input, but {node.inputs[0]!r} is "
            f"{_shape_text(shape)}; use conv2d on images",
            f"{where}.inputs[0]",
        )


def _need_image(node: _NodeUnion, shape: tuple[int, ...], where: str) -> None:
    if len(shape) != 3:
        raise InvalidArgumentError(
            f"{node.op} needs a (channels, height, width) input, but {node.inputs[0]!r} is "
            f"{_shape_text(shape)}",
            f"{where}.inputs[0]",
        )


def _conv2d(prm: Conv2dParams, shape: tuple[int, ...], p: str) -> tuple[tuple[int, ...], int]:
    channels, height, width = shape
    if channels % prm.groups:
        raise InvalidArgumentError(
            f"groups {prm.groups} does not divide the {channels} input channels", f"{p}.groups"
        )
    if prm.out_channels % prm.groups:
        raise InvalidArgumentError(
            f"out_channels {prm.out_channels} is not a multiple of groups {prm.groups}",
            f"{p}.out_channels",
        )
    span = prm.dilation * (prm.kernel_size - 1)
    if prm.padding == "same":
        if prm.stride != 1:
            raise InvalidArgumentError('padding "same" needs stride 1', f"{p}.padding")
        if span % 2:
            raise InvalidArgumentError(
                'padding "same" needs an odd kernel_size (or an even dilation)', f"{p}.padding"
            )
        pad = span // 2
    else:
        pad = prm.padding
    out_h = (height + 2 * pad - span - 1) // prm.stride + 1
    out_w = (width + 2 * pad - span - 1) // prm.stride + 1
    if out_h < 1 or out_w < 1:
        raise InvalidArgumentError(
            f"a {prm.kernel_size}x{prm.kernel_size} kernel (dilation {prm.dilation}, padding "
            f"{pad}) does not fit a {height}x{width} input",
            f"{p}.kernel_size",
        )
    weights = prm.out_channels * (channels // prm.groups) * prm.kernel_size**2
    return (prm.out_channels, out_h, out_w), weights + (prm.out_channels if prm.bias else 0)


def _attention(
    prm: AttentionHeadParams, shape: tuple[int, ...], p: str, limits: BlueprintLimits
) -> tuple[tuple[int, ...], int]:
    if len(shape) == 1:
        if prm.tokens is None:
            raise InvalidArgumentError(
                "attention over features needs `tokens` (how many tokens the features split into)",
                f"{p}.tokens",
            )
        if shape[0] % prm.tokens:
            raise InvalidArgumentError(
                f"tokens {prm.tokens} does not divide the {shape[0]} features", f"{p}.tokens"
            )
        tokens, dim = prm.tokens, shape[0] // prm.tokens
    else:
        if prm.tokens is not None:
            raise InvalidArgumentError(
                "on images the tokens are the H*W positions; leave `tokens` out", f"{p}.tokens"
            )
        tokens, dim = shape[1] * shape[2], shape[0]
    if tokens > limits.max_attention_tokens or tokens * tokens > limits.max_activation_elements:
        raise ResourceExhaustedError(
            f"{p}.tokens: attention over {tokens} tokens, more than the limit of "
            f"{limits.max_attention_tokens}"
        )
    bias = 1 if prm.bias else 0
    qkv = 3 * (dim * prm.head_dim + bias * prm.head_dim)
    out = prm.head_dim * dim + bias * dim
    return shape, qkv + out


def _shape_text(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(d) for d in ("B", *shape)) + ")"


def _slot_text(slot: LinearSlot | Conv2dSlot) -> str:
    return f"a {slot.kind} slot {_shape_text(slot_shape(slot))}"


# --- canonical form ---------------------------------------------------------------------------


def canonical_json(blueprint: Blueprint, slot: LinearSlot | Conv2dSlot) -> str:
    """The canonical text of `blueprint` compiled for `slot`: the input of kernel ids.

    Every param is spelt out (defaults included), nodes are sorted by id, keys are
    sorted, floats are written in their shortest round-trip form (-0.0 as 0.0) and
    there is no whitespace, so two blueprints that build the same kernel give the
    same text however they were written. The description is left out: it does not
    change the kernel. Raises `InvalidArgumentError` (field `slot`) when the
    blueprint targets another slot.
    """
    if slot != blueprint.slot:
        raise InvalidArgumentError(
            f"the blueprint targets {_slot_text(blueprint.slot)}, not {_slot_text(slot)}",
            field="slot",
        )
    data = blueprint.model_dump(mode="python", exclude={"description"})
    data["nodes"] = sorted(data["nodes"], key=lambda node: node["id"])
    return json.dumps(
        _normalise(data), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


def _normalise(value: Any) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, str | int):
        return value
    if isinstance(value, float):
        return 0.0 if value == 0 else value
    if isinstance(value, Mapping):
        return {str(k): _normalise(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_normalise(v) for v in value]
    raise TypeError(f"cannot put {type(value).__name__} in canonical JSON")  # pragma: no cover
