"""Resuming from a checkpoint gives the same weights, bit for bit, as never stopping."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from common.breaker import BreakerConfig
from services.compiler import BlueprintCompiler
from services.trainer.checkpoint import CheckpointStore
from services.trainer.events import TrainingEvent, TrainingProgress
from services.trainer.growth import GrowthController
from services.trainer.lifecycle import SeedState
from services.trainer.loop import Trainer
from services.trainer.seeds import SlotRecord
from services.trainer.spec import GrowthSpec
from tests.unit.trainer.conftest import spirals_spec
from tests.unit.trainer.inprocess import CompilerKernelSource, SelectorClient

REPO = Path(__file__).resolve().parents[3]


def _resume_spec() -> dict[str, Any]:
    return spirals_spec(
        model={"template": "mlp", "params": {"hidden": [8, 8], "dropout": 0.1}},
        slots=[{"module_path": "blocks.0.fc"}],
        max_steps=60,
        deterministic=True,
        progress_every_steps=1,
        scheduler={"name": "cosine", "warmup_steps": 5},
        safety={"loss_spike_z_threshold": 50.0, "spike_window": 10, "grad_clip_norm": 1.0},
        growth={
            "enabled": True,
            "plateau_patience": 1,
            "plateau_min_delta": 10.0,
            "seed_training_steps": 10,
            "blend_steps": 100,  # still blending at the end: no second decision
            "blueprints": ["residual_mlp"],
        },
    )


def _trainer(
    spec: dict[str, Any], compiler: BlueprintCompiler, root: Path | None, **kw: Any
) -> Trainer:
    controller = GrowthController(
        GrowthSpec.model_validate(spec["growth"]),
        selector=SelectorClient(),
        kernels=CompilerKernelSource(compiler),
        job_id="resume",
        seed=1,
        breaker=BreakerConfig(failure_threshold=2, reset_timeout_s=3600),
        attempts=1,
    )
    store = CheckpointStore(root) if root is not None else None
    return Trainer(spec, growth=controller, checkpoints=store, **kw)


def _without_decision(record: SlotRecord) -> dict[str, Any]:
    return {k: v for k, v in record.to_json().items() if k != "decision_id"}


def _same_training_state(a: Trainer, b: Trainer) -> None:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    oa, ob = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert oa["param_groups"] == ob["param_groups"]
    for index, entries in oa["state"].items():
        for key, value in entries.items():
            assert torch.equal(value, ob["state"][index][key]), (index, key)


def test_train_k_steps_then_resume_in_new_objects_matches_one_straight_run(
    compiler: BlueprintCompiler, tmp_path: Path
) -> None:
    spec = _resume_spec()
    straight = _trainer(spec, compiler, None)
    straight_result = straight.run()
    straight_rng = torch.get_rng_state()
    slot = straight_result.slots[0]
    assert (
        slot.state is SeedState.BLENDING and slot.kernel_id
    )  # a grafted kernel crossed the resume

    cancel = threading.Event()

    def stop_at_25(event: TrainingEvent) -> None:
        if isinstance(event, TrainingProgress) and event.step >= 25:
            cancel.set()

    first = _trainer(spec, compiler, tmp_path, events=stop_at_25, cancel=cancel)
    interrupted = first.run()
    assert interrupted.status == "cancelled" and interrupted.step == 25
    assert interrupted.slots[0].state is SeedState.TRAINING

    resumed = _trainer(spec, compiler, tmp_path)
    result = resumed.run()
    assert result.resumed_from_step == 25 and result.step == 60
    # Decision ids are random per selector; everything else about the slot must match.
    assert [_without_decision(s) for s in result.slots] == [
        _without_decision(s) for s in straight_result.slots
    ]
    _same_training_state(straight, resumed)
    assert torch.equal(torch.get_rng_state(), straight_rng)
    assert result.metrics == straight_result.metrics


_CHILD = """
import json, sys
from services.trainer.checkpoint import CheckpointStore
from services.trainer.loop import Trainer
from services.trainer.seeds import SlotRecord
spec = json.loads(sys.argv[1])
Trainer(spec, checkpoints=CheckpointStore(sys.argv[2])).run()
"""


@pytest.mark.slow
def test_a_process_killed_mid_run_resumes_to_the_same_weights(tmp_path: Path) -> None:
    spec = spirals_spec(
        model={"template": "mlp", "params": {"hidden": [16, 16], "dropout": 0.2}},
        max_steps=80,
        checkpoint_every_steps=10,
        deterministic=True,
        scheduler={"name": "cosine"},
    )
    killed = dict(
        spec,
        callbacks=[
            {"name": "tests.unit.trainer.fault_injection:KillProcessAt", "params": {"step": 47}}
        ],
    )
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(killed), str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert child.returncode == -9, child.stderr.decode()[-2000:]
    assert CheckpointStore(tmp_path).checkpoints()[0].step == 40

    resumed = Trainer(spec, checkpoints=CheckpointStore(tmp_path))
    result = resumed.run()
    straight = Trainer(spec)
    straight.run()
    assert result.resumed_from_step == 40 and result.step == 80
    _same_training_state(straight, resumed)
