"""Every catalogue blueprint compiles, validates, starts at zero, gets gradients and trains."""

from __future__ import annotations

import pytest
import torch

from common.errors import InvalidArgumentError, NotFoundError, ResourceExhaustedError
from common.kernels import load_kernel
from services.compiler.blueprint import (
    Conv2dSlot,
    LinearSlot,
    analyse_blueprint,
    count_parameters,
)
from services.compiler.build import build_module
from services.compiler.catalogue import CATALOGUE, get_blueprint, list_catalogue
from tests.unit.compiler.conftest import CATALOGUE_CASES, SMALL_SLOTS, CompiledCatalogue


def test_catalogue_has_ten_or_more_described_blueprints_for_both_slot_kinds() -> None:
    entries = list_catalogue()
    assert len(entries) >= 10
    assert all(entry.description and entry.slot_kinds for entry in entries)
    kinds = {kind for entry in entries for kind in entry.slot_kinds}
    assert kinds == {"linear", "conv2d"}
    assert [entry.name for entry in entries] == sorted(CATALOGUE)


def test_unknown_name_is_not_found_and_wrong_slot_kind_is_invalid() -> None:
    with pytest.raises(NotFoundError, match="no_such_blueprint"):
        get_blueprint("no_such_blueprint", SMALL_SLOTS["linear"])
    with pytest.raises(InvalidArgumentError) as caught:
        get_blueprint("conv3x3", SMALL_SLOTS["linear"])
    assert caught.value.field == "slot.kind"


@pytest.mark.parametrize(("name", "kind"), CATALOGUE_CASES)
def test_catalogue_blueprint_compiles_and_passes_every_check(
    name: str, kind: str, compiled_catalogue: CompiledCatalogue
) -> None:
    compiled = compiled_catalogue.get(name, kind)
    report = compiled.result.report
    assert report.passed, report.summary()
    assert [check.name for check in report.checks] == [
        "loads",
        "output_shape",
        "zero_at_init",
        "gradient_at_init",
        "forward_matches_eager",
        "backward_matches_eager",
        "finite_outputs",
        "sgd_step_trains",
        "latency_ratio",
    ]
    assert compiled.result.metadata.blueprint_name == name
    assert compiled.result.metadata.param_count == count_parameters(compiled.blueprint)


@pytest.mark.parametrize(("name", "kind"), CATALOGUE_CASES)
def test_catalogue_kernel_is_zero_at_init_and_its_output_layer_gets_gradients(
    name: str, kind: str, compiled_catalogue: CompiledCatalogue
) -> None:
    compiled = compiled_catalogue.get(name, kind)
    kernel = load_kernel(compiled.artifact, compiled.result.artifact_sha256)
    slot = SMALL_SLOTS[kind]
    x = torch.randn(6, *_shape(slot))
    out = kernel(x)
    assert out.shape == x.shape
    assert out.abs().max() == 0
    (out * torch.randn_like(out)).sum().backward()
    output_layer = f"nodes.{compiled.blueprint.output}."
    moving = [
        param_name
        for param_name, param in kernel.named_parameters()
        if param_name.startswith(output_layer) and param.grad is not None and param.grad.any()
    ]
    assert moving, f"no gradient reaches the parameters of {output_layer}*"


@pytest.mark.parametrize(("name", "kind"), CATALOGUE_CASES)
def test_loaded_catalogue_kernel_trains(
    name: str, kind: str, compiled_catalogue: CompiledCatalogue
) -> None:
    compiled = compiled_catalogue.get(name, kind)
    kernel = load_kernel(compiled.artifact, compiled.result.artifact_sha256)
    slot = SMALL_SLOTS[kind]
    x, target = torch.randn(6, *_shape(slot)), torch.randn(6, *_shape(slot))
    optimiser = torch.optim.SGD(kernel.parameters(), lr=0.05)
    before = kernel(x)
    (before - target).square().mean().backward()
    optimiser.step()
    after = kernel(x)
    assert (after - before.detach()).abs().max() > 0


@pytest.mark.parametrize(("name", "kind"), CATALOGUE_CASES)
def test_catalogue_blueprint_builds_to_its_counted_parameters(name: str, kind: str) -> None:
    blueprint = get_blueprint(name, SMALL_SLOTS[kind])
    module = build_module(blueprint)
    assert sum(p.numel() for p in module.parameters()) == count_parameters(blueprint)


@pytest.mark.parametrize(
    "slot",
    [
        LinearSlot(features=4096),
        LinearSlot(features=3),
        Conv2dSlot(channels=256, height=32, width=32),
    ],
    ids=["linear-4096", "linear-3", "conv2d-256x32x32"],
)
def test_catalogue_sizes_itself_within_the_limits(slot: LinearSlot | Conv2dSlot) -> None:
    for entry in list_catalogue():
        if slot.kind in entry.slot_kinds:
            analyse_blueprint(entry.blueprint(slot), slot)


def test_attention_over_more_positions_than_the_limit_is_resource_exhausted() -> None:
    slot = Conv2dSlot(channels=8, height=64, width=64)
    with pytest.raises(ResourceExhaustedError):
        analyse_blueprint(get_blueprint("attention_head", slot), slot)


def _shape(slot: LinearSlot | Conv2dSlot) -> tuple[int, ...]:
    if isinstance(slot, LinearSlot):
        return (slot.features,)
    return (slot.channels, slot.height, slot.width)
