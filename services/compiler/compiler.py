"""`BlueprintCompiler`: blueprint + slot -> validated, stored kernel.

Checks the blueprint (`analyse_blueprint`), derives the kernel id from its
inputs, and returns the stored kernel or compiles it once (build, export,
validate) and stores it. A kernel that fails validation is never stored: the
caller gets `KernelRejectedError` with the report.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from functools import partial
from typing import Final

import torch
from pydantic import BaseModel, ConfigDict

from common.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from common.kernels import sha256_hex
from services.compiler.blueprint import (
    Blueprint,
    BlueprintAnalysis,
    BlueprintLimits,
    Conv2dSlot,
    LinearSlot,
    SlotSpec,
    analyse_blueprint,
    canonical_json,
    slot_shape,
)
from services.compiler.build import build_module
from services.compiler.catalogue import CatalogueEntry, list_catalogue
from services.compiler.export import FORMAT_VERSION, export_kernel, kernel_id
from services.compiler.kernel_store import (
    CompiledArtifact,
    KernelEntry,
    KernelStore,
    StoredKernel,
    StoreStats,
)
from services.compiler.validate import ValidationReport, ValidationSettings, validate_kernel

__all__ = [
    "SUPPORTED_DTYPES",
    "BlueprintCompiler",
    "CompileResult",
    "CompilerStats",
    "KernelMetadata",
    "KernelRejectedError",
]

SUPPORTED_DTYPES: Final = {"float32": torch.float32, "float64": torch.float64}
"""Kernel dtypes by name. (Mixed precision runs a float32 kernel under autocast.)"""


class KernelMetadata(BaseModel):
    """What is known about a stored kernel; stored beside it as JSON."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kernel_id: str
    artifact_sha256: str
    size: int
    blueprint_name: str
    blueprint_version: int
    description: str
    canonical_blueprint: str
    slot: SlotSpec
    dtype: str
    device: str
    seed: int
    training: bool
    min_batch: int
    param_count: int
    node_count: int
    depth: int
    torch_version: str
    format_version: int
    compile_seconds: float
    report: ValidationReport


@dataclass(frozen=True)
class CompileResult:
    """A compiled kernel: its id, the sha256 and size of its bytes, and how it was made."""

    kernel_id: str
    artifact_sha256: str
    size: int
    metadata: KernelMetadata
    report: ValidationReport
    cache_hit: bool


@dataclass(frozen=True)
class CompilerStats:
    """The store's counters and the kernels this compiler refused."""

    store: StoreStats
    rejected: int


class KernelRejectedError(InvalidArgumentError):
    """The blueprint compiled, but the kernel failed validation; `report` says which check."""

    def __init__(self, report: ValidationReport) -> None:
        self.report = report
        super().__init__(f"kernel failed validation: {report.summary()}", field="blueprint")


