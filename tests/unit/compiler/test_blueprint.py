"""The blueprint IR: what it accepts, the exact field it blames, its limits and canonical form."""

from __future__ import annotations

import json
from typing import Any

import pytest

from common.errors import InvalidArgumentError, ResourceExhaustedError
from services.compiler.blueprint import (
    BlueprintLimits,
    Conv2dSlot,
    LinearSlot,
    analyse_blueprint,
    canonical_json,
    count_parameters,
    parse_blueprint,
    parse_slot,
)
from services.compiler.build import build_module

LINEAR = {"kind": "linear", "features": 8}
IMAGE = {"kind": "conv2d", "channels": 4, "height": 6, "width": 6}


def node(node_id: str, op: str, *inputs: str, **params: Any) -> dict[str, Any]:
    return {"id": node_id, "op": op, "params": params, "inputs": list(inputs)}


def blueprint(
    nodes: list[dict[str, Any]], slot: dict[str, Any] = LINEAR, **extra: Any
) -> dict[str, Any]:
    return {"name": "test", "slot": slot, "nodes": nodes, "output": nodes[-1]["id"], **extra}


def mlp() -> dict[str, Any]:
    return blueprint(
        [
            node("fc1", "linear", "input", out_features=16),
            node("act", "relu", "fc1"),
            node("fc2", "linear", "act", out_features=8, zero_init=True),
        ]
    )


def every_op_on_images() -> dict[str, Any]:
    return blueprint(
        [
            node("norm", "layer_norm", "input"),
            node("attend", "attention_head", "norm", head_dim=8),
            node("bn", "batch_norm", "attend"),
            node("act", "gelu", "bn", approximate="tanh"),
            node("gate", "squeeze_excite", "act", reduction=2),
            node("dw", "conv2d", "gate", out_channels=8, kernel_size=3, padding="same", groups=4),
            node("silu", "silu", "dw"),
            node("pw", "conv2d", "silu", out_channels=4, kernel_size=1),
            node("lora", "low_rank", "gate", rank=2),
            node("prod", "mul", "pw", "lora"),
            node("relu", "relu", "prod"),
            node("sum", "add", "relu", "input"),
            node("out", "conv2d", "sum", out_channels=4, kernel_size=3, padding=1, zero_init=True),
        ],
        slot=IMAGE,
    )


def invalid(data: dict[str, Any], limits: BlueprintLimits | None = None) -> InvalidArgumentError:
    with pytest.raises(InvalidArgumentError) as caught:
        analyse_blueprint(parse_blueprint(data), limits=limits)
    return caught.value


def test_valid_blueprint_gets_shapes_order_and_parameter_count() -> None:
    analysis = analyse_blueprint(parse_blueprint(mlp()))
    assert analysis.order == ("fc1", "act", "fc2")
    assert analysis.shapes == {"fc1": (16,), "act": (16,), "fc2": (8,)}
    assert analysis.param_count == 8 * 16 + 16 + 16 * 8 + 8
    assert analysis.depth == 3


@pytest.mark.parametrize("data", [mlp(), every_op_on_images()], ids=["mlp", "every-op"])
def test_parameter_count_from_the_ir_matches_the_built_module(data: dict[str, Any]) -> None:
    parsed = parse_blueprint(data)
    built = build_module(parsed)
    assert count_parameters(parsed) == sum(p.numel() for p in built.parameters())


def test_unknown_op_names_the_op_field() -> None:
    data = mlp()
    data["nodes"][1]["op"] = "tanh"
    error = invalid(data)
    assert error.field == "nodes[1].op"
    assert "tanh" in str(error)


def test_unknown_param_names_the_param_field() -> None:
    data = mlp()
    data["nodes"][2]["params"]["dropout"] = 0.1
    assert invalid(data).field == "nodes[2].params.dropout"


@pytest.mark.parametrize("size", [-3, 0])
def test_non_positive_size_names_the_param_field(size: int) -> None:
    data = mlp()
    data["nodes"][0]["params"]["out_features"] = size
    error = invalid(data)
    assert error.field == "nodes[0].params.out_features"
    assert str(size) in str(error)


