"""A model version's artifacts, checked and loaded: no pickle, checksums first. No network.

A version is `model.pt2` (the whole model exported with `torch.export`, loaded
through `common.kernels.load_program`: sha256, then `check_archive`, then
`torch.export.load`), `manifest.json` (JSON; the router reads only its
`input_reference`, see `drift`) and `model.safetensors` (the weights again, for
other consumers: the router does not download it, the archive carries them).

The input signature comes from the registry (`InputSignature`) when the
version has one, else from the exported program itself (its placeholders'
shapes and dtypes, a symbolic size becoming -1).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import ValidationError
from torch.utils._sympy.numbers import int_oo

from common.drift import INPUT_REFERENCE_KEY
from common.errors import IntegrityError
from common.kernels import EXPORT_LOCK, load_program, streamline
from common.stubs import registry_pb2
from services.router.drift import (
    InputReference,
    ReferenceStatistics,
    reference_from_moments,
)
from services.router.tensors import Signature, TensorSpec, dtype_from_proto

__all__ = [
    "MANIFEST_FILE",
    "MODEL_FILE",
    "REFERENCE_KEY",
    "LoadedModel",
    "drift_reference",
    "load_model",
    "merge_signatures",
    "parse_manifest",
    "signature_from_program",
    "signature_from_proto",
    "verify_sha256",
]

MODEL_FILE = "model.pt2"
MANIFEST_FILE = "manifest.json"
REFERENCE_KEY = INPUT_REFERENCE_KEY


def verify_sha256(data: bytes, expected: str, what: str) -> None:
    """`IntegrityError` unless `data` hashes to `expected` (lowercase hex)."""
    actual = hashlib.sha256(data).hexdigest()
    if not hmac.compare_digest(actual, expected.strip().lower()):
        raise IntegrityError(f"{what}: checksum mismatch: expected sha256 {expected}, got {actual}")


def parse_manifest(data: bytes) -> dict[str, Any]:
    """The manifest as a JSON object; `IntegrityError` when it is not one."""
    try:
        manifest = json.loads(data)
    except ValueError as exc:
        raise IntegrityError(f"{MANIFEST_FILE} is not JSON: {exc}") from exc
    if not isinstance(manifest, dict):
        raise IntegrityError(f"{MANIFEST_FILE} is not a JSON object")
    return manifest


def signature_from_proto(signature: registry_pb2.InputSignature) -> Signature | None:
    """The registry's signature, or None when it has none (or names an unknown dtype)."""
    if not signature.inputs:
        return None
    specs: list[list[TensorSpec]] = [[], []]
    for bucket, messages in zip(specs, (signature.inputs, signature.outputs), strict=True):
        for spec in messages:
            dtype = dtype_from_proto(spec.dtype)
            if dtype is None:
                return None
            bucket.append(TensorSpec(spec.name, dtype, tuple(int(d) for d in spec.shape)))
    return Signature(tuple(specs[0]), tuple(specs[1]))


def _spec_of(name: str, value: object) -> TensorSpec:
    if not isinstance(value, torch.Tensor):
        raise IntegrityError(f"{MODEL_FILE}: {name} is not a tensor ({type(value).__name__})")
    shape = tuple(d if isinstance(d, int) else -1 for d in value.shape)
    return TensorSpec(name, value.dtype, shape)


def _batch_limit(program: torch.export.ExportedProgram, values: list[object]) -> int | None:
    """The largest dim-0 size the program was exported for, when its inputs' dim 0 is bounded."""
    limit: int | None = None
    for value in values:
        if not isinstance(value, torch.Tensor) or not value.shape:
            continue
        size = value.shape[0]
        if isinstance(size, int):
            continue
        bounds = program.range_constraints.get(size.node.expr)
        if bounds is None or bounds.upper is int_oo:
            continue
        try:
            upper = int(bounds.upper)
        except (TypeError, ValueError, AttributeError):
            continue
        limit = upper if limit is None else min(limit, upper)
    return limit


def signature_from_program(program: torch.export.ExportedProgram) -> Signature:
    """The signature the program itself declares: user inputs and outputs, in call order.

    `max_batch` is the upper bound of a symbolic batch dimension, when the
    program was exported with one. Lower bounds are not enforced: torch.export
    gives `Dim.DYNAMIC` a minimum of 2 only to avoid specialising on size 1, and
    batch-wise models run at size 1 all the same.
    """
    nodes = {node.name: node for node in program.graph.nodes}
    values = [nodes[name].meta.get("val") for name in program.graph_signature.user_inputs]
    inputs = [
        _spec_of(name, value)
        for name, value in zip(program.graph_signature.user_inputs, values, strict=True)
    ]
    output = program.graph.output_node()
    results = output.args[0]
    out_nodes = results if isinstance(results, tuple | list) else (results,)
    user_outputs = set(program.graph_signature.user_outputs)
    outputs = [
        _spec_of(node.name, node.meta.get("val"))
        for node in out_nodes
        if isinstance(node, torch.fx.Node) and node.name in user_outputs
    ]
    return Signature(tuple(inputs), tuple(outputs), _batch_limit(program, values))


