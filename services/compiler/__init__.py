"""The blueprint compiler agent: blueprints (a small IR of whitelisted ops) -> validated,
content-addressed `torch.export` kernels that a trainer grafts into seed slots.

The core lives in the modules below and this package re-exports its public API;
`service.py` is the gRPC servicer and `python -m services.compiler` runs the agent.
Kernels are loaded with `common.kernels.load_kernel` (no service imports this
package). See `services/compiler/README.md` for the artifact format.
"""

from services.compiler.blueprint import (
    Blueprint,
    BlueprintAnalysis,
    BlueprintLimits,
    Conv2dSlot,
    LinearSlot,
    SlotSpec,
    analyse_blueprint,
    canonical_json,
    count_parameters,
    parse_blueprint,
    parse_slot,
    slot_shape,
)
from services.compiler.build import BlueprintModule, build_module
from services.compiler.catalogue import CATALOGUE, CatalogueEntry, get_blueprint, list_catalogue
from services.compiler.compiler import (
    SUPPORTED_DTYPES,
    BlueprintCompiler,
    CompileResult,
    CompilerStats,
    KernelMetadata,
    KernelRejectedError,
)
from services.compiler.export import FORMAT_VERSION, export_kernel, kernel_id
from services.compiler.kernel_store import (
    CompiledArtifact,
    FileKernelStore,
    KernelEntry,
    KernelStore,
    StoredKernel,
    StoreStats,
)
from services.compiler.validate import (
    CheckResult,
    ValidationReport,
    ValidationSettings,
    validate_kernel,
)

__all__ = [
    "CATALOGUE",
    "FORMAT_VERSION",
    "SUPPORTED_DTYPES",
    "Blueprint",
    "BlueprintAnalysis",
    "BlueprintCompiler",
    "BlueprintLimits",
    "BlueprintModule",
    "CatalogueEntry",
    "CheckResult",
    "CompileResult",
    "CompiledArtifact",
    "CompilerStats",
    "Conv2dSlot",
    "FileKernelStore",
    "KernelEntry",
    "KernelMetadata",
    "KernelRejectedError",
    "KernelStore",
    "LinearSlot",
    "SlotSpec",
    "StoreStats",
    "StoredKernel",
    "ValidationReport",
    "ValidationSettings",
    "analyse_blueprint",
    "build_module",
    "canonical_json",
    "count_parameters",
    "export_kernel",
    "get_blueprint",
    "kernel_id",
    "list_catalogue",
    "parse_blueprint",
    "parse_slot",
    "slot_shape",
    "validate_kernel",
]