def test_non_positive_slot_size_names_the_slot_field() -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        parse_slot({"kind": "conv2d", "channels": 4, "height": -1, "width": 6})
    assert caught.value.field == "slot.height"
    data = mlp()
    data["slot"] = {"kind": "conv2d", "channels": 4, "height": 6, "width": 0}
    assert invalid(data).field == "slot.width"


def test_unknown_input_reference_names_the_input() -> None:
    data = mlp()
    data["nodes"][2]["inputs"] = ["actt"]
    error = invalid(data)
    assert error.field == "nodes[2].inputs[0]"
    assert "actt" in str(error)


def test_cycle_is_refused_with_its_path() -> None:
    data = mlp()
    data["nodes"][0]["inputs"] = ["fc2"]
    error = invalid(data)
    assert error.field == "nodes[0].inputs"
    assert "cycle: fc1 -> act -> fc2 -> fc1" in str(error)


def test_self_reference_is_a_cycle() -> None:
    data = blueprint([node("a", "add", "input", "a")])
    error = invalid(data)
    assert error.field == "nodes[0].inputs"
    assert "cycle: a -> a" in str(error)


def test_mismatched_shapes_of_add_name_the_offending_input() -> None:
    data = blueprint(
        [
            node("wide", "linear", "input", out_features=16),
            node("sum", "add", "input", "wide"),
        ]
    )
    error = invalid(data)
    assert error.field == "nodes[1].inputs[1]"
    assert "(B, 8)" in str(error) and "(B, 16)" in str(error)


def test_linear_on_an_image_is_a_shape_error() -> None:
    data = blueprint([node("fc", "linear", "input", out_features=4)], slot=IMAGE)
    assert invalid(data).field == "nodes[0].inputs[0]"


def test_output_shape_must_be_the_slot_shape() -> None:
    data = mlp()
    data["nodes"][2]["params"]["out_features"] = 9
    error = invalid(data)
    assert error.field == "output"
    assert "(B, 9)" in str(error) and "(B, 8)" in str(error)


def test_strided_conv_that_changes_the_spatial_shape_fails_at_the_output() -> None:
    data = blueprint([node("c", "conv2d", "input", out_channels=4, kernel_size=3, stride=2)], IMAGE)
    error = invalid(data)
    assert error.field == "output"
    assert "(B, 4, 2, 2)" in str(error)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"out_channels": 4, "kernel_size": 3, "groups": 3}, "nodes[0].params.groups"),
        ({"out_channels": 6, "kernel_size": 1, "groups": 4}, "nodes[0].params.out_channels"),
        (
            {"out_channels": 4, "kernel_size": 3, "stride": 2, "padding": "same"},
            "nodes[0].params.padding",
        ),
        ({"out_channels": 4, "kernel_size": 2, "padding": "same"}, "nodes[0].params.padding"),
        ({"out_channels": 4, "kernel_size": 9}, "nodes[0].params.kernel_size"),
    ],
)
def test_conv_params_that_cannot_work_name_their_field(params: dict[str, Any], field: str) -> None:
    data = blueprint([node("c", "conv2d", "input", **params)], IMAGE)
    assert invalid(data).field == field


def test_attention_tokens_must_divide_the_features() -> None:
    data = blueprint([node("a", "attention_head", "input", head_dim=4, tokens=3)])
    assert invalid(data).field == "nodes[0].params.tokens"
    data = blueprint([node("a", "attention_head", "input", head_dim=4)])
    assert invalid(data).field == "nodes[0].params.tokens"


def test_low_rank_above_the_width_is_refused() -> None:
    data = blueprint([node("lr", "low_rank", "input", rank=9)])
    assert invalid(data).field == "nodes[0].params.rank"


def test_node_that_does_not_reach_the_output_is_refused() -> None:
    data = mlp()
    data["nodes"].insert(1, node("unused", "relu", "fc1"))
    assert invalid(data).field == "nodes[1]"


def test_duplicate_and_reserved_ids_are_refused() -> None:
    data = mlp()
    data["nodes"][1]["id"] = "fc1"
    assert invalid(data).field == "nodes[1].id"
    data = blueprint([node("input", "relu", "input")])
    assert invalid(data).field == "nodes[0].id"
    data = blueprint([node("relu", "relu", "input"), node("update", "relu", "relu")])
    assert invalid(data).field == "nodes[1].id"  # would shadow ModuleDict.update


