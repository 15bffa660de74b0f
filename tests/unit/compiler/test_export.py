"""Export and load: deterministic bytes, checks before parsing, no pickle, trainable kernels."""

from __future__ import annotations

import io
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from common.errors import IntegrityError
from services.compiler.blueprint import (
    Blueprint,
    Conv2dSlot,
    LinearSlot,
    analyse_blueprint,
    canonical_json,
)
from services.compiler.build import build_module
from services.compiler.catalogue import get_blueprint
from services.compiler.export import (
    check_archive,
    export_kernel,
    kernel_id,
    kernel_info,
    load_kernel,
    sha256_hex,
)

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


def test_checksum_mismatch_is_refused_before_parsing(mlp_artifact: bytes) -> None:
    wrong = "0" * 64
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        load_kernel(mlp_artifact, wrong)
    garbage = b"not a kernel at all"
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        load_kernel(garbage, sha256_hex(mlp_artifact))
    with pytest.raises(IntegrityError, match="not a PT2 archive"):
        load_kernel(garbage, sha256_hex(garbage))


def test_truncated_archive_is_refused(mlp_artifact: bytes) -> None:
    cut = mlp_artifact[: len(mlp_artifact) // 2]
    with pytest.raises(IntegrityError):
        load_kernel(cut, sha256_hex(cut))


class _NoUnpickling:
    """Makes every way torch.export.load could unpickle fail, and counts the attempts."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.attempts: list[str] = []

        def forbid(name: str) -> Any:
            def refuse(*args: Any, **kwargs: Any) -> Any:
                how = f"(weights_only={kwargs['weights_only']})" if "weights_only" in kwargs else ""
                self.attempts.append(name + how)
                raise AssertionError(f"{name} called while loading a kernel")

            return refuse

        monkeypatch.setattr(torch, "load", forbid("torch.load"))
        monkeypatch.setattr(pickle, "load", forbid("pickle.load"))
        monkeypatch.setattr(pickle, "loads", forbid("pickle.loads"))
        monkeypatch.setattr(pickle, "Unpickler", forbid("pickle.Unpickler"))
        monkeypatch.setattr(torch._C, "_pickle_load_obj", forbid("torch._C._pickle_load_obj"))


def test_loading_a_kernel_never_unpickles(
    mlp_artifact: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    guard = _NoUnpickling(monkeypatch)
    kernel = load_kernel(mlp_artifact, sha256_hex(mlp_artifact))
    kernel(torch.randn(3, 8)).sum().backward()
    assert guard.attempts == []


def test_default_torch_export_save_would_unpickle(monkeypatch: pytest.MonkeyPatch) -> None:
    # The guard above can fail: a program saved the default way reaches torch.load for its
    # example inputs, and when the restricted unpickler fails, falls back to a full unpickle.
    program = torch.export.export(nn.Linear(8, 8), (torch.zeros(2, 8),))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    data = buffer.getvalue()
    with pytest.raises(IntegrityError, match="pickled example inputs"):
        check_archive(data)
    guard = _NoUnpickling(monkeypatch)
    with pytest.raises(AssertionError, match=r"torch\.load called"):
        torch.export.load(io.BytesIO(data))
    assert guard.attempts == ["torch.load(weights_only=True)", "torch.load(weights_only=False)"]


def test_archive_with_unexpected_entries_is_refused(mlp_artifact: bytes) -> None:
    buffer = io.BytesIO()
    with (
        zipfile.ZipFile(io.BytesIO(mlp_artifact)) as source,
        zipfile.ZipFile(buffer, "w") as target,
    ):
        for item in source.infolist():
            target.writestr(item, source.read(item))
        target.writestr("archive/data/constants/custom_obj_0", b"\x80\x02}q\x00.")
    with pytest.raises(IntegrityError, match="unexpected entry"):
        check_archive(buffer.getvalue())


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


def test_loaded_kernel_trains(mlp_artifact: bytes) -> None:
    kernel = load_kernel(mlp_artifact, sha256_hex(mlp_artifact))
    assert all(p.requires_grad for p in kernel.parameters())
    x, target = torch.randn(16, 8), torch.randn(16, 8)
    before = kernel(x).detach()
    assert before.abs().max() == 0  # the catalogue's zero start
    optimiser = torch.optim.SGD(kernel.parameters(), lr=0.1)
    loss = (kernel(x) - target).square().mean()
    loss.backward()
    optimiser.step()
    assert (kernel(x) - before).abs().max() > 0


def test_streamlined_kernel_computes_what_the_exported_program_computes(
    mlp_artifact: bytes,
) -> None:
    kernel = load_kernel(mlp_artifact, sha256_hex(mlp_artifact))
    program = torch.export.load(io.BytesIO(mlp_artifact)).module()
    with torch.no_grad():
        for param in kernel.parameters():
            param.normal_()
    program.load_state_dict(kernel.state_dict())
    x = torch.randn(5, 8)
    torch.testing.assert_close(kernel(x), program(x))
    assert not kernel._forward_pre_hooks


def test_host_with_a_grafted_kernel_can_switch_modes(mlp_artifact: bytes) -> None:
    host = nn.Sequential(nn.Linear(8, 8), load_kernel(mlp_artifact, sha256_hex(mlp_artifact)))
    host.eval()
    assert not host[1].training
    host.train()
    assert host[1].training


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
