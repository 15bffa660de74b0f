"""Requests checked on the way in (with field paths); records turned back into messages."""

from __future__ import annotations

import hashlib
import math
from typing import Any

import pytest

from common.errors import InvalidArgumentError, ResourceExhaustedError
from common.stubs import common_pb2, registry_pb2
from services.registry import ModelVersionRecord
from services.registry.convert import (
    VersionRef,
    model_ref_from_proto,
    new_version_from_metadata,
    search_query_from_request,
    version_to_proto,
)
from services.registry.search import Comparison

MB = 1024 * 1024


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def metadata(**overrides: Any) -> registry_pb2.ModelVersionMetadata:
    meta = registry_pb2.ModelVersionMetadata(
        name="mnist-mlp",
        description="a small MLP",
        metrics={"accuracy": 0.97, "val_loss": 0.1},
        tags={"dataset": "mnist1d"},
        lineage=registry_pb2.Lineage(job_id="job-1", kernel_ids=["ab" * 32], parent_version=0),
        input_signature=registry_pb2.InputSignature(
            inputs=[
                common_pb2.TensorSpec(name="x", dtype=common_pb2.DTYPE_FLOAT32, shape=[-1, 40])
            ],
            outputs=[
                common_pb2.TensorSpec(name="logits", dtype=common_pb2.DTYPE_FLOAT32, shape=[-1, 10])
            ],
        ),
        reference_statistics=registry_pb2.ReferenceStatistics(
            sample_count=100,
            inputs=[
                registry_pb2.InputStatistics(
                    name="x",
                    feature_dim=1,
                    mean=[0.0, 1.0],
                    std=[1.0, 2.0],
                    min=[-3.0, -2.0],
                    max=[3.0, 4.0],
                    histogram_edges=[-3.0, 0.0, 4.0],
                    histogram_counts=[40, 60],
                )
            ],
        ),
        files=[
            registry_pb2.ArtifactFile(name="model.pt2", sha256=sha(b"m"), size_bytes=1),
            registry_pb2.ArtifactFile(name="manifest.json", sha256=sha(b"{}"), size_bytes=2),
        ],
        aliases=["canary"],
        actor="trainer",
    )
    for key, value in overrides.items():
        if isinstance(value, list):
            field = getattr(meta, key)
            del field[:]
            field.extend(value)
        else:
            setattr(meta, key, value)
    return meta


def field_of(meta: registry_pb2.ModelVersionMetadata, max_file_bytes: int = MB) -> str:
    with pytest.raises(InvalidArgumentError) as err:
        new_version_from_metadata(meta, max_file_bytes=max_file_bytes)
    return err.value.field


def test_good_metadata_becomes_a_new_version() -> None:
    new = new_version_from_metadata(metadata(), max_file_bytes=MB)
    assert new.name == "mnist-mlp" and new.aliases == ("canary",) and new.actor == "trainer"
    assert new.metrics == {"accuracy": 0.97, "val_loss": 0.1}
    assert [f.name for f in new.files] == ["model.pt2", "manifest.json"]
    assert new.lineage.kernel_ids == ("ab" * 32,)
    parsed = registry_pb2.InputSignature.FromString(new.input_signature)
    assert parsed.inputs[0].name == "x"


def test_each_bad_field_is_named_by_its_path() -> None:
    assert field_of(metadata(name="bad name")) == "metadata.name"
    assert field_of(metadata(aliases=["Prod"])) == "metadata.aliases[0]"
    assert field_of(metadata(aliases=["canary", "canary"])) == "metadata.aliases[1]"
    meta = metadata()
    meta.metrics["val_loss"] = math.nan
    assert field_of(meta) == 'metadata.metrics["val_loss"]'
    meta = metadata()
    meta.lineage.kernel_ids.append("not-a-hash")
    assert field_of(meta) == "metadata.lineage.kernel_ids[1]"
    meta = metadata()
    meta.lineage.parent_version = -1
    assert field_of(meta) == "metadata.lineage.parent_version"
    meta = metadata()
    meta.files[1].sha256 = "XYZ"
    assert field_of(meta) == "metadata.files[1].sha256"
    meta = metadata()
    meta.files[0].name = "../model.pt2"
    assert field_of(meta) == "metadata.files[0].name"
    meta = metadata()
    meta.files[1].size_bytes = -1
    assert field_of(meta) == "metadata.files[1].size_bytes"


def test_files_must_include_the_model_and_its_manifest() -> None:
    meta = metadata()
    del meta.files[1]
    with pytest.raises(InvalidArgumentError, match=r"missing manifest\.json") as err:
        new_version_from_metadata(meta, max_file_bytes=MB)
    assert err.value.field == "metadata.files"
    meta = metadata()
    meta.files.append(registry_pb2.ArtifactFile(name="model.pt2", sha256=sha(b""), size_bytes=0))
    assert field_of(meta) == "metadata.files[2].name"