def test_wrong_number_of_inputs_is_refused() -> None:
    assert invalid(blueprint([node("r", "relu", "input", "input")])).field == "nodes[0].inputs"
    assert invalid(blueprint([node("s", "add", "input")])).field == "nodes[0].inputs"


def test_unknown_top_level_field_and_unknown_output_are_refused() -> None:
    assert invalid({**mlp(), "owner": "me"}).field == "owner"
    assert invalid({**mlp(), "output": "fc3"}).field == "output"


def test_too_many_nodes_is_resource_exhausted() -> None:
    nodes = [node("n0", "relu", "input")] + [
        node(f"n{i}", "relu", f"n{i - 1}") for i in range(1, 33)
    ]
    with pytest.raises(ResourceExhaustedError, match="33 nodes"):
        analyse_blueprint(parse_blueprint(blueprint(nodes)))


def test_too_deep_is_resource_exhausted() -> None:
    nodes = [node("n0", "relu", "input")] + [
        node(f"n{i}", "relu", f"n{i - 1}") for i in range(1, 6)
    ]
    with pytest.raises(ResourceExhaustedError, match="depth 6"):
        analyse_blueprint(parse_blueprint(blueprint(nodes)), limits=BlueprintLimits(max_depth=5))


def test_too_many_parameters_is_resource_exhausted() -> None:
    data = mlp()
    data["nodes"][0]["params"]["out_features"] = 400_000
    with pytest.raises(ResourceExhaustedError, match="parameters"):
        analyse_blueprint(parse_blueprint(data))


def test_attention_over_too_many_positions_is_resource_exhausted() -> None:
    slot = {"kind": "conv2d", "channels": 4, "height": 64, "width": 64}
    data = blueprint([node("a", "attention_head", "input", head_dim=4, zero_init=True)], slot)
    with pytest.raises(ResourceExhaustedError, match="4096 tokens"):
        analyse_blueprint(parse_blueprint(data))


def test_slot_other_than_the_blueprints_is_refused() -> None:
    parsed = parse_blueprint(mlp())
    with pytest.raises(InvalidArgumentError) as caught:
        analyse_blueprint(parsed, LinearSlot(features=16))
    assert caught.value.field == "slot"
    with pytest.raises(InvalidArgumentError):
        canonical_json(parsed, LinearSlot(features=16))


def test_canonical_json_ignores_node_order_defaults_number_spelling_and_description() -> None:
    plain = blueprint(
        [
            node("norm", "layer_norm", "input"),
            node("fc", "linear", "norm", out_features=8, zero_init=True),
        ]
    )
    spelt_out = blueprint(
        [
            node("fc", "linear", "norm", out_features=8, zero_init=True, bias=True),
            node("norm", "layer_norm", "input", eps=0.00001, affine=True, zero_init=False),
        ],
        description="the same kernel, written differently",
    )
    spelt_out["output"] = "fc"
    first, second = parse_blueprint(plain), parse_blueprint(json.dumps(spelt_out))
    slot = LinearSlot(features=8)
    assert canonical_json(first, slot) == canonical_json(second, slot)
    text = canonical_json(first, slot)
    assert " " not in text and '"eps":1e-05' in text
    assert json.loads(text)["nodes"][0]["id"] == "fc"


def test_canonical_json_differs_when_the_kernel_differs() -> None:
    slot = LinearSlot(features=8)
    base = canonical_json(parse_blueprint(mlp()), slot)
    changed = mlp()
    changed["nodes"][0]["params"]["out_features"] = 17
    assert canonical_json(parse_blueprint(changed), slot) != base
    renamed = mlp()
    renamed["nodes"][1]["id"] = "act2"
    renamed["nodes"][2]["inputs"] = ["act2"]
    assert canonical_json(parse_blueprint(renamed), slot) != base


def test_slot_and_blueprint_models_are_frozen() -> None:
    slot = Conv2dSlot(channels=1, height=1, width=1)
    with pytest.raises(ValueError, match="frozen"):
        slot.channels = 2  # type: ignore[misc]