class BlueprintCompiler:
    """Compiles blueprints into kernels kept in `store` (see the module doc)."""

    def __init__(
        self,
        store: KernelStore,
        *,
        limits: BlueprintLimits | None = None,
        validation: ValidationSettings | None = None,
    ) -> None:
        self._store = store
        self._limits = limits or BlueprintLimits()
        self._validation = validation or ValidationSettings()
        # One compile at a time: export holds a global lock anyway, and latency
        # figures taken while another compile runs would mean little.
        self._compile_lock = threading.Lock()
        self._rejected = 0

    async def compile(
        self,
        blueprint: Blueprint,
        slot: LinearSlot | Conv2dSlot,
        dtype: str = "float32",
        device: str = "cpu",
        *,
        seed: int = 0,
        training: bool = True,
    ) -> CompileResult:
        """The kernel of `blueprint` for `slot`: from the store, or compiled, validated and stored.

        `training` selects the graph's mode (batch norm on batch statistics or
        on running ones); `seed` the initial weights. Raises
        `InvalidArgumentError` (with the field path) for a bad blueprint, slot,
        dtype or device, `ResourceExhaustedError` past the limits,
        `FailedPreconditionError` for a CUDA device this machine lacks, and
        `KernelRejectedError` when the kernel fails validation.
        """
        torch_dtype = _resolve_dtype(dtype)
        torch_device = _resolve_device(device)
        analysis = analyse_blueprint(blueprint, slot, self._limits)
        canonical = canonical_json(blueprint, slot)
        device_name = str(torch_device)
        kid = kernel_id(
            canonical,
            slot.model_dump(mode="json"),
            dtype=dtype,
            device=device_name,
            seed=seed,
            training=training,
        )
        job = partial(
            self._compile_now,
            _Job(
                blueprint,
                analysis,
                canonical,
                kid,
                dtype,
                torch_dtype,
                torch_device,
                seed,
                training,
            ),
        )
        stored, hit = await self._store.get_or_compile(kid, job)
        metadata = KernelMetadata.model_validate(stored.metadata)
        return CompileResult(
            kernel_id=kid,
            artifact_sha256=stored.sha256,
            size=stored.size,
            metadata=metadata,
            report=metadata.report,
            cache_hit=hit,
        )

    def get_kernel_bytes(self, kernel_id: str) -> bytes:
        """The verified bytes of a stored kernel; `NotFoundError` if absent (or found corrupt)."""
        return self._get(kernel_id).artifact

    def get_kernel_metadata(self, kernel_id: str) -> KernelMetadata:
        """The metadata of a stored kernel; `NotFoundError` if absent (or found corrupt)."""
        return KernelMetadata.model_validate(self._get(kernel_id).metadata)

    def list_kernels(self) -> list[KernelEntry]:
        """Every stored kernel, most recently used first."""
        return self._store.entries()

    def list_blueprints(self) -> list[CatalogueEntry]:
        """The catalogue: name, description and slot kinds of each named blueprint."""
        return list_catalogue()

    def stats(self) -> CompilerStats:
        """Store counters (hits, misses, compiles, evictions, bytes, corrupt_detected...)."""
        return CompilerStats(store=self._store.stats(), rejected=self._rejected)

    def _get(self, kernel_id: str) -> StoredKernel:
        found = self._store.get(kernel_id)
        if found is None:
            raise NotFoundError(f"no kernel {kernel_id}")
        return found

    def _compile_now(self, job: _Job) -> CompiledArtifact:
        with self._compile_lock:
            started = time.perf_counter()
            blueprint, analysis = job.blueprint, job.analysis
            shape = slot_shape(blueprint.slot)
            min_batch = 2 if job.training and analysis.batch_statistics else 1

            def reference() -> torch.nn.Module:
                module = build_module(
                    blueprint,
                    seed=job.seed,
                    dtype=job.torch_dtype,
                    device=job.device,
                    analysis=analysis,
                )
                return module.train(job.training)

            info = {
                "kernel_id": job.kernel_id,
                "blueprint": blueprint.name,
                "blueprint_version": blueprint.version,
                "slot": blueprint.slot.model_dump(mode="json"),
                "dtype": job.dtype,
                "training": job.training,
                "min_batch": min_batch,
                "format_version": FORMAT_VERSION,
            }
            example = torch.zeros(
                (max(2, min_batch), *shape), dtype=job.torch_dtype, device=job.device
            )
            artifact = export_kernel(
                reference(), example, training=job.training, min_batch=min_batch, info=info
            )
            sha = sha256_hex(artifact)
            report = validate_kernel(
                artifact,
                sha,
                reference,
                shape,
                dtype=job.torch_dtype,
                device=job.device,
                min_batch=min_batch,
                settings=self._validation,
            )
            if not report.passed:
                self._rejected += 1
                raise KernelRejectedError(report)
            metadata = KernelMetadata(
                kernel_id=job.kernel_id,
                artifact_sha256=sha,
                size=len(artifact),
                blueprint_name=blueprint.name,
                blueprint_version=blueprint.version,
                description=blueprint.description,
                canonical_blueprint=job.canonical,
                slot=blueprint.slot,
                dtype=job.dtype,
                device=str(job.device),
                seed=job.seed,
                training=job.training,
                min_batch=min_batch,
                param_count=analysis.param_count,
                node_count=len(blueprint.nodes),
                depth=analysis.depth,
                torch_version=torch.__version__,
                format_version=FORMAT_VERSION,
                compile_seconds=time.perf_counter() - started,
                report=report,
            )
            return CompiledArtifact(artifact, metadata.model_dump(mode="json"))


@dataclass(frozen=True)
class _Job:
    blueprint: Blueprint
    analysis: BlueprintAnalysis
    canonical: str
    kernel_id: str
    dtype: str
    torch_dtype: torch.dtype
    device: torch.device
    seed: int
    training: bool


def _resolve_dtype(dtype: str) -> torch.dtype:
    try:
        return SUPPORTED_DTYPES[dtype]
    except KeyError:
        raise InvalidArgumentError(
            f"unsupported dtype {dtype!r}; supported: {', '.join(SUPPORTED_DTYPES)}", field="dtype"
        ) from None


def _resolve_device(device: str) -> torch.device:
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError):
        raise InvalidArgumentError(
            f"unknown device {device!r}; use 'cpu' or 'cuda[:N]'", field="device"
        ) from None
    if resolved.type == "cpu":
        return torch.device("cpu")
    if resolved.type != "cuda":
        raise InvalidArgumentError(
            f"unsupported device type {resolved.type!r}; use 'cpu' or 'cuda[:N]'", field="device"
        )
    if not torch.cuda.is_available():
        raise FailedPreconditionError(
            f"device {device!r} requested, but this compiler has no CUDA device "
            f"(torch {torch.__version__}); compile for 'cpu' or run the compiler on a GPU machine"
        )
    if resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise FailedPreconditionError(
            f"device {device!r} requested, but this machine has "
            f"{torch.cuda.device_count()} CUDA devices"
        )
    return resolved
