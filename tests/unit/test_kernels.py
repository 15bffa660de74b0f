"""`common.kernels`: archives saved without pickle, checked before parsing, loaded trainable.

Kernels here are plain torch modules exported the way the compiler exports them
(dynamic batch, `extra/kernel.json`), so these tests need no service code.
"""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from typing import Any

import pytest
import torch
from torch import nn
from torch.export import Dim

from common.errors import IntegrityError
from common.kernels import (
    KERNEL_INFO_FILE,
    check_archive,
    kernel_info,
    load_kernel,
    load_program,
    save_program,
    sha256_hex,
)

FEATURES = 8


class _Kernel(nn.Module):
    """A pre-norm MLP whose output projection starts at zero, like a catalogue kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(FEATURES)
        self.fc = nn.Linear(FEATURES, 16)
        self.out = nn.Linear(16, FEATURES)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden: torch.Tensor = nn.functional.gelu(self.fc(self.norm(x)))  # (B, 16)
        out: torch.Tensor = self.out(hidden)  # (B, F)
        return out


def _export(module: nn.Module, *, training: bool = True) -> torch.export.ExportedProgram:
    module.train(training)
    batch = Dim("batch", min=1)
    return torch.export.export(module, (torch.zeros(2, FEATURES),), dynamic_shapes=({0: batch},))


def _kernel_bytes(module: nn.Module | None = None, *, training: bool = True) -> bytes:
    program = _export(module or _Kernel(), training=training)
    info = json.dumps({"training": training})
    return save_program(program, extra_files={KERNEL_INFO_FILE: info})


@pytest.fixture(scope="module")
def artifact() -> bytes:
    torch.manual_seed(0)
    return _kernel_bytes()


def _rewrite(data: bytes, change: dict[str, bytes | None]) -> bytes:
    """`data` with entries (names relative to the archive's root) replaced, added or removed."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as source, zipfile.ZipFile(buffer, "w") as target:
        root = source.namelist()[0].split("/", 1)[0] + "/"
        for item in source.infolist():
            name = item.filename[len(root) :]
            if name not in change:
                target.writestr(item, source.read(item))
        for name, payload in change.items():
            if payload is not None:
                target.writestr(root + name, payload)
    return buffer.getvalue()


class NoUnpickling:
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


# --- saving -----------------------------------------------------------------------------------


def test_saved_program_has_no_example_inputs_and_passes_the_archive_check(artifact: bytes) -> None:
    check_archive(artifact)
    with zipfile.ZipFile(io.BytesIO(artifact)) as archive:
        sizes = {i.filename.split("/", 1)[1]: i.file_size for i in archive.infolist()}
        program_json = next(n for n in archive.namelist() if n.endswith("models/model.json"))
        assert "stack_trace" not in archive.read(program_json).decode()
    assert sizes.get("data/sample_inputs/model.pt", 0) == 0
    assert kernel_info(artifact) == {"training": True}


def test_saving_leaves_the_callers_example_inputs_in_place() -> None:
    program = _export(_Kernel())
    before = program.example_inputs
    assert before is not None
    save_program(program)
    assert program.example_inputs is before


def test_same_program_saves_to_identical_bytes() -> None:
    module = _Kernel()
    assert save_program(_export(module)) == save_program(_export(module))


def test_extra_file_names_must_be_json_names() -> None:
    with pytest.raises(ValueError, match=r"name\.json"):
        save_program(_export(_Kernel()), extra_files={"../escape": "{}"})


# --- checks before parsing --------------------------------------------------------------------


def test_checksum_mismatch_is_refused_before_parsing(artifact: bytes) -> None:
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        load_kernel(artifact, "0" * 64)
    garbage = b"not a kernel at all"
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        load_kernel(garbage, sha256_hex(artifact))
    with pytest.raises(IntegrityError, match="not a PT2 archive"):
        load_kernel(garbage, sha256_hex(garbage))
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        load_program(artifact, "f" * 64)


def test_truncated_archive_is_refused(artifact: bytes) -> None:
    cut = artifact[: len(artifact) // 2]
    with pytest.raises(IntegrityError):
        load_kernel(cut, sha256_hex(cut))


def test_archive_with_unexpected_entries_is_refused(artifact: bytes) -> None:
    tampered = _rewrite(artifact, {"data/constants/custom_obj_0": b"\x80\x02}q\x00."})
    with pytest.raises(IntegrityError, match="unexpected entry"):
        check_archive(tampered)


def test_archive_storing_a_tensor_through_pickle_is_refused(artifact: bytes) -> None:
    with zipfile.ZipFile(io.BytesIO(artifact)) as archive:
        name = next(n for n in archive.namelist() if n.endswith("model_weights_config.json"))
        config = json.loads(archive.read(name))
    first = next(iter(config["config"]))
    config["config"][first]["use_pickle"] = True
    tampered = _rewrite(
        artifact, {"data/weights/model_weights_config.json": json.dumps(config).encode()}
    )
    with pytest.raises(IntegrityError, match="through pickle"):
        load_kernel(tampered, sha256_hex(tampered))


def test_kernel_without_its_info_file_is_refused(artifact: bytes) -> None:
    bare = _rewrite(artifact, {f"extra/{KERNEL_INFO_FILE}": None})
    check_archive(bare)  # a valid program...
    with pytest.raises(IntegrityError, match=r"lacks extra/kernel\.json"):
        load_kernel(bare, sha256_hex(bare))  # ...but not a kernel


def test_loading_a_kernel_never_unpickles(artifact: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    guard = NoUnpickling(monkeypatch)
    kernel = load_kernel(artifact, sha256_hex(artifact))
    kernel(torch.randn(3, FEATURES)).sum().backward()
    assert guard.attempts == []


def test_default_torch_export_save_is_refused_and_would_unpickle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The guard above can fail: a program saved the default way reaches torch.load for its
    # example inputs, and when the restricted unpickler fails, falls back to a full unpickle.
    buffer = io.BytesIO()
    torch.export.save(_export(_Kernel()), buffer)
    data = buffer.getvalue()
    with pytest.raises(IntegrityError, match="pickled example inputs"):
        load_program(data, sha256_hex(data))
    guard = NoUnpickling(monkeypatch)
    with pytest.raises(AssertionError, match=r"torch\.load called"):
        torch.export.load(io.BytesIO(data))
    assert guard.attempts == ["torch.load(weights_only=True)", "torch.load(weights_only=False)"]


# --- loaded kernels ---------------------------------------------------------------------------


def test_loaded_kernel_has_a_dynamic_batch_and_matches_eager(artifact: bytes) -> None:
    kernel = load_kernel(artifact, sha256_hex(artifact))
    eager = _Kernel()
    with torch.no_grad():
        for param in kernel.parameters():
            param.normal_()
    eager.load_state_dict(kernel.state_dict())
    for batch in (1, 7, 64):
        x = torch.randn(batch, FEATURES)
        torch.testing.assert_close(kernel(x), eager(x))


def test_loaded_kernel_trains(artifact: bytes) -> None:
    kernel = load_kernel(artifact, sha256_hex(artifact))
    assert all(p.requires_grad for p in kernel.parameters())
    x, target = torch.randn(16, FEATURES), torch.randn(16, FEATURES)
    before = kernel(x).detach()
    assert before.abs().max() == 0
    optimiser = torch.optim.SGD(kernel.parameters(), lr=0.1)
    (kernel(x) - target).square().mean().backward()
    optimiser.step()
    assert (kernel(x) - before).abs().max() > 0


def test_streamlined_kernel_computes_what_the_exported_program_computes(artifact: bytes) -> None:
    kernel = load_kernel(artifact, sha256_hex(artifact))
    program = torch.export.load(io.BytesIO(artifact)).module()
    with torch.no_grad():
        for param in kernel.parameters():
            param.normal_()
    program.load_state_dict(kernel.state_dict())
    x = torch.randn(5, FEATURES)
    torch.testing.assert_close(kernel(x), program(x))
    assert not kernel._forward_pre_hooks
    assert isinstance(kernel(x), torch.Tensor)  # not a 1-tuple


def test_host_with_a_grafted_kernel_can_switch_modes(artifact: bytes) -> None:
    host = nn.Sequential(nn.Linear(FEATURES, FEATURES), load_kernel(artifact, sha256_hex(artifact)))
    host.eval()
    assert not host[1].training
    host.train()
    assert host[1].training


def test_kernel_loads_in_the_mode_it_was_compiled_in() -> None:
    data = _kernel_bytes(training=False)
    assert not load_kernel(data, sha256_hex(data)).training


# --- whole models -----------------------------------------------------------------------------


def test_whole_model_round_trips_through_save_and_load_program() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)
    ).eval()
    x = torch.randn(2, 3, 8, 8)
    manifest = json.dumps({"name": "tiny"})
    data = save_program(torch.export.export(model, (x,)), extra_files={"manifest.json": manifest})
    served = load_program(data, sha256_hex(data)).module()
    torch.testing.assert_close(served(x), model(x))
