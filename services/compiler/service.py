"""The compiler agent: `graftmesh.v1.CompilerService` over `BlueprintCompiler` and its store.

The servicer only translates: proto requests into core objects (blueprints,
slots, dtypes), core results and errors back into proto messages. The core
raises the mesh's errors and `common.grpc_server` maps them to status codes:

- a bad blueprint, target, dtype or device is INVALID_ARGUMENT whose details
  start with the proto field path (`blueprint.ir.nodes[2].attrs.out_features:
  must be positive`), translated here from the core's own paths;
- a blueprint past the limits (nodes, depth, parameters, activation or
  attention size) is RESOURCE_EXHAUSTED; an unknown catalogue name or kernel id
  NOT_FOUND; a CUDA device this machine lacks FAILED_PRECONDITION;
- a kernel that compiles but fails validation is not an error: `Compile`
  answers OK with `validation` saying which check failed and `kernel` unset
  (nothing was stored), as the proto specifies.

Compiling runs in a worker thread (the store's single flight: concurrent calls
for one kernel compile it once), and so does every file read, so health checks
and the other RPCs are answered while a kernel builds. Every artifact sent by
`GetKernel` has just been checked against its sha256; a damaged file is
removed (and reported to the error bus as a warning), answered as NOT_FOUND,
and compiled again by the next `Compile`.

Kernels live in `<run_dir>/compiler/kernels` (one compiler per run dir), and
survive restarts. Settings, from the agent's environment (its `env:` in
`startup_config.yaml`):

- `GRAFTMESH_COMPILER_STORE_MAX_MB` (default 2048): the store's size bound in
  MiB (artifacts and their metadata); least recently used kernels are evicted
  past it.
- `GRAFTMESH_COMPILER_MAX_LATENCY_RATIO` (default 10): a kernel slower than
  this many times its eager module (forward+backward) fails validation.

Parts of the contract this compiler does not honour yet: `CompileRequest.force`
is UNIMPLEMENTED; `example_batch_size` is checked (>= 0) but does not change
anything (the batch dimension is dynamic; validation runs at its own batch
sizes); `BlueprintSpec.params` must be empty (catalogue blueprints take no
parameters, so `BlueprintInfo.default_params` is empty); a slot's input and
output sizes must be equal (kernels keep the slot's shape).

`ValidationReport.kernel_latency_us`/`eager_latency_us` are 0 for a kernel stored by
a compiler that did not record them yet (its `latency_ratio` is there).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import math
import os
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import grpc
from google.protobuf import json_format, struct_pb2, timestamp_pb2

from common.agent import AgentContext
from common.bus import ErrorBus, Severity
from common.errors import (
    ConfigError,
    GraftmeshError,
    InvalidArgumentError,
    NotFoundError,
)
from common.grpc_server import Context
from common.health import HealthState
from common.logging import get_logger
from common.stubs import common_pb2, compiler_pb2, compiler_pb2_grpc
from services.compiler.blueprint import (
    Blueprint,
    Conv2dSlot,
    LinearSlot,
    count_parameters,
    parse_blueprint,
)
from services.compiler.catalogue import CatalogueEntry, get_blueprint
from services.compiler.compiler import (
    BlueprintCompiler,
    CompileResult,
    KernelMetadata,
    KernelRejectedError,
)
from services.compiler.kernel_store import FileKernelStore, KernelEntry, StoredKernel
from services.compiler.validate import ValidationReport, ValidationSettings

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "REFERENCE_TARGETS",
    "SERVICE_NAME",
    "CompilerAgent",
    "CompilerServicer",
    "CompilerSettings",
    "build",
]

_log = get_logger(__name__)

SERVICE_NAME: Final = compiler_pb2.DESCRIPTOR.services_by_name["CompilerService"].full_name

DEFAULT_CHUNK_BYTES: Final = 1 << 20
"""`GetKernel` chunk size when the request leaves it at 0; larger requests are capped at 4x."""
_MAX_CHUNK_BYTES: Final = 4 * DEFAULT_CHUNK_BYTES

REFERENCE_TARGETS: Final[Mapping[str, LinearSlot | Conv2dSlot]] = {
    "linear": LinearSlot(features=256),
    "conv2d": Conv2dSlot(channels=16, height=16, width=16),
}
"""The slot `ListBlueprints` counts a blueprint's parameters at, by slot kind, unless told."""

