"""The training loop on real data: events, guards, rollback, cancellation, precision."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import pytest
import torch

from common.errors import InvalidArgumentError, ResourceExhaustedError
from services.trainer.checkpoint import CheckpointStore
from services.trainer.events import CheckpointSaved, SafetyEvent, TrainingEvent, TrainingProgress
from services.trainer.loop import Trainer
from services.trainer.safety import TrainingAborted
from tests.unit.trainer.conftest import spirals_spec

FAULTS = "tests.unit.trainer.fault_injection"


def test_a_short_run_reports_progress_and_checkpoints(tmp_path: Path) -> None:
    events: list[TrainingEvent] = []
    trainer = Trainer(spirals_spec(), events=events.append, checkpoints=CheckpointStore(tmp_path))
    result = trainer.run()
    assert result.status == "succeeded" and result.step == 40
    progress = [e for e in events if isinstance(e, TrainingProgress)]
    assert [e.step for e in progress if e.val_loss is not None] == [10, 20, 30, 40]
    assert all(math.isfinite(e.train_loss) for e in progress)
    saved = [e for e in events if isinstance(e, CheckpointSaved)]
    assert [e.step for e in saved] == [0, 40]
    assert set(result.metrics) >= {"train_loss", "train_accuracy", "val_loss", "test_accuracy"}
    assert result.checkpoint is not None and result.checkpoint.step == 40


def test_nan_gradient_steps_are_skipped_and_counted() -> None:
    events: list[TrainingEvent] = []
    spec = spirals_spec(
        callbacks=[{"name": f"{FAULTS}:NaNGradients", "params": {"steps": [5, 6, 17]}}]
    )
    trainer = Trainer(spec, events=events.append)
    result = trainer.run()
    assert result.status == "succeeded" and result.step == 40
    assert result.skipped_steps == 3
    skipped = [e for e in events if isinstance(e, SafetyEvent) and e.kind == "nonfinite"]
    assert [e.step for e in skipped] == [5, 6, 17]
    first = trainer.optimizer.param_groups[0]["params"][0]
    assert int(trainer.optimizer.state[first]["step"]) == 40 - 3  # no update on skipped steps
    assert all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())


def test_too_many_bad_steps_in_a_row_abort_with_the_reason() -> None:
    spec = spirals_spec(
        callbacks=[{"name": f"{FAULTS}:NaNGradients"}], safety={"max_consecutive_bad_steps": 4}
    )
    with pytest.raises(TrainingAborted, match="4 consecutive steps with non-finite gradients"):
        Trainer(spec).run()


def test_a_loss_spike_rolls_back_to_the_last_checkpoint_and_training_recovers(
    tmp_path: Path,
) -> None:
    events: list[TrainingEvent] = []
    spec = spirals_spec(
        max_steps=60,
        checkpoint_every_steps=10,
        safety={"loss_spike_z_threshold": 8.0, "spike_window": 20},
        callbacks=[{"name": f"{FAULTS}:BlowUpWeights", "params": {"step": 34, "factor": 40.0}}],
    )
    trainer = Trainer(spec, events=events.append, checkpoints=CheckpointStore(tmp_path))
    result = trainer.run()
    spikes = [e for e in events if isinstance(e, SafetyEvent) and e.kind == "spike"]
    rollbacks = [e for e in events if isinstance(e, SafetyEvent) and e.kind == "rollback"]
    assert [e.step for e in spikes] == [34]
    assert len(rollbacks) == 1 and "to step 30" in rollbacks[0].detail
    assert result.rollbacks == 1 and trainer.lr_scale == 0.5
    assert result.status == "succeeded" and result.step == 60
    assert result.metrics["val_loss"] < 1.0  # recovered: a blown-up model has losses in the tens


def test_repeated_spikes_beyond_the_rollback_limit_abort(tmp_path: Path) -> None:
    spec = spirals_spec(
        max_steps=80,
        checkpoint_every_steps=10,
        safety={"loss_spike_z_threshold": 8.0, "spike_window": 20, "max_rollbacks": 0},
        callbacks=[{"name": f"{FAULTS}:BlowUpWeights", "params": {"step": 34, "factor": 40.0}}],
    )
    with pytest.raises(TrainingAborted, match="rollbacks"):
        Trainer(spec, checkpoints=CheckpointStore(tmp_path)).run()


def test_cancelling_stops_after_the_step_and_saves_a_checkpoint(tmp_path: Path) -> None:
    cancel = threading.Event()

    def sink(event: TrainingEvent) -> None:
        if isinstance(event, TrainingProgress) and event.step >= 12:
            cancel.set()

    spec = spirals_spec(progress_every_steps=1)
    trainer = Trainer(spec, events=sink, cancel=cancel, checkpoints=CheckpointStore(tmp_path))
    result = trainer.run()
    assert result.status == "cancelled" and result.step == 12
    assert result.checkpoint is not None and result.checkpoint.step == 12


def test_runs_from_a_worker_thread() -> None:
    results = []
    worker = threading.Thread(
        target=lambda: results.append(Trainer(spirals_spec(max_steps=10)).run())
    )
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive() and results[0].step == 10


def test_bf16_autocast_trains_on_cpu() -> None:
    result = Trainer(spirals_spec(precision="bf16", max_steps=20)).run()
    assert math.isfinite(result.metrics["train_loss"])


def test_fp16_without_cuda_is_refused_with_the_fix() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(InvalidArgumentError, match="bf16") as caught:
        Trainer(spirals_spec(precision="fp16", device="cpu"))
    assert caught.value.field == "precision"


def test_out_of_memory_halves_the_micro_batch_and_retries_the_step() -> None:
    events: list[TrainingEvent] = []
    spec = spirals_spec(
        model={"factory": f"{FAULTS}:memory_hungry", "params": {"limit": 8}}, max_steps=5
    )
    trainer = Trainer(spec, events=events.append)
    result = trainer.run()
    assert result.step == 5 and trainer.micro_batches == 4  # 32 -> 16 -> 8 samples per chunk
    assert [e.count for e in events if isinstance(e, SafetyEvent) and e.kind == "oom"] == [2, 4]


def test_out_of_memory_on_a_single_sample_is_resource_exhausted() -> None:
    spec = spirals_spec(
        model={"factory": f"{FAULTS}:memory_hungry", "params": {"limit": 0}}, max_steps=5
    )
    with pytest.raises(ResourceExhaustedError, match="one sample at a time"):
        Trainer(spec).run()


def test_a_failed_checkpoint_write_is_reported_and_training_goes_on(tmp_path: Path) -> None:
    def broken(path: Path, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    events: list[TrainingEvent] = []
    result = Trainer(
        spirals_spec(max_steps=10),
        events=events.append,
        checkpoints=CheckpointStore(tmp_path, write=broken),
    ).run()
    assert result.status == "succeeded" and result.checkpoint is None
    assert [e.kind for e in events if isinstance(e, SafetyEvent)] == ["checkpoint_failed"] * 2


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"optimizer": {"name": "adamz"}}, "optimizer.name"),
        ({"optimizer": {"name": "sgd", "extra": {"momentun": 0.9}}}, "optimizer.extra"),
        ({"scheduler": {"name": "step", "params": {"step_size": 0}}}, "scheduler.params.step_size"),
        ({"loss": {"name": "cross_entropy", "params": {"smoothing": 0.1}}}, "loss.params"),
        ({"model": {"template": "mlp", "params": {"hiden": [4]}}}, "model.params.hiden"),
        ({"model": {"factory": "no_such_pkg.models:make"}}, "model.factory"),
        ({"callbacks": [{"name": "printer"}]}, "callbacks"),
    ],
)
def test_bad_specs_fail_before_training_naming_the_field(
    override: dict[str, object], field: str
) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        Trainer(spirals_spec(**override))
    assert caught.value.field == field


@pytest.mark.slow
def test_torch_compile_trains_and_matches_eager_closely() -> None:
    """`compile: true` runs the forward through torch.compile (no silent fallback to eager)."""
    events: list[TrainingEvent] = []
    compiled = Trainer(spirals_spec(max_steps=10, compile=True), events=events.append).run()
    eager = Trainer(spirals_spec(max_steps=10)).run()
    fallbacks = [e for e in events if isinstance(e, SafetyEvent) and e.kind == "compile_fallback"]
    assert fallbacks == []
    assert compiled.step == eager.step == 10
    assert math.isclose(compiled.metrics["val_loss"], eager.metrics["val_loss"], rel_tol=1e-3)
