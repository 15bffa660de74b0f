"""Growth on real training runs, with the real compiler core and the real selector core."""

from __future__ import annotations

import math

import pytest
import torch

from common.breaker import BreakerConfig
from common.kernels import load_kernel
from services.compiler import BlueprintCompiler
from services.trainer.events import GrowthStatus, SlotTransition, TrainingEvent
from services.trainer.growth import FAILURE_REWARD, GrowthController, PlateauDetector, seed_reward
from services.trainer.lifecycle import SeedState
from services.trainer.loop import Trainer
from services.trainer.models import DataShape, build_model
from services.trainer.seeds import SlotShape
from services.trainer.spec import GrowthSpec, ModelSpec
from services.trainer.surgery import find_slots, graft, insert_slot
from tests.unit.trainer.conftest import growth_spec, make_controller
from tests.unit.trainer.inprocess import CompilerKernelSource, SelectorClient, compile_kernel_sync

FAULTS = "tests.unit.trainer.fault_injection"


def test_a_plateau_grafts_a_real_kernel_and_walks_it_to_a_verdict(
    compiler: BlueprintCompiler,
) -> None:
    spec = growth_spec()
    selector, source = SelectorClient(), CompilerKernelSource(compiler)
    events: list[TrainingEvent] = []
    trainer = Trainer(spec, events=events.append, growth=make_controller(spec, selector, source))
    params_before = trainer.param_count()
    result = trainer.run()

    assert len(selector.selections) >= 1
    first = selector.selections[0]
    assert first.slot_id in ("blocks.0.fc", "blocks.1.fc")
    moves = [e for e in events if isinstance(e, SlotTransition) and e.slot_id == first.slot_id]
    path = [(m.from_state, m.to_state) for m in moves[:5]]
    assert path == [
        ("dormant", "germinated"),
        ("germinated", "training"),
        ("training", "blending"),
        ("blending", "holding"),
        ("holding", moves[4].to_state),
    ]
    assert moves[4].to_state in ("fossilized", "culled")
    assert moves[0].kernel_id and first.decision_id in moves[0].reason
    # The first round sets the baseline; the second (step 20) is the first plateau.
    steps = [m.step for m in moves[:5]]
    assert steps == [20, 21, 21 + 8, 21 + 16, 21 + 16 + 4]

    # The verdict's reward went to the selector, computed as documented.
    decision_id, reward, metrics = selector.reports[0]
    assert decision_id == first.decision_id
    improvement, expected = seed_reward(
        metrics["val_loss_with"], metrics["val_loss_without"], int(metrics["added_params"])
    )
    assert reward == pytest.approx(expected) and metrics["improvement"] == pytest.approx(
        improvement
    )
    assert metrics["fossilized"] == (1.0 if moves[4].to_state == "fossilized" else 0.0)
    assert selector.selector.core.stats("job-1", now=1e12).reports >= 1

    slot = next(s for s in result.slots if s.slot_id == first.slot_id)
    if moves[4].to_state == "fossilized":
        assert result.param_count == params_before + slot.added_params
    assert result.growth_available and result.status == "succeeded"


def test_growth_continues_without_a_selector_and_says_why(compiler: BlueprintCompiler) -> None:
    spec = growth_spec()
    selector, source = SelectorClient(), CompilerKernelSource(compiler)
    selector.down = True
    events: list[TrainingEvent] = []
    result = Trainer(
        spec, events=events.append, growth=make_controller(spec, selector, source)
    ).run()
    assert result.status == "succeeded" and result.step == 50
    assert not result.growth_available and "selector unavailable" in result.growth_reason
    assert all(s.state is SeedState.DORMANT for s in result.slots)
    statuses = [e for e in events if isinstance(e, GrowthStatus)]
    assert statuses and not statuses[0].available
    assert math.isfinite(result.metrics["val_loss"])


def test_growth_pauses_while_the_compiler_is_away_and_resumes_when_it_is_back(
    compiler: BlueprintCompiler,
) -> None:
    spec = growth_spec()
    selector, source = SelectorClient(), CompilerKernelSource(compiler)
    source.down = True
    events: list[TrainingEvent] = []

    def sink(event: TrainingEvent) -> None:
        events.append(event)
        if isinstance(event, GrowthStatus) and not event.available:
            source.down = False  # the compiler comes back after the first failure

    controller = GrowthController(
        GrowthSpec.model_validate(spec["growth"]),
        selector=selector,
        kernels=source,
        attempts=1,
        breaker=BreakerConfig(failure_threshold=5, reset_timeout_s=3600),
    )
    result = Trainer(spec, events=sink, growth=controller).run()
    statuses = [e.available for e in events if isinstance(e, GrowthStatus)]
    assert statuses[:2] == [False, True]
    assert any(isinstance(e, SlotTransition) and e.to_state == "germinated" for e in events)
    assert result.growth_available


