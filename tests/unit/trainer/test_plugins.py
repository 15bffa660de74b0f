"""Plugin registries and the built-in learning-rate schedules."""

from __future__ import annotations

import math

import pytest

from common.errors import InvalidArgumentError
from services.trainer.plugins import (
    CALLBACKS,
    LOSSES,
    SCHEDULES,
    CallbackContext,
    EarlyStopping,
    Registry,
)


def test_schedules_are_pure_functions_of_the_step() -> None:
    cosine = SCHEDULES.resolve("cosine")(total_steps=110, warmup_steps=10, base_lr=0.1, min_lr=0.01)
    assert cosine(0) == pytest.approx(0.1)  # warmup: 1/10 of full
    assert cosine(9) == pytest.approx(1.0)
    assert cosine(10) == pytest.approx(1.0)
    assert cosine(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert cosine(110) == pytest.approx(0.1) and cosine(500) == pytest.approx(0.1)
    step = SCHEDULES.resolve("step")(
        total_steps=100, warmup_steps=0, base_lr=1.0, step_size=10, gamma=0.5
    )
    assert [step(s) for s in (0, 9, 10, 25)] == [1.0, 1.0, 0.5, 0.25]
    linear = SCHEDULES.resolve("linear")(total_steps=100, warmup_steps=0, base_lr=1.0)
    assert linear(50) == pytest.approx(0.5) and linear(100) == 0.0
    assert SCHEDULES.resolve("constant")(total_steps=5, warmup_steps=0, base_lr=1.0)(3) == 1.0


def test_registries_resolve_builtins_imports_and_refuse_the_rest() -> None:
    assert callable(LOSSES.resolve("mse")())
    assert (
        CALLBACKS.resolve("tests.unit.trainer.fault_injection:NaNGradients").__name__
        == "NaNGradients"
    )
    with pytest.raises(InvalidArgumentError, match="built-in: cross_entropy, mse") as caught:
        LOSSES.resolve("hinge")
    assert caught.value.field == "loss.name"
    registry: Registry[int] = Registry("thing", "things", {"one": 1})
    registry.register("two", 2)
    assert registry.resolve("two") == 2
    with pytest.raises(InvalidArgumentError, match="registered already"):
        registry.register("one", 3)


def test_early_stopping_requests_a_stop_and_keeps_its_state() -> None:
    ctx = CallbackContext(model=None, optimizer=None)  # type: ignore[arg-type]
    stopper = EarlyStopping(patience=2, min_delta=0.01)
    for value in (1.0, 0.5, 0.499, 0.498):
        stopper.on_eval(ctx, {"val_loss": value})
    assert ctx.stop_reason is not None and "early stopping" in ctx.stop_reason
    again = EarlyStopping()
    again.load_state_dict(stopper.state_dict())
    assert again.best == 0.5 and again.rounds == 2
    assert math.isinf(EarlyStopping().best)