def merge_signatures(declared: Signature | None, own: Signature) -> Signature:
    """The registry's signature (names, dtypes) tightened by what the program itself fixes.

    A dimension the registry calls dynamic but the program was exported with a
    fixed size takes that size, and the program's batch limit holds; when the
    two disagree on the number of inputs, their dtypes or their ranks, the
    version is refused (`IntegrityError`): its metadata does not describe it.
    """
    if declared is None:
        return own
    if len(declared.inputs) != len(own.inputs):
        raise IntegrityError(
            f"the registry's input signature has {len(declared.inputs)} inputs, "
            f"{MODEL_FILE} takes {len(own.inputs)}"
        )
    merged: list[TensorSpec] = []
    for spec, actual in zip(declared.inputs, own.inputs, strict=True):
        if spec.dtype != actual.dtype or len(spec.shape) != len(actual.shape):
            raise IntegrityError(
                f"input {spec.name!r}: the registry says {spec.describe()}, "
                f"{MODEL_FILE} takes {actual.describe()}"
            )
        shape = tuple(a if d == -1 else d for d, a in zip(spec.shape, actual.shape, strict=True))
        for d, a in zip(spec.shape, actual.shape, strict=True):
            if d != -1 and a not in (-1, d):
                raise IntegrityError(
                    f"input {spec.name!r}: the registry says {spec.describe()}, "
                    f"{MODEL_FILE} takes {actual.describe()}"
                )
        merged.append(TensorSpec(spec.name, spec.dtype, shape))
    outputs = own.outputs if own.outputs else declared.outputs
    return Signature(tuple(merged), outputs, own.max_batch)


def drift_reference(
    manifest: Mapping[str, Any], statistics: registry_pb2.ReferenceStatistics
) -> tuple[dict[str, InputReference], str | None]:
    """Per input, the reference drift is measured against, and a problem to report, if any.

    The manifest's `input_reference` wins; without it, inputs whose registry
    statistics carry per-feature mean and std get a normal approximation.
    """
    raw = manifest.get(REFERENCE_KEY)
    if raw is not None:
        try:
            return dict(ReferenceStatistics.model_validate(raw).inputs), None
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            return {}, f"{MANIFEST_FILE} {REFERENCE_KEY}.{where}: {first['msg']}"
    found: dict[str, InputReference] = {}
    for stats in statistics.inputs:
        ref = reference_from_moments(list(stats.mean), list(stats.std), stats.feature_dim)
        if ref is not None:
            found[stats.name] = ref
    return found, None


@dataclass(frozen=True)
class LoadedModel:
    """A version ready to be served: its program, signature and drift reference."""

    program: torch.export.ExportedProgram
    signature: Signature
    manifest: Mapping[str, Any]
    reference: Mapping[str, InputReference]
    reference_problem: str | None

    def replica_module(self, device: str) -> torch.nn.Module:
        """A fresh module of the program for one replica on `device`, frozen for inference.

        `streamline` drops the per-call constraint checks (the router checks the
        signature itself) and the pytree handling that make the exported module
        slower than eager.
        """
        with EXPORT_LOCK:  # versions load on worker threads
            module = streamline(self.program.module())
        for parameter in module.parameters():
            parameter.requires_grad_(False)
        return module.to(device)


def load_model(
    model_bytes: bytes,
    model_sha256: str,
    manifest_bytes: bytes,
    version: registry_pb2.ModelVersion,
) -> LoadedModel:
    """Check and load a version's files; `IntegrityError` on any checksum or structure problem.

    The checksums are those the registry recorded for the version (`version.files`).
    """
    listed = {f.name: f.sha256 for f in version.files}
    if MANIFEST_FILE in listed:
        verify_sha256(manifest_bytes, listed[MANIFEST_FILE], MANIFEST_FILE)
    manifest = parse_manifest(manifest_bytes)
    program = load_program(model_bytes, model_sha256)
    signature = merge_signatures(
        signature_from_proto(version.input_signature), signature_from_program(program)
    )
    reference, problem = drift_reference(manifest, version.reference_statistics)
    return LoadedModel(program, signature, manifest, reference, problem)