def test_a_spike_during_blending_culls_the_seed_and_reports_a_failure(
    compiler: BlueprintCompiler,
) -> None:
    spec = growth_spec(seed_training_steps=4, blend_steps=30)
    spec.update(
        max_steps=40,
        checkpoint_every_steps=5,
        safety={"loss_spike_z_threshold": 8.0, "spike_window": 8},
        callbacks=[{"name": f"{FAULTS}:BlowUpWeights", "params": {"step": 22, "factor": 40.0}}],
    )
    selector, source = SelectorClient(), CompilerKernelSource(compiler)
    events: list[TrainingEvent] = []
    trainer = Trainer(spec, events=events.append, growth=make_controller(spec, selector, source))
    result = trainer.run()
    culled = [e for e in events if isinstance(e, SlotTransition) and e.to_state == "culled"]
    assert culled and "loss spike" in culled[0].reason
    assert selector.reports[0][1] == FAILURE_REWARD
    assert result.rollbacks == 1 and trainer.lr_scale == 1.0  # the seed took the blame, not the lr


def test_plateau_detector_and_reward() -> None:
    detector = PlateauDetector(min_delta=0.1)
    assert [detector.update(v) for v in (1.0, 0.95, 0.85, 0.84, 0.84)] == [0, 1, 0, 1, 2]
    detector.reset()
    assert detector.rounds == 0
    assert seed_reward(0.9, 1.0, 500) == pytest.approx((0.1, 0.1))
    assert seed_reward(0.9, 1.0, 4000) == pytest.approx((0.1, 0.025))
    assert seed_reward(float("nan"), 1.0, 10)[1] == FAILURE_REWARD


def test_a_batch_norm_kernel_evaluates_with_its_eval_twin(compiler: BlueprintCompiler) -> None:
    torch.manual_seed(0)
    model = build_model(
        ModelSpec(template="cnn", params={"channels": [4]}), DataShape((1, 6, 6), 3)
    )
    probe = torch.randn(8, 1, 6, 6)
    slot = insert_slot(model, "blocks.0.conv", probe)
    train = compile_kernel_sync(compiler, "conv_residual_bn", slot.shape, training=True)
    twin = compile_kernel_sync(compiler, "conv_residual_bn", slot.shape, training=False)
    assert slot.shape == SlotShape("conv2d", (4, 6, 6))
    kernel = load_kernel(train.data, train.sha256)
    graft(model, slot.slot_id, kernel, probe, eval_kernel=load_kernel(twin.data, twin.sha256))
    for state in (SeedState.TRAINING, SeedState.BLENDING, SeedState.HOLDING):
        slot.transition(state)
    with torch.no_grad():
        for p in kernel.parameters():
            p.add_(torch.randn_like(p) * 0.5)
        model.train()
        for _ in range(3):
            model(torch.randn(16, 1, 6, 6) * 2 + 1)  # updates the shared running statistics
        model.eval()
        x = torch.randn(5, 1, 6, 6)
        # Eval mode uses running statistics: a sample's output does not depend on its batch.
        assert torch.allclose(model(x)[:1], model(x[:1]), atol=1e-5)


def test_growth_without_named_slots_uses_the_template_sites() -> None:
    spec = growth_spec()
    spec["slots"] = []
    events: list[TrainingEvent] = []
    trainer = Trainer(spec, events=events.append)  # no selector or kernel source given
    assert set(find_slots(trainer.model)) == {"blocks.0.fc", "blocks.1.fc"}
    result = trainer.run()
    assert not result.growth_available and "no seed selector" in result.growth_reason
    assert [e.available for e in events if isinstance(e, GrowthStatus)] == [False]


def test_a_seed_that_does_not_help_is_culled_embargoed_and_the_slot_reopens(
    compiler: BlueprintCompiler,
) -> None:
    spec = growth_spec(fossilize_min_improvement=10.0, max_concurrent_seeds=1)  # nothing is enough
    spec["slots"] = [{"module_path": "blocks.1.fc"}]
    spec["max_steps"] = 70
    selector, source = SelectorClient(), CompilerKernelSource(compiler)
    events: list[TrainingEvent] = []
    trainer = Trainer(spec, events=events.append, growth=make_controller(spec, selector, source))
    params_before = trainer.param_count()
    result = trainer.run()
    moves = [(e.step, e.from_state, e.to_state) for e in events if isinstance(e, SlotTransition)]
    states = [m[2] for m in moves]
    assert states[:8] == [
        "germinated",
        "training",
        "blending",
        "holding",
        "culled",
        "embargoed",
        "dormant",
        "germinated",
    ]
    culled_at = moves[4][0]
    assert moves[5][0] == culled_at + 1 and moves[6][0] == culled_at + 1 + 5  # embargo_steps 5
    assert selector.reports[0][2]["fossilized"] == 0.0
    # The culled seed's parameters left the model and the optimizer; the new one is in.
    names = [g.get("name") for g in trainer.optimizer.param_groups]
    assert names == ["host", "seed:blocks.1.fc"]
    live = result.slots[0]
    assert trainer.param_count() == params_before + live.added_params
