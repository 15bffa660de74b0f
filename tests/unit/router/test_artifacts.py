"""Checking and loading a version's files: checksums first, no pickle, signatures."""

from __future__ import annotations

import pytest
import torch

from common.errors import IntegrityError
from common.stubs import common_pb2, registry_pb2
from services.router import reference_from_samples
from services.router.artifacts import load_model, merge_signatures, signature_from_program
from services.router.tensors import Signature, TensorSpec
from tests.unit.router import model_factory as mf


def test_a_version_loads_and_computes_what_the_module_computes() -> None:
    module = mf.mlp(seed=3)
    model = mf.loaded(module)
    replica = model.replica_module("cpu")
    x = torch.randn(5, mf.IN_FEATURES)
    with torch.inference_mode():
        assert torch.allclose(replica(x), module(x), atol=1e-6)
    assert [s.name for s in model.signature.inputs] == ["x"]
    assert model.signature.batchable and model.signature.max_batch == 4096
    assert not any(p.requires_grad for p in replica.parameters())


def test_a_checksum_mismatch_is_refused_before_anything_is_parsed() -> None:
    model_bytes = mf.export(mf.mlp())
    manifest_bytes = mf.manifest()
    record = mf.version_record(model_bytes, manifest_bytes)
    corrupted = bytearray(model_bytes)
    corrupted[len(corrupted) // 2] ^= 0xFF
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        load_model(bytes(corrupted), mf.sha256(model_bytes), manifest_bytes, record)


def test_a_manifest_that_does_not_match_its_record_is_refused() -> None:
    model_bytes = mf.export(mf.mlp())
    record = mf.version_record(model_bytes, mf.manifest())
    with pytest.raises(IntegrityError, match=r"manifest\.json"):
        load_model(model_bytes, mf.sha256(model_bytes), mf.manifest(extra=1), record)


def test_an_archive_with_pickled_example_inputs_is_refused() -> None:
    model_bytes = mf.export_with_pickled_inputs(mf.mlp())
    record = mf.version_record(model_bytes, mf.manifest())
    with pytest.raises(IntegrityError, match="pickled example inputs"):
        load_model(model_bytes, mf.sha256(model_bytes), mf.manifest(), record)


def test_the_program_declares_its_own_signature() -> None:
    program = torch.export.export(
        mf.mlp(), (torch.randn(4, mf.IN_FEATURES),), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},)
    )
    sig = signature_from_program(program)
    assert sig.inputs[0].shape == (-1, mf.IN_FEATURES) and sig.inputs[0].dtype == torch.float32
    assert sig.outputs[0].shape == (-1, mf.OUT_FEATURES)
    assert sig.max_batch is None


def test_the_registry_signature_is_tightened_by_the_program_and_must_agree_with_it() -> None:
    own = Signature((TensorSpec("input", torch.float32, (-1, 8)),), max_batch=64)
    declared = Signature((TensorSpec("x", torch.float32, (-1, -1)),))
    merged = merge_signatures(declared, own)
    assert merged.inputs[0] == TensorSpec("x", torch.float32, (-1, 8))
    assert merged.max_batch == 64
    for wrong in (
        Signature((TensorSpec("x", torch.float64, (-1, 8)),)),
        Signature((TensorSpec("x", torch.float32, (-1, 7)),)),
        Signature((TensorSpec("x", torch.float32, (-1,)),)),
        Signature(()),
    ):
        with pytest.raises(IntegrityError):
            merge_signatures(wrong, own)


def test_drift_reference_comes_from_the_manifest() -> None:
    ref = reference_from_samples(torch.randn(500, mf.IN_FEATURES))
    model = mf.loaded(
        reference={"schema": 1, "sample_count": 500, "inputs": {"x": ref.model_dump()}}
    )
    assert model.reference["x"] == ref and model.reference_problem is None


def test_a_malformed_drift_reference_is_reported_not_fatal() -> None:
    model = mf.loaded(reference={"inputs": {"x": {"edges": [[1.0, 0.0]], "proportions": [[1.0]]}}})
    assert model.reference == {}
    assert (
        model.reference_problem is not None
        and "input_reference.inputs.x" in model.reference_problem
    )


def test_without_a_manifest_reference_the_registry_moments_are_used() -> None:
    model_bytes = mf.export(mf.mlp())
    manifest_bytes = mf.manifest()
    record = mf.version_record(model_bytes, manifest_bytes)
    record.reference_statistics.CopyFrom(
        registry_pb2.ReferenceStatistics(
            sample_count=10,
            inputs=[
                registry_pb2.InputStatistics(name="x", feature_dim=1, mean=[0.0] * 8, std=[1.0] * 8)
            ],
        )
    )
    model = load_model(model_bytes, mf.sha256(model_bytes), manifest_bytes, record)
    assert model.reference["x"].features == 8


def test_a_registry_signature_naming_an_unknown_dtype_falls_back_to_the_program() -> None:
    model_bytes = mf.export(mf.mlp())
    manifest_bytes = mf.manifest()
    record = mf.version_record(model_bytes, manifest_bytes)
    record.input_signature.inputs[0].dtype = common_pb2.DTYPE_UNSPECIFIED
    model = load_model(model_bytes, mf.sha256(model_bytes), manifest_bytes, record)
    assert model.signature.inputs[0].name == "input"  # the program's own name for it
    assert model.signature.inputs[0].dtype == torch.float32
