"""The exported model: servable without project code, same outputs, honest manifest."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from common.drift import reference_from_samples
from common.kernels import check_archive
from common.stubs import registry_pb2
from services.compiler import BlueprintCompiler
from services.router.artifacts import drift_reference as router_drift_reference
from services.router.drift import DriftAccumulator
from services.trainer.export import drift_reference, export_model, reference_statistics
from services.trainer.loop import Trainer
from tests.unit.trainer.conftest import growth_spec, make_controller
from tests.unit.trainer.inprocess import CompilerKernelSource, SelectorClient

# Runs under `python -I`: no project on the path, no PYTHONPATH, only torch and safetensors.
_SERVE = """
import hashlib, json, sys
import torch
from safetensors.torch import load_file, save_file
folder, inputs, outputs = sys.argv[1:4]
manifest = json.load(open(folder + "/manifest.json"))
data = open(folder + "/model.pt2", "rb").read()
assert hashlib.sha256(data).hexdigest() == manifest["files"]["model.pt2"]["sha256"]
program = torch.export.load(folder + "/model.pt2")
assert not any(m.split(".")[0] in ("services", "common", "tests") for m in sys.modules)
x = load_file(inputs)["x"]
save_file({"y": program.module()(x).contiguous()}, outputs)
"""


@pytest.mark.slow
def test_exported_model_serves_in_a_fresh_python_without_project_code(
    compiler: BlueprintCompiler, tmp_path: Path
) -> None:
    spec = growth_spec()
    spec["max_steps"] = 45
    selector, source = SelectorClient(), CompilerKernelSource(compiler)
    trainer = Trainer(spec, growth=make_controller(spec, selector, source))
    result = trainer.run()
    assert any(s.kernel_id for s in result.slots)  # a seed is in the exported model
    exported = trainer.export(tmp_path / "model", job={"job_id": "j-1"})

    x = torch.randn(13, 2)  # another batch size than the export example
    save_file({"x": x}, tmp_path / "in.safetensors")
    command = [
        sys.executable,
        "-I",
        "-c",
        _SERVE,
        str(exported.directory),
        str(tmp_path / "in.safetensors"),
        str(tmp_path / "out.safetensors"),
    ]
    served = subprocess.run(command, cwd=tmp_path, capture_output=True, timeout=120, check=False)
    assert served.returncode == 0, served.stderr.decode()[-3000:]
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(x)
    assert torch.allclose(load_file(tmp_path / "out.safetensors")["y"], expected, atol=1e-6)

    manifest = json.loads((exported.directory / "manifest.json").read_text())
    for name in ("model.pt2", "model.safetensors"):
        data = (exported.directory / name).read_bytes()
        assert manifest["files"][name]["sha256"] == hashlib.sha256(data).hexdigest()
    check_archive((exported.directory / "model.pt2").read_bytes())
    assert manifest["kernel_ids"] == sorted({s.kernel_id for s in result.slots if s.kernel_id})
    assert manifest["inputs"][0]["shape"] == [-1, 2] and manifest["outputs"][0]["shape"] == [-1, 2]
    assert manifest["host"]["template"] == "mlp" and manifest["job"]["job_id"] == "j-1"
    assert manifest["param_count"] == trainer.param_count()
    assert set(manifest["metrics"]) >= {"train_accuracy", "val_loss", "test_accuracy"}
    assert len(manifest["reference_statistics"]["mean"]) == 2
    weights = load_file(exported.directory / "model.safetensors")
    assert weights.keys() == trainer.model.state_dict().keys()


def test_reference_statistics_describe_each_feature() -> None:
    x = torch.stack([torch.arange(101.0), torch.full((101,), 3.0)], dim=1)
    stats = reference_statistics(x, bins=4)
    assert stats["features"] == 2 and stats["rows"] == 101
    assert stats["mean"] == pytest.approx([50.0, 3.0])
    assert stats["quantile_edges"][0] == pytest.approx([0.0, 25.0, 50.0, 75.0, 100.0])
    assert stats["quantile_edges"][1] == pytest.approx([3.0] * 5)
    assert stats["std"][1] == 0.0


def _export_small(tmp_path: Path, reference_inputs: torch.Tensor) -> dict[str, Any]:
    features = reference_inputs.shape[1]
    model = nn.Sequential(nn.Flatten(), nn.LazyLinear(2)) if reference_inputs.dim() > 2 else None
    if model is None:
        model = nn.Sequential(nn.Linear(features, 4), nn.ReLU(), nn.Linear(4, 2))
    else:
        model(reference_inputs[:2])  # materialise the lazy layer
    exported = export_model(
        model,
        tmp_path,
        example=reference_inputs[:4].clone(),
        reference_inputs=reference_inputs,
        host={"template": "mlp"},
        slots=[],
        metrics={},
        num_outputs=2,
        task="classification",
    )
    manifest: dict[str, Any] = json.loads((exported.directory / "manifest.json").read_text())
    return manifest


def test_an_exported_manifest_gives_the_router_its_drift_reference_without_fallback(
    tmp_path: Path,
) -> None:
    train_x = torch.randn(3000, 3) * torch.tensor([1.0, 5.0, 0.1]) + torch.tensor([0.0, 2.0, -1.0])
    manifest = _export_small(tmp_path, train_x)
    assert manifest["input_reference"]["sample_count"] == 3000
    # No registry statistics: whatever the router finds came from the manifest.
    reference, problem = router_drift_reference(manifest, registry_pb2.ReferenceStatistics())
    assert problem is None and set(reference) == {"x"}
    assert reference["x"] == reference_from_samples(train_x)
    assert reference["x"].features == 3
    # Served inputs like the training inputs do not drift; shifted ones do.
    accumulator = DriftAccumulator(reference, window_rows=2000)
    like = accumulator.observe({"x": train_x[:2000]}, 2000)
    assert like is not None and not like.over(0.1)
    shift = torch.tensor([3.0, 0.0, 3.0])  # features 0 and 2 move, feature 1 stays
    shifted = accumulator.observe({"x": train_x[:2000] + shift}, 2000)
    assert shifted is not None and {f for _, f, _ in shifted.over(0.25)} == {0, 2}


def test_image_inputs_get_a_reference_per_channel_and_flat_inputs_none(tmp_path: Path) -> None:
    images = _export_small(tmp_path / "images", torch.randn(64, 3, 4, 4))
    reference, problem = router_drift_reference(images, registry_pb2.ReferenceStatistics())
    assert problem is None and reference["x"].features == 3
    assert drift_reference(torch.randn(50)) is None