def test_a_file_over_the_size_limit_is_resource_exhausted() -> None:
    meta = metadata()
    meta.files[0].size_bytes = MB + 1
    with pytest.raises(ResourceExhaustedError, match="limit"):
        new_version_from_metadata(meta, max_file_bytes=MB)


def test_the_signature_and_statistics_are_checked() -> None:
    meta = metadata()
    meta.input_signature.inputs[0].dtype = common_pb2.DTYPE_UNSPECIFIED
    assert field_of(meta) == "metadata.input_signature.inputs[0].dtype"
    meta = metadata()
    meta.input_signature.outputs[0].shape[0] = -2
    assert field_of(meta) == "metadata.input_signature.outputs[0].shape[0]"
    meta = metadata()
    meta.reference_statistics.inputs[0].name = "y"
    assert field_of(meta) == "metadata.reference_statistics.inputs[0].name"
    meta = metadata()
    meta.reference_statistics.inputs[0].std.append(1.0)
    assert field_of(meta) == "metadata.reference_statistics.inputs[0]"
    meta = metadata()
    meta.reference_statistics.inputs[0].histogram_counts.append(3)
    assert field_of(meta) == "metadata.reference_statistics.inputs[0].histogram_edges"
    meta = metadata()
    meta.reference_statistics.inputs[0].histogram_edges[1] = -5.0
    assert field_of(meta) == "metadata.reference_statistics.inputs[0].histogram_edges"
    meta = metadata()
    meta.reference_statistics.inputs[0].std[0] = -1.0
    assert field_of(meta) == "metadata.reference_statistics.inputs[0].std"


def test_a_model_ref_resolves_to_version_alias_or_production() -> None:
    assert model_ref_from_proto(common_pb2.ModelRef(name="m", version=3)) == VersionRef(
        "m", version=3
    )
    assert model_ref_from_proto(common_pb2.ModelRef(name="m", alias="canary")) == VersionRef(
        "m", alias="canary"
    )
    assert model_ref_from_proto(common_pb2.ModelRef(name="m")) == VersionRef(
        "m", alias="production"
    )
    with pytest.raises(InvalidArgumentError) as err:
        model_ref_from_proto(common_pb2.ModelRef(name="m", version=0))
    assert err.value.field == "model.version"


def test_search_requests_are_checked_with_field_paths() -> None:
    request = registry_pb2.SearchModelVersionsRequest(
        name="m",
        tags={"team": "vision"},
        metric_filters=[
            registry_pb2.MetricFilter(metric="acc", op=registry_pb2.COMPARISON_OP_GE, value=0.9)
        ],
        order_by=registry_pb2.SortOrder(field="metrics.acc", descending=False),
    )
    query = search_query_from_request(request)
    assert query.metric_filters[0].op is Comparison.GE
    assert query.order.metric == "acc" and not query.order.descending
    bad_op = registry_pb2.SearchModelVersionsRequest(
        metric_filters=[registry_pb2.MetricFilter(metric="acc", value=1.0)] * 2
    )
    with pytest.raises(InvalidArgumentError) as err:
        search_query_from_request(bad_op)
    assert err.value.field == "metric_filters[0].op"
    bad_order = registry_pb2.SearchModelVersionsRequest(
        order_by=registry_pb2.SortOrder(field="size")
    )
    with pytest.raises(InvalidArgumentError) as err:
        search_query_from_request(bad_order)
    assert err.value.field == "order_by.field"
    bad_value = registry_pb2.SearchModelVersionsRequest(
        metric_filters=[
            registry_pb2.MetricFilter(metric="a", op=registry_pb2.COMPARISON_OP_LT, value=math.inf)
        ]
    )
    with pytest.raises(InvalidArgumentError) as err:
        search_query_from_request(bad_value)
    assert err.value.field == "metric_filters[0].value"


def test_an_unset_order_is_version_descending() -> None:
    query = search_query_from_request(registry_pb2.SearchModelVersionsRequest())
    assert (query.order.field, query.order.descending) == ("version", True)


def test_a_stored_version_becomes_the_same_message() -> None:
    new = new_version_from_metadata(metadata(), max_file_bytes=MB)
    record = ModelVersionRecord(
        name=new.name,
        version=4,
        description=new.description,
        metrics=new.metrics,
        tags=new.tags,
        lineage=new.lineage,
        input_signature=new.input_signature,
        reference_statistics=new.reference_statistics,
        files=new.files,
        aliases=("canary", "production"),
        created_us=1_700_000_000_123_456,
    )
    message = version_to_proto(record)
    original = metadata()
    assert message.input_signature == original.input_signature
    assert message.reference_statistics == original.reference_statistics
    assert list(message.files) == list(original.files)
    assert message.lineage == original.lineage
    assert list(message.aliases) == ["canary", "production"]
    assert message.created_at.seconds == 1_700_000_000 and message.created_at.nanos == 123_456_000
