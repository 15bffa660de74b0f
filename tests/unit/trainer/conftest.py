"""Fixtures of the trainer tests: a real compiler (kernels cached per session) and small specs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common.breaker import BreakerConfig
from services.compiler import BlueprintCompiler
from services.trainer.growth import GrowthController
from services.trainer.spec import GrowthSpec
from tests.unit.trainer.inprocess import CompilerKernelSource, SelectorClient, make_compiler


@pytest.fixture(scope="session")
def compiler(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BlueprintCompiler]:
    """A real blueprint compiler with a session-wide kernel store (each kernel compiles once)."""
    yield make_compiler(Path(tmp_path_factory.mktemp("kernels")))


def spirals_spec(**overrides: Any) -> dict[str, Any]:
    """A small, fast two-spirals job (MLP 2-16-16-2); `overrides` replace top-level keys."""
    spec: dict[str, Any] = {
        "model": {"template": "mlp", "params": {"hidden": [16, 16]}},
        "data": {
            "dataset": "two_spirals",
            "batch_size": 32,
            "params": {"samples": 600, "test_samples": 200},
        },
        "optimizer": {"name": "adamw", "lr": 0.01},
        "max_steps": 40,
        "eval_every_steps": 10,
        "seed": 7,
    }
    spec.update(overrides)
    return spec


def growth_spec(**overrides: Any) -> dict[str, Any]:
    """Two slots on an 8-wide MLP, every validation round a plateau, short lifecycle phases."""
    growth: dict[str, Any] = {
        "enabled": True,
        "plateau_patience": 1,
        "plateau_min_delta": 10.0,  # every validation round counts as a plateau
        "seed_training_steps": 8,
        "blend_steps": 8,
        "blend_schedule": "cosine",
        "holding_steps": 4,
        "embargo_steps": 5,
        "blueprints": ["bottleneck_mlp", "residual_mlp"],
        "strategy": "ucb1",
    }
    growth.update(overrides)
    return spirals_spec(
        model={"template": "mlp", "params": {"hidden": [8, 8]}},
        slots=[{"module_path": "blocks.0.fc"}, {"module_path": "blocks.1.fc"}],
        max_steps=50,
        growth=growth,
    )


def make_controller(
    spec: dict[str, Any], selector: SelectorClient, source: CompilerKernelSource
) -> GrowthController:
    return GrowthController(
        GrowthSpec.model_validate(spec["growth"]),
        selector=selector,
        kernels=source,
        job_id="job-1",
        seed=3,
        breaker=BreakerConfig(failure_threshold=2, reset_timeout_s=3600),
        attempts=1,
    )