_DEFAULT_PAGE: Final = 100
_MAX_PAGE: Final = 1000
_IR_VERSION: Final = 1
_PT2_FORMAT: Final = "pt2"
_SLOT_KINDS: Final = {
    "linear": common_pb2.SLOT_KIND_LINEAR,
    "conv2d": common_pb2.SLOT_KIND_CONV2D,
}
# Checks whose value is compared with a fixed bound (the latency bound is a setting).
_THRESHOLDS: Final = {
    "zero_at_init": 0.0,
    "forward_matches_eager": 1.0,
    "backward_matches_eager": 1.0,
}


# --- settings ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompilerSettings:
    """What the agent reads from its environment (see the module doc)."""

    store_max_bytes: int = 2048 << 20
    max_latency_ratio: float = 10.0

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> CompilerSettings:
        """The settings in `environ`; `ConfigError` naming the variable for a bad value."""
        problems: list[str] = []
        store_mb = _positive(environ, "GRAFTMESH_COMPILER_STORE_MAX_MB", 2048, problems)
        ratio = _positive(environ, "GRAFTMESH_COMPILER_MAX_LATENCY_RATIO", 10, problems)
        if problems:
            raise ConfigError(problems)
        return cls(store_max_bytes=int(store_mb * (1 << 20)), max_latency_ratio=ratio)


