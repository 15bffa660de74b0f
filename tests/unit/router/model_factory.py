"""Small exported models for the router's tests: an MLP through `torch.export`, dynamic batch."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from common.kernels import save_program
from common.stubs import common_pb2, registry_pb2
from services.router.artifacts import LoadedModel, load_model

IN_FEATURES = 8
OUT_FEATURES = 3


def mlp(seed: int = 0, in_features: int = IN_FEATURES, hidden: int = 16) -> nn.Module:
    """A small MLP with fixed weights (same seed, same function)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, OUT_FEATURES)
    ).eval()


def export(module: nn.Module, in_features: int = IN_FEATURES, max_batch: int = 4096) -> bytes:
    """`model.pt2` bytes of `module` with a dynamic batch dimension, saved without pickle."""
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    program = torch.export.export(
        module, (torch.randn(4, in_features),), dynamic_shapes=({0: batch},)
    )
    return save_program(program)


def export_with_pickled_inputs(module: nn.Module, in_features: int = IN_FEATURES) -> bytes:
    """A `model.pt2` saved the default way: its example inputs are a pickle (must be refused)."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(
        module, (torch.randn(4, in_features),), dynamic_shapes=({0: batch},)
    )
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest(reference: Mapping[str, Any] | None = None, **extra: Any) -> bytes:
    body: dict[str, Any] = {"host_template": "mlp", "slots": [], "kernel_ids": [], **extra}
    if reference is not None:
        body["input_reference"] = reference
    return json.dumps(body).encode()


def signature(in_features: int = IN_FEATURES, name: str = "x") -> registry_pb2.InputSignature:
    return registry_pb2.InputSignature(
        inputs=[
            common_pb2.TensorSpec(
                name=name, dtype=common_pb2.DTYPE_FLOAT32, shape=[-1, in_features]
            )
        ],
        outputs=[
            common_pb2.TensorSpec(
                name="y", dtype=common_pb2.DTYPE_FLOAT32, shape=[-1, OUT_FEATURES]
            )
        ],
    )


def version_record(
    model_bytes: bytes, manifest_bytes: bytes, *, name: str = "m", version: int = 1
) -> registry_pb2.ModelVersion:
    """The registry's record of a version holding these files."""
    return registry_pb2.ModelVersion(
        name=name,
        version=version,
        input_signature=signature(),
        files=[
            registry_pb2.ArtifactFile(
                name="model.pt2", sha256=sha256(model_bytes), size_bytes=len(model_bytes)
            ),
            registry_pb2.ArtifactFile(
                name="manifest.json", sha256=sha256(manifest_bytes), size_bytes=len(manifest_bytes)
            ),
        ],
    )


def loaded(
    module: nn.Module | None = None, reference: Mapping[str, Any] | None = None
) -> LoadedModel:
    """A `LoadedModel` of `module` (default: `mlp()`), through the real checks."""
    model_bytes = export(module if module is not None else mlp())
    manifest_bytes = manifest(reference)
    record = version_record(model_bytes, manifest_bytes)
    return load_model(model_bytes, sha256(model_bytes), manifest_bytes, record)
