"""Between the wire (graftmesh.v1 messages) and the registry's records (pure, no I/O).

Requests are checked on the way in, and every refusal is an `InvalidArgumentError`
naming the request field (`metadata.files[0].sha256`, `metric_filters[1].op`,
`model.version`...); a file larger than the registry accepts is
`ResourceExhaustedError`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from google.protobuf.timestamp_pb2 import Timestamp

from common.errors import InvalidArgumentError, ResourceExhaustedError
from common.stubs import common_pb2, registry_pb2
from services.registry.records import (
    AliasAction,
    AliasEntry,
    FileRecord,
    Lineage,
    ModelSummaryRecord,
    ModelVersionRecord,
    NewVersion,
)
from services.registry.search import Comparison, MetricFilter, SearchQuery, SortOrder
from services.registry.validation import (
    check_alias,
    check_digest,
    check_file_name,
    check_metrics,
    check_model_name,
    check_tags,
    check_text,
)

__all__ = [
    "REQUIRED_FILES",
    "VersionRef",
    "check_actor",
    "check_reason",
    "check_version",
    "entry_to_proto",
    "model_ref_from_proto",
    "new_version_from_metadata",
    "search_query_from_request",
    "summary_to_proto",
    "timestamp",
    "version_to_proto",
]

# Files every version carries (ARCHITECTURE.md, "Artifacts").
REQUIRED_FILES = ("model.pt2", "manifest.json")
MAX_DESCRIPTION_LENGTH = 65536
MAX_ACTOR_LENGTH = 256
MAX_REASON_LENGTH = 4096
MAX_JOB_ID_LENGTH = 256
MAX_FILES = 64

_COMPARISONS = {
    registry_pb2.COMPARISON_OP_GT: Comparison.GT,
    registry_pb2.COMPARISON_OP_GE: Comparison.GE,
    registry_pb2.COMPARISON_OP_LT: Comparison.LT,
    registry_pb2.COMPARISON_OP_LE: Comparison.LE,
    registry_pb2.COMPARISON_OP_EQ: Comparison.EQ,
}
_ACTIONS = {
    AliasAction.SET: registry_pb2.ALIAS_ACTION_SET,
    AliasAction.DELETE: registry_pb2.ALIAS_ACTION_DELETE,
    AliasAction.ROLLBACK: registry_pb2.ALIAS_ACTION_ROLLBACK,
}


@dataclass(frozen=True, slots=True)
class VersionRef:
    """A model version by number, or by alias (exactly one of the two is set)."""

    name: str
    alias: str | None = None
    version: int | None = None


def timestamp(at_us: int) -> Timestamp:
    """A protobuf Timestamp of microseconds since the epoch."""
    seconds, micros = divmod(at_us, 1_000_000)
    return Timestamp(seconds=seconds, nanos=micros * 1000)


# --- requests ---------------------------------------------------------------------------------


def check_version(version: int, field: str) -> int:
    """`version` if it is a version number (>= 1)."""
    if version < 1:
        raise InvalidArgumentError(f"versions start at 1, got {version}", field=field)
    return version


def check_actor(actor: str, field: str = "actor") -> str:
    return check_text(actor, field, max_length=MAX_ACTOR_LENGTH)


def check_reason(reason: str, field: str = "reason") -> str:
    return check_text(reason, field, max_length=MAX_REASON_LENGTH)


def model_ref_from_proto(ref: common_pb2.ModelRef, field: str = "model") -> VersionRef:
    """The version a ModelRef names; neither alias nor version means `production`."""
    name = check_model_name(ref.name, f"{field}.name")
    selector = ref.WhichOneof("selector")
    if selector == "version":
        return VersionRef(name, version=check_version(ref.version, f"{field}.version"))
    if selector == "alias":
        return VersionRef(name, alias=check_alias(ref.alias, f"{field}.alias"))
    return VersionRef(name, alias="production")


def _check_files(
    files: Sequence[registry_pb2.ArtifactFile], field: str, max_file_bytes: int
) -> tuple[FileRecord, ...]:
    if not files:
        raise InvalidArgumentError(
            f"list the version's files ({', '.join(REQUIRED_FILES)} at least)", field=field
        )
    if len(files) > MAX_FILES:
        raise InvalidArgumentError(f"at most {MAX_FILES} files per version", field=field)
    records: list[FileRecord] = []
    seen: set[str] = set()
    for i, f in enumerate(files):
        where = f"{field}[{i}]"
        name = check_file_name(f.name, f"{where}.name")
        if name in seen:
            raise InvalidArgumentError(f"{name!r} is listed twice", field=f"{where}.name")
        seen.add(name)
        check_digest(f.sha256, f"{where}.sha256")
        if f.size_bytes < 0:
            raise InvalidArgumentError("must not be negative", field=f"{where}.size_bytes")
        if f.size_bytes > max_file_bytes:
            raise ResourceExhaustedError(
                f"{where}: {name!r} has {f.size_bytes} bytes, more than the registry's limit "
                f"of {max_file_bytes} per file"
            )
        records.append(FileRecord(name, f.sha256, f.size_bytes))
    missing = [r for r in REQUIRED_FILES if r not in seen]
    if missing:
        raise InvalidArgumentError(
            f"every version needs {', '.join(REQUIRED_FILES)}; missing {', '.join(missing)}",
            field=field,
        )
    return tuple(records)


def _check_specs(specs: Sequence[common_pb2.TensorSpec], field: str) -> set[str]:
    names: set[str] = set()
    for i, spec in enumerate(specs):
        where = f"{field}[{i}]"
        check_text(spec.name, f"{where}.name", max_length=128, required=True)
        if spec.name in names:
            raise InvalidArgumentError(f"{spec.name!r} appears twice", field=f"{where}.name")
        names.add(spec.name)
        if spec.dtype == common_pb2.DTYPE_UNSPECIFIED:
            raise InvalidArgumentError("set the dtype", field=f"{where}.dtype")
        for j, dim in enumerate(spec.shape):
            if dim < -1:
                raise InvalidArgumentError(
                    f"a dimension is >= 0, or -1 for a dynamic one; got {dim}",
                    field=f"{where}.shape[{j}]",
                )
    return names


def _check_signature(signature: registry_pb2.InputSignature, field: str) -> set[str]:
    """The input names, if the signature is well formed."""
    inputs = _check_specs(signature.inputs, f"{field}.inputs")
    _check_specs(signature.outputs, f"{field}.outputs")
    return inputs


def _check_finite(values: Sequence[float], field: str) -> None:
    for i, value in enumerate(values):
        if not math.isfinite(value):
            raise InvalidArgumentError(f"must be finite, got {value!r}", field=f"{field}[{i}]")


def _check_statistics(
    stats: registry_pb2.ReferenceStatistics, field: str, input_names: set[str]
) -> None:
    if stats.sample_count < 0:
        raise InvalidArgumentError("must not be negative", field=f"{field}.sample_count")
    seen: set[str] = set()
    for i, entry in enumerate(stats.inputs):
        where = f"{field}.inputs[{i}]"
        if input_names and entry.name not in input_names:
            raise InvalidArgumentError(
                f"{entry.name[:80]!r} is not an input of the input signature "
                f"({', '.join(sorted(input_names))})",
                field=f"{where}.name",
            )
        if entry.name in seen:
            raise InvalidArgumentError(f"{entry.name!r} appears twice", field=f"{where}.name")
        seen.add(entry.name)
        if entry.feature_dim < 0:
            raise InvalidArgumentError("must not be negative", field=f"{where}.feature_dim")
        lengths = {
            "mean": len(entry.mean),
            "std": len(entry.std),
            "min": len(entry.min),
            "max": len(entry.max),
        }
        if len(set(lengths.values())) > 1:
            raise InvalidArgumentError(
                "mean, std, min and max need one value per feature each; got "
                + ", ".join(f"{k}={v}" for k, v in lengths.items()),
                field=where,
            )
        for key in ("mean", "std", "min", "max"):
            _check_finite(getattr(entry, key), f"{where}.{key}")
        if any(s < 0 for s in entry.std):
            raise InvalidArgumentError("standard deviations are >= 0", field=f"{where}.std")
        edges, counts = entry.histogram_edges, entry.histogram_counts
        if edges or counts:
            if len(edges) != len(counts) + 1:
                raise InvalidArgumentError(
                    f"needs len(histogram_counts) + 1 = {len(counts) + 1} edges, got {len(edges)}",
                    field=f"{where}.histogram_edges",
                )
            _check_finite(edges, f"{where}.histogram_edges")
            if any(b <= a for a, b in itertools.pairwise(edges)):
                raise InvalidArgumentError(
                    "edges must be strictly increasing", field=f"{where}.histogram_edges"
                )
            if any(c < 0 for c in counts):
                raise InvalidArgumentError("counts are >= 0", field=f"{where}.histogram_counts")


def new_version_from_metadata(
    meta: registry_pb2.ModelVersionMetadata, *, max_file_bytes: int, field: str = "metadata"
) -> NewVersion:
    """The version a RegisterModel metadata message describes, checked field by field."""
    name = check_model_name(meta.name, f"{field}.name")
    if len(meta.description) > MAX_DESCRIPTION_LENGTH:
        raise InvalidArgumentError(
            f"longer than {MAX_DESCRIPTION_LENGTH} characters", field=f"{field}.description"
        )
    lineage = meta.lineage
    check_text(lineage.job_id, f"{field}.lineage.job_id", max_length=MAX_JOB_ID_LENGTH)
    for i, kernel_id in enumerate(lineage.kernel_ids):
        check_digest(kernel_id, f"{field}.lineage.kernel_ids[{i}]")
    if lineage.parent_version < 0:
        raise InvalidArgumentError(
            "must be a version (>= 1), or 0 for none", field=f"{field}.lineage.parent_version"
        )
    input_names = _check_signature(meta.input_signature, f"{field}.input_signature")
    _check_statistics(meta.reference_statistics, f"{field}.reference_statistics", input_names)
    aliases: list[str] = []
    for i, alias in enumerate(meta.aliases):
        check_alias(alias, f"{field}.aliases[{i}]")
        if alias in aliases:
            raise InvalidArgumentError(f"{alias!r} is listed twice", field=f"{field}.aliases[{i}]")
        aliases.append(alias)
    return NewVersion(
        name=name,
        files=_check_files(meta.files, f"{field}.files", max_file_bytes),
        description=meta.description,
        metrics=check_metrics(dict(meta.metrics), f"{field}.metrics"),
        tags=check_tags(dict(meta.tags), f"{field}.tags"),
        lineage=Lineage(lineage.job_id, tuple(lineage.kernel_ids), lineage.parent_version),
        input_signature=meta.input_signature.SerializeToString(deterministic=True),
        reference_statistics=meta.reference_statistics.SerializeToString(deterministic=True),
        aliases=tuple(aliases),
        actor=check_actor(meta.actor, f"{field}.actor"),
    )


def search_query_from_request(request: registry_pb2.SearchModelVersionsRequest) -> SearchQuery:
    """The search a SearchModelVersions request asks for, checked."""
    filters: list[MetricFilter] = []
    for i, f in enumerate(request.metric_filters):
        op = _COMPARISONS.get(f.op)
        if op is None:
            raise InvalidArgumentError(
                "set the comparison (GT, GE, LT, LE or EQ)", field=f"metric_filters[{i}].op"
            )
        filters.append(MetricFilter(f.metric, op, f.value))
    order = SortOrder()
    if request.HasField("order_by"):
        order = SortOrder(request.order_by.field or "version", request.order_by.descending)
    return SearchQuery(
        name=request.name,
        tags=dict(request.tags),
        metric_filters=tuple(filters),
        order=order,
    ).check()


# --- responses --------------------------------------------------------------------------------


def version_to_proto(record: ModelVersionRecord) -> registry_pb2.ModelVersion:
    """The wire form of a stored version."""
    message = registry_pb2.ModelVersion(
        name=record.name,
        version=record.version,
        description=record.description,
        metrics=dict(record.metrics),
        tags=dict(record.tags),
        lineage=registry_pb2.Lineage(
            job_id=record.lineage.job_id,
            kernel_ids=list(record.lineage.kernel_ids),
            parent_version=record.lineage.parent_version,
        ),
        files=[
            registry_pb2.ArtifactFile(name=f.name, sha256=f.sha256, size_bytes=f.size_bytes)
            for f in record.files
        ],
        aliases=list(record.aliases),
        created_at=timestamp(record.created_us),
    )
    message.input_signature.ParseFromString(record.input_signature)
    message.reference_statistics.ParseFromString(record.reference_statistics)
    return message


def summary_to_proto(record: ModelSummaryRecord) -> registry_pb2.ModelSummary:
    return registry_pb2.ModelSummary(
        name=record.name,
        latest_version=record.latest_version,
        version_count=record.version_count,
        aliases=dict(record.aliases),
        created_at=timestamp(record.created_us),
        updated_at=timestamp(record.updated_us),
    )


def entry_to_proto(entry: AliasEntry) -> registry_pb2.AliasHistoryEntry:
    return registry_pb2.AliasHistoryEntry(
        model_name=entry.model_name,
        alias=entry.alias,
        from_version=entry.from_version,
        to_version=entry.to_version,
        action=_ACTIONS[entry.action],
        actor=entry.actor,
        reason=entry.reason,
        timestamp=timestamp(entry.at_us),
    )
