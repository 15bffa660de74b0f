"""Export: deterministic bytes, ids from the inputs, archives that load without pickle."""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from common.kernels import check_archive, kernel_info, load_kernel, sha256_hex
from services.compiler.blueprint import (
    Blueprint,
    Conv2dSlot,
    LinearSlot,
    analyse_blueprint,
    canonical_json,
)
from services.compiler.build import build_module
from services.compiler.catalogue import get_blueprint
from services.compiler.export import export_kernel, kernel_id
from tests.unit.test_kernels import NoUnpickling

SLOT = LinearSlot(features=8)
IMAGE = Conv2dSlot(channels=4, height=5, width=5)


def export_of(blueprint: Blueprint, *, training: bool = True) -> bytes:
    module = build_module(blueprint, seed=0)
    return export_kernel(module, torch.zeros(2, 8), training=training, info={"training": training})


@pytest.fixture(scope="module")
def mlp_artifact() -> bytes:
    return export_of(get_blueprint("layer_norm_mlp", SLOT))


def test_same_blueprint_exports_to_identical_bytes(mlp_artifact: bytes) -> None:
    again = export_of(get_blueprint("layer_norm_mlp", SLOT))
    assert sha256_hex(again) == sha256_hex(mlp_artifact)


def test_archive_carries_no_source_paths(mlp_artifact: bytes) -> None:
    with zipfile.ZipFile(io.BytesIO(mlp_artifact)) as archive:
        program = next(n for n in archive.namelist() if n.endswith("models/model.json"))
        text = archive.read(program).decode()
    assert str(Path(__file__).parents[3]) not in text
    assert "stack_trace" not in text


def test_kernel_id_is_derived_from_the_inputs_only() -> None:
    blueprint = get_blueprint("bottleneck_mlp", SLOT)
    canonical = canonical_json(blueprint, SLOT)
    slot = SLOT.model_dump()
    same = {"dtype": "float32", "device": "cpu", "seed": 0, "training": True}
    first = kernel_id(canonical, slot, **same)  # type: ignore[arg-type]
    assert first == kernel_id(canonical, slot, **same)  # type: ignore[arg-type]
    for change in ({"dtype": "float64"}, {"device": "cuda"}, {"seed": 1}, {"training": False}):
        assert kernel_id(canonical, slot, **{**same, **change}) != first  # type: ignore[arg-type]
    other_slot = LinearSlot(features=16)
    other = canonical_json(get_blueprint("bottleneck_mlp", other_slot), other_slot)
    assert kernel_id(other, other_slot.model_dump(), **same) != first  # type: ignore[arg-type]


def test_exported_kernel_passes_the_archive_check_and_loads_without_unpickling(
    mlp_artifact: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    check_archive(mlp_artifact)
    guard = NoUnpickling(monkeypatch)
    kernel = load_kernel(mlp_artifact, sha256_hex(mlp_artifact))
    kernel(torch.randn(3, 8)).sum().backward()
    assert guard.attempts == []


def test_loaded_kernel_has_a_dynamic_batch_and_matches_eager(mlp_artifact: bytes) -> None:
    kernel = load_kernel(mlp_artifact, sha256_hex(mlp_artifact))
    eager = build_module(get_blueprint("layer_norm_mlp", SLOT), seed=0)
    with torch.no_grad():
        for name, param in kernel.named_parameters():
            param.normal_()
            dict(eager.named_parameters())[name].copy_(param)
    for batch in (1, 7, 64):
        x = torch.randn(batch, 8)
        torch.testing.assert_close(kernel(x), eager(x))


def test_eval_kernel_uses_running_statistics_learnt_by_the_training_kernel() -> None:
    blueprint = get_blueprint("conv_residual_bn", IMAGE)
    analysis = analyse_blueprint(blueprint)
    example = torch.zeros(2, 4, 5, 5)
    train_bytes = export_kernel(build_module(blueprint, analysis=analysis), example, training=True)
    eval_bytes = export_kernel(build_module(blueprint, analysis=analysis), example, training=False)
    trained = load_kernel(train_bytes, sha256_hex(train_bytes))
    with torch.no_grad():
        for param in trained.parameters():
            param.normal_()
        for _ in range(3):
            trained(torch.randn(8, 4, 5, 5) * 3 + 1)  # updates the running statistics
    serving = load_kernel(eval_bytes, sha256_hex(eval_bytes))
    serving.load_state_dict(trained.state_dict())
    eager = build_module(blueprint, analysis=analysis).eval()
    eager.load_state_dict(trained.state_dict())
    x = torch.randn(1, 4, 5, 5)
    torch.testing.assert_close(serving(x), eager(x))
    assert not torch.equal(serving(x), trained(x))  # batch statistics differ from running ones


def test_kernel_info_travels_in_the_archive(mlp_artifact: bytes) -> None:
    assert kernel_info(mlp_artifact) == {"training": True}


_LOADER = r"""
import hashlib, importlib.abc, io, sys

class NoProjectCode(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("services", "common", "tests", "bench"):
            raise ImportError(f"project module {name} imported while loading a kernel")
        return None

sys.meta_path.insert(0, NoProjectCode())
import torch

data = open(sys.argv[1], "rb").read()
assert hashlib.sha256(data).hexdigest() == sys.argv[2], "checksum"
module = torch.export.load(io.BytesIO(data)).module()
out = module(torch.randn(5, 8))
out = out[0] if isinstance(out, (tuple, list)) else out
(out - 1).square().mean().backward()
grads = [p.grad is not None for p in module.parameters()]
assert grads and all(grads), grads
print("loaded", tuple(out.shape))
"""


@pytest.mark.slow
def test_kernel_loads_and_trains_in_a_process_without_project_code(
    mlp_artifact: bytes, tmp_path: Path
) -> None:
    path = tmp_path / "kernel.pt2"
    path.write_bytes(mlp_artifact)
    done = subprocess.run(
        [sys.executable, "-I", "-c", _LOADER, str(path), sha256_hex(mlp_artifact)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "loaded (5, 8)" in done.stdout
