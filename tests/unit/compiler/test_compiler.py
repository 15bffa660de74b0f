"""`BlueprintCompiler`: ids, cache hits, rejected kernels, devices and dtypes."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from common.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)
from common.kernels import load_kernel
from services.compiler.blueprint import LinearSlot, parse_blueprint
from services.compiler.catalogue import CATALOGUE, get_blueprint
from services.compiler.compiler import BlueprintCompiler, KernelRejectedError
from services.compiler.kernel_store import FileKernelStore
from tests.unit.compiler.conftest import FAST_VALIDATION

SLOT = LinearSlot(features=8)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[FileKernelStore]:
    opened = FileKernelStore(tmp_path / "kernels", max_bytes=1 << 28)
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def compiler(store: FileKernelStore) -> BlueprintCompiler:
    return BlueprintCompiler(store, validation=FAST_VALIDATION)


async def test_second_compile_is_a_cache_hit_with_the_same_kernel(
    compiler: BlueprintCompiler,
) -> None:
    blueprint = get_blueprint("bottleneck_mlp", SLOT)
    first = await compiler.compile(blueprint, SLOT)
    second = await compiler.compile(blueprint, SLOT)
    assert not first.cache_hit and second.cache_hit
    assert (second.kernel_id, second.artifact_sha256, second.size) == (
        first.kernel_id,
        first.artifact_sha256,
        first.size,
    )
    assert second.report == first.report and first.report.passed
    stats = compiler.stats().store
    assert (stats.compiles, stats.hits, stats.kernels) == (1, 1, 1)
    data = compiler.get_kernel_bytes(first.kernel_id)
    assert len(data) == first.size
    kernel = load_kernel(data, first.artifact_sha256)
    assert kernel(torch.randn(3, 8)).shape == (3, 8)
    assert compiler.get_kernel_metadata(first.kernel_id).blueprint_name == "bottleneck_mlp"
    assert [e.kernel_id for e in compiler.list_kernels()] == [first.kernel_id]


async def test_same_blueprint_in_two_stores_gives_the_same_id_and_bytes(
    compiler: BlueprintCompiler, tmp_path: Path
) -> None:
    blueprint = get_blueprint("low_rank_adapter", SLOT)
    here = await compiler.compile(blueprint, SLOT)
    elsewhere_store = FileKernelStore(tmp_path / "elsewhere", max_bytes=1 << 28)
    try:
        elsewhere = BlueprintCompiler(elsewhere_store, validation=FAST_VALIDATION)
        there = await elsewhere.compile(blueprint, SLOT)
        assert not there.cache_hit
        assert there.kernel_id == here.kernel_id
        assert elsewhere.get_kernel_bytes(there.kernel_id) == compiler.get_kernel_bytes(
            here.kernel_id
        )
    finally:
        elsewhere_store.close()


async def test_other_slot_seed_or_mode_gives_another_kernel(compiler: BlueprintCompiler) -> None:
    base = await compiler.compile(get_blueprint("low_rank_adapter", SLOT), SLOT)
    wider = LinearSlot(features=16)
    ids = {
        base.kernel_id,
        (await compiler.compile(get_blueprint("low_rank_adapter", wider), wider)).kernel_id,
        (await compiler.compile(get_blueprint("low_rank_adapter", SLOT), SLOT, seed=1)).kernel_id,
        (
            await compiler.compile(get_blueprint("low_rank_adapter", SLOT), SLOT, training=False)
        ).kernel_id,
        (
            await compiler.compile(get_blueprint("low_rank_adapter", SLOT), SLOT, "float64")
        ).kernel_id,
    }
    assert len(ids) == 5


async def test_concurrent_compiles_of_one_blueprint_share_a_single_compile(
    compiler: BlueprintCompiler,
) -> None:
    blueprint = get_blueprint("bottleneck_mlp", SLOT)
    results = await asyncio.gather(*(compiler.compile(blueprint, SLOT) for _ in range(4)))
    assert len({r.kernel_id for r in results}) == 1
    stats = compiler.stats().store
    assert stats.compiles == 1 and stats.coalesced == 3


async def test_kernel_that_fails_validation_is_never_stored(compiler: BlueprintCompiler) -> None:
    # Not zero at init: it would change the host's function when grafted.
    blueprint = parse_blueprint(
        {
            "name": "not_function_preserving",
            "slot": SLOT.model_dump(),
            "nodes": [
                {"id": "fc", "op": "linear", "params": {"out_features": 8}, "inputs": ["input"]}
            ],
            "output": "fc",
        }
    )
    with pytest.raises(KernelRejectedError) as caught:
        await compiler.compile(blueprint, SLOT)
    report = caught.value.report
    assert [c.name for c in report.failed] == ["zero_at_init"]
    assert caught.value.field == "blueprint"
    assert "zero_at_init" in str(caught.value)
    assert compiler.list_kernels() == []
    assert compiler.stats().rejected == 1


async def test_unknown_kernel_is_not_found(compiler: BlueprintCompiler) -> None:
    with pytest.raises(NotFoundError):
        compiler.get_kernel_bytes("0" * 64)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"dtype": "int8"}, "dtype"),
        ({"device": "tpu"}, "device"),
        ({"device": "not a device"}, "device"),
        ({"slot": LinearSlot(features=16)}, "slot"),
    ],
)
async def test_bad_target_is_invalid_argument_with_its_field(
    compiler: BlueprintCompiler, kwargs: dict[str, Any], field: str
) -> None:
    arguments: dict[str, Any] = {"slot": SLOT, **kwargs}
    with pytest.raises(InvalidArgumentError) as caught:
        await compiler.compile(get_blueprint("bottleneck_mlp", SLOT), **arguments)
    assert caught.value.field == field
    assert compiler.list_kernels() == []


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA"
)
async def test_cuda_without_a_gpu_is_a_failed_precondition(compiler: BlueprintCompiler) -> None:
    with pytest.raises(FailedPreconditionError, match="no CUDA device"):
        await compiler.compile(get_blueprint("bottleneck_mlp", SLOT), SLOT, device="cuda")


async def test_blueprint_over_the_limits_is_resource_exhausted(compiler: BlueprintCompiler) -> None:
    slot = LinearSlot(features=2048)
    blueprint = parse_blueprint(
        {
            "name": "huge",
            "slot": slot.model_dump(),
            "nodes": [
                {"id": "a", "op": "linear", "params": {"out_features": 2048}, "inputs": ["input"]},
                {"id": "b", "op": "linear", "params": {"out_features": 2048}, "inputs": ["a"]},
            ],
            "output": "b",
        }
    )
    with pytest.raises(ResourceExhaustedError):
        await compiler.compile(blueprint, slot)


def test_list_blueprints_is_the_catalogue(compiler: BlueprintCompiler) -> None:
    assert [entry.name for entry in compiler.list_blueprints()] == sorted(CATALOGUE)


def test_package_exports_exactly_its_public_api() -> None:
    import types

    import services.compiler as package

    public = {
        name
        for name, value in vars(package).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public == set(package.__all__)
