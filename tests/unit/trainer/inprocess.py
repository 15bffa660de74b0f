"""In-process implementations of the trainer's two boundaries over the REAL cores.

`CompilerKernelSource` answers `KernelSource` with `services.compiler.BlueprintCompiler`
(real blueprints, real `torch.export` kernels, real validation), and
`SelectorClient` answers `SeedSelectorClient` with `services.seed_selector.SeedSelector`
(real bandit, `InMemorySelectorStore`). The gRPC clients the agent will use carry
the same calls over the wire; these skip only the transport.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path

from common.errors import UnavailableError
from services.compiler import (
    BlueprintCompiler,
    FileKernelStore,
    ValidationSettings,
    count_parameters,
    list_catalogue,
    parse_slot,
)
from services.compiler.catalogue import get_blueprint
from services.seed_selector import (
    ArmOffer,
    Budget,
    Concurrency,
    InMemorySelectorStore,
    JobSettings,
    SeedSelector,
    SlotState,
    Strategy,
)
from services.trainer.growth import (
    BlueprintOption,
    KernelArtifact,
    Selection,
    SelectionRequest,
)
from services.trainer.seeds import SlotShape

# Every check runs; latency is measured on a small batch and never judged (tests
# do not assert timings).
FAST_VALIDATION = ValidationSettings(
    latency_batch=8, latency_runs=1, latency_iters=1, max_latency_ratio=1e9
)


def make_compiler(root: Path) -> BlueprintCompiler:
    return BlueprintCompiler(FileKernelStore(root, max_bytes=1 << 30), validation=FAST_VALIDATION)


class CompilerKernelSource:
    """`KernelSource` backed by a real `BlueprintCompiler`; `down` makes it unreachable."""

    def __init__(self, compiler: BlueprintCompiler) -> None:
        self.compiler = compiler
        self.down = False
        self.compiles = 0

    async def blueprints(self, slot: SlotShape) -> Sequence[BlueprintOption]:
        self._check()
        target = parse_slot(slot.to_json())
        return [
            BlueprintOption(entry.name, count_parameters(entry.blueprint(target)))
            for entry in list_catalogue()
            if target.kind in entry.slot_kinds
        ]

    async def compile(
        self, blueprint: str, slot: SlotShape, *, training: bool = True
    ) -> KernelArtifact:
        self._check()
        target = parse_slot(slot.to_json())
        result = await self.compiler.compile(
            get_blueprint(blueprint, target), target, training=training
        )
        self.compiles += 1
        return KernelArtifact(
            result.kernel_id,
            result.artifact_sha256,
            self.compiler.get_kernel_bytes(result.kernel_id),
            result.metadata.param_count,
        )

    def _check(self) -> None:
        if self.down:
            raise UnavailableError("compiler unreachable")


class SelectorClient:
    """`SeedSelectorClient` backed by a real `SeedSelector` over `InMemorySelectorStore`."""

    def __init__(self, selector: SeedSelector | None = None) -> None:
        self.selector = selector or SeedSelector(InMemorySelectorStore())
        self.down = False
        self.selections: list[Selection] = []
        self.reports: list[tuple[str, float, dict[str, float]]] = []
        self._configured: set[str] = set()

    async def select(self, request: SelectionRequest) -> Selection:
        self._check()
        job = request.job_id or None
        if request.rng_seed is not None and request.job_id not in self._configured:
            await self.selector.configure_job(job, JobSettings(seed=request.rng_seed))
            self._configured.add(request.job_id)
        offers = [
            ArmOffer(a.slot_id, a.blueprint, a.added_params, SlotState(a.slot_state))
            for a in request.arms
        ]
        decision = await self.selector.select(
            job,
            offers,
            strategy=Strategy(request.strategy) if request.strategy else None,
            budget=Budget(request.param_budget),
            concurrency=Concurrency(request.active_seeds, request.max_concurrent_seeds),
            context={a.slot_id: dict(a.features) for a in request.arms},
        )
        arm = decision.arm
        selection = Selection(
            decision.decision_id,
            arm.slot_id if arm else None,
            arm.blueprint if arm else None,
            decision.reason,
        )
        self.selections.append(selection)
        return selection

    async def report(self, decision_id: str, reward: float, metrics: Mapping[str, float]) -> None:
        self._check()
        await self.selector.report(decision_id, reward, metrics)
        self.reports.append((decision_id, reward, dict(metrics)))

    def _check(self) -> None:
        if self.down:
            raise UnavailableError("seed selector unreachable")


async def compile_kernel(
    compiler: BlueprintCompiler, blueprint: str, slot: SlotShape, *, training: bool = True
) -> KernelArtifact:
    """One real kernel for tests that graft by hand."""
    return await CompilerKernelSource(compiler).compile(blueprint, slot, training=training)


def compile_kernel_sync(
    compiler: BlueprintCompiler, blueprint: str, slot: SlotShape, *, training: bool = True
) -> KernelArtifact:
    return asyncio.run(compile_kernel(compiler, blueprint, slot, training=training))