def _positive(environ: Mapping[str, str], key: str, default: float, problems: list[str]) -> float:
    raw = environ.get(key, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        problems.append(f"{key}={raw!r} must be a positive number")
        return default
    return value


# --- proto -> core ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    slot: LinearSlot | Conv2dSlot
    dtype: str
    device: str


def _target_from_proto(target: compiler_pb2.SlotSpec, field: str = "target") -> _Target:
    kind = target.WhichOneof("kind")
    slot: LinearSlot | Conv2dSlot
    if kind == "linear":
        shape = target.linear
        _need_positive(shape.in_features, f"{field}.linear.in_features")
        _need_same(shape.in_features, shape.out_features, f"{field}.linear", "features")
        slot = LinearSlot(features=shape.in_features)
    elif kind == "conv2d":
        image = target.conv2d
        _need_positive(image.in_channels, f"{field}.conv2d.in_channels")
        _need_same(image.in_channels, image.out_channels, f"{field}.conv2d", "channels")
        _need_positive(image.height, f"{field}.conv2d.height")
        _need_positive(image.width, f"{field}.conv2d.width")
        slot = Conv2dSlot(channels=image.in_channels, height=image.height, width=image.width)
    else:
        raise InvalidArgumentError("missing: set linear or conv2d", field=field)
    if target.dtype == common_pb2.DTYPE_UNSPECIFIED:
        dtype = "float32"
    else:
        dtype = common_pb2.DType.Name(target.dtype).removeprefix("DTYPE_").lower()
    return _Target(slot, dtype, target.device or "cpu")


def _need_positive(value: int, field: str) -> None:
    if value <= 0:
        raise InvalidArgumentError(f"must be positive (got {value})", field=field)


def _need_same(given_in: int, given_out: int, field: str, what: str) -> None:
    if given_out != given_in:
        raise InvalidArgumentError(
            f"must equal in_{what} ({given_in}): kernels keep the slot's shape (got {given_out})",
            field=f"{field}.out_{what}",
        )


def _blueprint_from_proto(
    spec: compiler_pb2.BlueprintSpec, slot: LinearSlot | Conv2dSlot
) -> tuple[Blueprint, str]:
    """The core blueprint for `spec` sized for `slot`, and the field path errors hang under."""
    source = spec.WhichOneof("source")
    if source is None:
        raise InvalidArgumentError("missing: set name, ir or ir_json", field="blueprint")
    if source == "name":
        if spec.params.fields:
            raise InvalidArgumentError(
                "catalogue blueprints take no parameters yet; leave params empty",
                field="blueprint.params",
            )
        try:
            return get_blueprint(spec.name, slot), "blueprint.name"
        except InvalidArgumentError as exc:
            raise _retarget(exc, "blueprint.name") from None
    where = f"blueprint.{source}"
    if spec.params.fields:
        raise InvalidArgumentError("only with blueprint.name", field="blueprint.params")
    if source == "ir":
        ir = spec.ir
    else:
        ir = compiler_pb2.BlueprintIR()
        try:
            json_format.Parse(spec.ir_json, ir)
        except json_format.ParseError as exc:
            raise InvalidArgumentError(f"not the JSON form of BlueprintIR: {exc}", where) from None
    if ir.ir_version not in (0, _IR_VERSION):
        raise InvalidArgumentError(
            f"IR version {ir.ir_version} is not supported; this compiler reads version "
            f"{_IR_VERSION}",
            field=f"{where}.ir_version",
        )
    width = slot.features if isinstance(slot, LinearSlot) else slot.channels
    data = {
        "name": ir.name,
        "slot": slot.model_dump(),
        "nodes": [
            {
                "id": node.name,
                "op": node.op,
                "inputs": list(node.inputs),
                "params": _attrs(node.attrs, width),
            }
            for node in ir.nodes
        ],
        "output": ir.output,
    }
    try:
        return parse_blueprint(data), where
    except InvalidArgumentError as exc:
        raise _retarget(exc, where) from None


def _attrs(attrs: struct_pb2.Struct, width: int) -> dict[str, Any]:
    plain = json_format.MessageToDict(attrs)
    return {key: _attr_value(value, width) for key, value in plain.items()}


def _attr_value(value: Any, width: int) -> Any:
    # Struct numbers are doubles; sizes must reach the IR as integers.
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if value in ("in", "out"):  # the slot's features or channels (the same, in and out)
        return width
    if isinstance(value, list):
        return [_attr_value(item, width) for item in value]
    return value


_NODE_FIELD: Final = re.compile(r"nodes\[(\d+)\](?:\.(id|params))?(.*)")


def _proto_field(field: str, source: str) -> str:
    """The proto path of a core field path, for a blueprint given through `source`."""
    if field in ("slot", "slot.kind") or field.startswith("slot."):
        return "target"
    if field in ("dtype", "device"):
        return f"target.{field}"
    if source == "blueprint.name" and (field.startswith("nodes") or field in ("name", "output")):
        return source  # the catalogue built it: the name is what the caller chose
    match = _NODE_FIELD.fullmatch(field)
    if match:
        index, part, rest = match.groups()
        renamed = {"id": ".name", "params": ".attrs", None: ""}[part]
        return f"{source}.nodes[{index}]{renamed}{rest}"
    if field in ("name", "output", "version", "description"):
        return f"{source}.{field}"
    return field


def _retarget(exc: InvalidArgumentError, source: str) -> InvalidArgumentError:
    """`exc` with its field path translated to the proto's."""
    message = str(exc)
    prefix = f"{exc.field}: "
    if exc.field and message.startswith(prefix):
        message = message[len(prefix) :]
    return InvalidArgumentError(message, field=_proto_field(exc.field, source))


# --- core -> proto ----------------------------------------------------------------------------


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def _slot_to_proto(slot: LinearSlot | Conv2dSlot, dtype: str, device: str) -> compiler_pb2.SlotSpec:
    proto_dtype = common_pb2.DType.Value(f"DTYPE_{dtype.upper()}")
    if isinstance(slot, LinearSlot):
        shape = compiler_pb2.LinearSlotShape(in_features=slot.features, out_features=slot.features)
        return compiler_pb2.SlotSpec(linear=shape, dtype=proto_dtype, device=device)
    image = compiler_pb2.Conv2dSlotShape(
        in_channels=slot.channels, out_channels=slot.channels, height=slot.height, width=slot.width
    )
    return compiler_pb2.SlotSpec(conv2d=image, dtype=proto_dtype, device=device)


def _metadata_to_proto(meta: KernelMetadata, created: float | None) -> compiler_pb2.KernelMetadata:
    proto = compiler_pb2.KernelMetadata(
        kernel_id=meta.kernel_id,
        blueprint_name=meta.blueprint_name,
        blueprint_json=meta.canonical_blueprint,
        target=_slot_to_proto(meta.slot, meta.dtype, meta.device),
        torch_version=meta.torch_version,
        param_count=meta.param_count,
        format=_PT2_FORMAT,
        compile_time_ms=meta.compile_seconds * 1e3,
    )
    if created is not None:
        proto.created_at.CopyFrom(_timestamp(created))
    return proto


def _report_to_proto(
    report: ValidationReport, max_latency_ratio: float
) -> compiler_pb2.ValidationReport:
    proto = compiler_pb2.ValidationReport(passed=report.passed)
    thresholds = {**_THRESHOLDS, "latency_ratio": max_latency_ratio}
    for check in report.checks:
        item = proto.checks.add(
            name=check.name,
            outcome=compiler_pb2.CHECK_OUTCOME_PASSED
            if check.passed
            else compiler_pb2.CHECK_OUTCOME_FAILED,
            detail=check.detail,
        )
        if check.value is not None:
            item.value = check.value
        if check.name in thresholds:
            item.threshold = thresholds[check.name]
        if check.name == "latency_ratio" and check.value is not None:
            proto.latency_ratio = check.value
    if report.kernel_latency_us is not None and report.eager_latency_us is not None:
        proto.kernel_latency_us = report.kernel_latency_us
        proto.eager_latency_us = report.eager_latency_us
    return proto


# --- page tokens ------------------------------------------------------------------------------


def _page_token(entry: KernelEntry, blueprint_name: str) -> str:
    cursor = {"a": entry.last_access, "k": entry.kernel_id, "f": blueprint_name}
    return base64.urlsafe_b64encode(json.dumps(cursor).encode()).decode()


def _page_cursor(token: str, blueprint_name: str) -> tuple[float, str] | None:
    """Where the page after `token` starts; INVALID_ARGUMENT for a token not issued here."""
    if not token:
        return None
    try:
        cursor = json.loads(base64.urlsafe_b64decode(token.encode()))
        last_access, kernel_id, name = float(cursor["a"]), str(cursor["k"]), str(cursor["f"])
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise InvalidArgumentError("not a token this server issued", "page.page_token") from None
    if name != blueprint_name:
        raise InvalidArgumentError("issued for another blueprint_name filter", "page.page_token")
    return last_access, kernel_id


def _page_size(page: common_pb2.PageRequest) -> int:
    if page.page_size < 0:
        raise InvalidArgumentError(f"must be >= 0 (got {page.page_size})", "page.page_size")
    return min(page.page_size or _DEFAULT_PAGE, _MAX_PAGE)


def _recency(entry: KernelEntry) -> tuple[float, str]:
    # Most recently used first; the id breaks ties so that pages never overlap.
    return -entry.last_access, entry.kernel_id


# --- the servicer -----------------------------------------------------------------------------


class CompilerServicer(compiler_pb2_grpc.CompilerServiceServicer):
    """`CompilerService` over a compiler and the store it compiles into (see the module doc)."""

    def __init__(
        self,
        compiler: BlueprintCompiler,
        store: FileKernelStore,
        settings: CompilerSettings,
        health: HealthState,
        bus: ErrorBus,
    ) -> None:
        self._compiler = compiler
        self._store = store
        self._settings = settings
        self._health = health
        self._bus = bus
        self._metadata: dict[str, KernelMetadata] = {}
        self._created: dict[str, float] = {}
        self._hits = 0
        self._misses = 0
        self._failures = 0
        self._compile_ms = 0.0
        self._counted_builds: dict[str, float] = {}
        self._corrupt_reported = 0
        self._health_dirty = asyncio.Event()
        self._health_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Publish the store's figures in the health details and keep them current."""
        await self._refresh_health()
        self._health_task = asyncio.create_task(self._health_loop(), name="compiler-health")

    async def stop(self) -> None:
        """Stop updating the health details."""
        if self._health_task is not None:
            self._health_task.cancel()
            await asyncio.gather(self._health_task, return_exceptions=True)

    # --- RPCs ---------------------------------------------------------------------------------

    async def Compile(
        self, request: compiler_pb2.CompileRequest, context: Context
    ) -> compiler_pb2.CompileResponse:
        if request.force:
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED,
                "force: rebuilding a cached kernel is not supported yet; leave force unset",
            )
        if request.example_batch_size < 0:
            raise InvalidArgumentError(
                f"must be >= 0 (got {request.example_batch_size})", "example_batch_size"
            )
        target = _target_from_proto(request.target)
        blueprint, source = _blueprint_from_proto(request.blueprint, target.slot)
        try:
            result = await self._compiler.compile(
                blueprint, target.slot, target.dtype, target.device
            )
        except KernelRejectedError as rejected:
            self._misses += 1
            return compiler_pb2.CompileResponse(
                validation=_report_to_proto(rejected.report, self._settings.max_latency_ratio)
            )
        except InvalidArgumentError as exc:
            raise _retarget(exc, source) from None
        except GraftmeshError:
            raise
        except Exception:
            self._failures += 1  # a build that broke (export, torch): INTERNAL, on the bus
            raise
        finally:
            self._health_dirty.set()
        self._count(result)
        created = await self._created_at(result.kernel_id, refresh=not result.cache_hit)
        self._metadata[result.kernel_id] = result.metadata
        return compiler_pb2.CompileResponse(
            kernel=common_pb2.KernelRef(
                kernel_id=result.kernel_id,
                size_bytes=result.size,
                sha256=result.artifact_sha256,
            ),
            metadata=_metadata_to_proto(result.metadata, created),
            validation=_report_to_proto(result.report, self._settings.max_latency_ratio),
            cache_hit=result.cache_hit,
        )

    async def GetKernel(
        self, request: compiler_pb2.GetKernelRequest, context: Context
    ) -> AsyncIterator[compiler_pb2.GetKernelResponse]:
        if request.chunk_size < 0:
            raise InvalidArgumentError(f"must be >= 0 (got {request.chunk_size})", "chunk_size")
        chunk = min(request.chunk_size or DEFAULT_CHUNK_BYTES, _MAX_CHUNK_BYTES)
        if request.offset < 0:
            raise InvalidArgumentError(f"must be >= 0 (got {request.offset})", "offset")
        # The store checks the bytes against their sha256 (a damaged file is removed: None).
        stored = await asyncio.to_thread(self._store.get, request.kernel_id)
        self._health_dirty.set()
        if stored is None:
            raise NotFoundError(f"no kernel {request.kernel_id}")
        if request.offset > stored.size:
            raise InvalidArgumentError(
                f"{request.offset} is past the end of the {stored.size}-byte kernel", "offset"
            )
        info = await self._info_of(stored)
        yield compiler_pb2.GetKernelResponse(info=info)
        data = memoryview(stored.artifact)
        for start in range(request.offset, stored.size, chunk):
            piece = common_pb2.ArtifactChunk(data=bytes(data[start : start + chunk]), offset=start)
            yield compiler_pb2.GetKernelResponse(chunk=piece)

    async def ListKernels(
        self, request: compiler_pb2.ListKernelsRequest, context: Context
    ) -> compiler_pb2.ListKernelsResponse:
        size = _page_size(request.page)
        name = request.blueprint_name
        cursor = _page_cursor(request.page.page_token, name)
        entries = sorted(await asyncio.to_thread(self._store.entries), key=_recency)
        response = compiler_pb2.ListKernelsResponse()
        if not name:
            response.page.total_size = len(entries)
        if cursor is not None:
            after = (-cursor[0], cursor[1])
            entries = [e for e in entries if _recency(e) > after]
        listed: list[KernelEntry] = []
        for entry in entries:
            meta = await self._metadata_of(entry.kernel_id)
            if meta is None or (name and meta.blueprint_name != name):
                continue
            if len(listed) == size:  # one more exists: there is a next page
                response.page.next_page_token = _page_token(listed[-1], name)
                break
            response.kernels.append(self._info(entry, meta))
            listed.append(entry)
        return response

    async def ListBlueprints(
        self, request: compiler_pb2.ListBlueprintsRequest, context: Context
    ) -> compiler_pb2.ListBlueprintsResponse:
        wanted = request.slot_kind
        target: _Target | None = None
        if request.HasField("target") and request.target.WhichOneof("kind") is not None:
            target = _target_from_proto(request.target)
        response = compiler_pb2.ListBlueprintsResponse()
        for entry in self._compiler.list_blueprints():
            kinds = [_SLOT_KINDS[kind] for kind in entry.slot_kinds]
            if wanted != common_pb2.SLOT_KIND_UNSPECIFIED and wanted not in kinds:
                continue
            slot, count = self._param_count(entry, wanted, target)
            response.blueprints.append(
                compiler_pb2.BlueprintInfo(
                    name=entry.name,
                    description=entry.description,
                    slot_kinds=kinds,
                    param_count=count,
                    param_count_target=_slot_to_proto(
                        slot,
                        target.dtype if target else "float32",
                        target.device if target else "cpu",
                    ),
                    default_params=struct_pb2.Struct(),
                )
            )
        return response

    async def GetStats(
        self, request: compiler_pb2.CompilerServiceGetStatsRequest, context: Context
    ) -> compiler_pb2.CompilerServiceGetStatsResponse:
        stats = await asyncio.to_thread(self._compiler.stats)
        return compiler_pb2.CompilerServiceGetStatsResponse(
            cache_hits=self._hits,
            cache_misses=self._misses,
            compiles=stats.store.compiles,
            compile_failures=stats.rejected + self._failures,
            evictions=stats.store.evictions,
            cache_bytes=stats.store.bytes,
            cache_entries=stats.store.kernels,
            cache_capacity_bytes=self._settings.store_max_bytes,
            compile_time_ms_total=self._compile_ms,
        )

    # --- helpers ------------------------------------------------------------------------------

    def _count(self, result: CompileResult) -> None:
        if result.cache_hit:
            self._hits += 1
            return
        self._misses += 1
        # Callers that shared one build all see it as a miss; its time counts once.
        seconds = result.metadata.compile_seconds
        if self._counted_builds.get(result.kernel_id) != seconds:
            self._counted_builds[result.kernel_id] = seconds
            self._compile_ms += seconds * 1e3

    async def _created_at(self, kernel_id: str, *, refresh: bool) -> float | None:
        if refresh or kernel_id not in self._created:
            entries = await asyncio.to_thread(self._store.entries)
            self._created.update({e.kernel_id: e.created for e in entries})
        return self._created.get(kernel_id)

    async def _metadata_of(self, kernel_id: str) -> KernelMetadata | None:
        """A kernel's metadata: remembered, or read (and checked) from the store once."""
        known = self._metadata.get(kernel_id)
        if known is not None:
            return known
        stored = await asyncio.to_thread(self._store.get, kernel_id)
        if stored is None:
            return None
        return self._remember(stored)

    def _remember(self, stored: StoredKernel) -> KernelMetadata:
        meta = KernelMetadata.model_validate(stored.metadata)
        self._metadata[stored.kernel_id] = meta
        self._created[stored.kernel_id] = stored.created
        return meta

    async def _info_of(self, stored: StoredKernel) -> compiler_pb2.KernelInfo:
        meta = self._remember(stored)
        entries = await asyncio.to_thread(self._store.entries)
        entry = next((e for e in entries if e.kernel_id == stored.kernel_id), None)
        if entry is None:  # evicted in between: what we read is still what was stored
            entry = KernelEntry(
                stored.kernel_id, stored.sha256, stored.size, stored.created, stored.created, 0
            )
        return self._info(entry, meta)

    def _info(self, entry: KernelEntry, meta: KernelMetadata) -> compiler_pb2.KernelInfo:
        return compiler_pb2.KernelInfo(
            kernel=common_pb2.KernelRef(
                kernel_id=entry.kernel_id, size_bytes=entry.size, sha256=entry.sha256
            ),
            metadata=_metadata_to_proto(meta, entry.created),
            validation=_report_to_proto(meta.report, self._settings.max_latency_ratio),
            last_used_at=_timestamp(entry.last_access),
            hits=entry.hits,
        )

    def _param_count(
        self, entry: CatalogueEntry, wanted: int, target: _Target | None
    ) -> tuple[LinearSlot | Conv2dSlot, int]:
        if target is not None and target.slot.kind in entry.slot_kinds:
            try:
                return target.slot, count_parameters(entry.blueprint(target.slot))
            except InvalidArgumentError:
                pass  # the blueprint does not fit this target: count it at its reference
        kinds = [k for k in entry.slot_kinds if _SLOT_KINDS[k] == wanted] or list(entry.slot_kinds)
        slot = REFERENCE_TARGETS[kinds[0]]
        return slot, count_parameters(entry.blueprint(slot))

    async def _health_loop(self) -> None:
        while True:
            await self._health_dirty.wait()
            self._health_dirty.clear()
            await self._refresh_health()

    async def _refresh_health(self) -> None:
        stats = (await asyncio.to_thread(self._compiler.stats)).store
        self._health.update_details(
            kernels=stats.kernels,
            store_bytes=stats.bytes,
            store_max_bytes=self._settings.store_max_bytes,
            cache_hits=self._hits,
            cache_misses=self._misses,
            compiles=stats.compiles,
            evictions=stats.evictions,
            corrupt_detected=stats.corrupt_detected,
        )
        if stats.corrupt_detected > self._corrupt_reported:
            found = stats.corrupt_detected - self._corrupt_reported
            self._corrupt_reported = stats.corrupt_detected
            self._bus.report_error(
                f"{found} damaged kernel file(s) found in {self._store.root} and removed; "
                "they are compiled again when asked for",
                severity=Severity.WARNING,
                error_type="KernelCorrupted",
                details={"store": str(self._store.root), "corrupt_detected": found},
            )


# --- the agent --------------------------------------------------------------------------------


class CompilerAgent:
    """The compiler's `AgentService`: opens the store under the run dir and serves it."""

    service_names: Sequence[str] = (SERVICE_NAME,)

    def __init__(self, ctx: AgentContext, settings: CompilerSettings) -> None:
        root = ctx.env.run_dir / "compiler" / "kernels"
        self._store = FileKernelStore(root, max_bytes=settings.store_max_bytes)
        validation = ValidationSettings(max_latency_ratio=settings.max_latency_ratio)
        compiler = BlueprintCompiler(self._store, validation=validation)
        self.servicer = CompilerServicer(compiler, self._store, settings, ctx.health, ctx.bus)
        _log.info("kernel store opened", root=str(root), max_bytes=settings.store_max_bytes)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        compiler_pb2_grpc.add_CompilerServiceServicer_to_server(self.servicer, server)

    async def start(self) -> None:
        await self.servicer.start()

    async def stop(self) -> None:
        await self.servicer.stop()
        self._store.close()


def build(ctx: AgentContext) -> CompilerAgent:
    """The compiler agent for `ctx`, configured from the environment (see the module doc)."""
    return CompilerAgent(ctx, CompilerSettings.from_environ(os.environ))
