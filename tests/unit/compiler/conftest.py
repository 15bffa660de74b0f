"""Small slots, fast validation settings and a once-per-session compile of the catalogue."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.compiler.blueprint import Blueprint, Conv2dSlot, LinearSlot
from services.compiler.catalogue import CATALOGUE, get_blueprint
from services.compiler.compiler import BlueprintCompiler, CompileResult
from services.compiler.kernel_store import FileKernelStore
from services.compiler.validate import ValidationSettings

# Small enough to compile in a fraction of a second, large enough that every
# catalogue blueprint has real hidden layers (a 1-wide bottleneck, a 2x2 attention map).
SMALL_SLOTS: dict[str, LinearSlot | Conv2dSlot] = {
    "linear": LinearSlot(features=8),
    "conv2d": Conv2dSlot(channels=4, height=5, width=5),
}

# Every check, with the latency measured on a small batch and never judged: tests do not
# assert timings (the benchmark reports them).
FAST_VALIDATION = ValidationSettings(
    latency_batch=8, latency_runs=1, latency_iters=1, max_latency_ratio=1e9
)

CATALOGUE_CASES = [
    pytest.param(name, kind, id=f"{name}-{kind}")
    for name, entry in sorted(CATALOGUE.items())
    for kind in entry.slot_kinds
]


@dataclass(frozen=True)
class CompiledBlueprint:
    blueprint: Blueprint
    result: CompileResult
    artifact: bytes


class CompiledCatalogue:
    """Compiles each catalogue blueprint for its small slot once, on first use."""

    def __init__(self, root: Path) -> None:
        self.store = FileKernelStore(root, max_bytes=1 << 30)
        self.compiler = BlueprintCompiler(self.store, validation=FAST_VALIDATION)
        self._done: dict[tuple[str, str], CompiledBlueprint] = {}

    def get(self, name: str, kind: str) -> CompiledBlueprint:
        if (name, kind) not in self._done:
            blueprint = get_blueprint(name, SMALL_SLOTS[kind])
            result = asyncio.run(self.compiler.compile(blueprint, SMALL_SLOTS[kind]))
            artifact = self.compiler.get_kernel_bytes(result.kernel_id)
            self._done[name, kind] = CompiledBlueprint(blueprint, result, artifact)
        return self._done[name, kind]


@pytest.fixture(scope="session")
def compiled_catalogue(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CompiledCatalogue]:
    """The catalogue compiled for `SMALL_SLOTS` (lazily, shared by the whole session)."""
    catalogue = CompiledCatalogue(tmp_path_factory.mktemp("catalogue-kernels"))
    try:
        yield catalogue
    finally:
        catalogue.store.close()
