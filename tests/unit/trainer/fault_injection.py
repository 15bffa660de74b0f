"""Plugins that inject faults into a real training run, referenced by `module:name` in specs."""

from __future__ import annotations

import math
import os
import signal
from collections.abc import Sequence

import torch
from torch import nn

from services.trainer.plugins import Callback, CallbackContext


class NaNGradients(Callback):
    """Poisons the gradients of the first parameter at the given steps (every step if empty)."""

    def __init__(self, steps: Sequence[int] = ()) -> None:
        self.steps = set(steps)
        self.poisoned: list[int] = []

    def on_after_backward(self, ctx: CallbackContext) -> None:
        if self.steps and ctx.step not in self.steps:
            return
        first = next(p for p in ctx.model.parameters() if p.grad is not None)
        assert first.grad is not None
        first.grad.fill_(math.nan)
        self.poisoned.append(ctx.step)


class BlowUpWeights(Callback):
    """Once per process, at `step`, multiplies every weight by `factor` (a corrupted update).

    It keeps no checkpointed state, so a rollback does not make it fire again.
    """

    def __init__(self, step: int, factor: float = 30.0) -> None:
        self.step = step
        self.factor = factor
        self.fired_at: list[int] = []

    def on_step_start(self, ctx: CallbackContext) -> None:
        if ctx.step == self.step and not self.fired_at:
            with torch.no_grad():
                for p in ctx.model.parameters():
                    p.mul_(self.factor)
            self.fired_at.append(ctx.step)


class _MemoryHungry(nn.Module):
    """An MLP that runs out of (simulated) device memory on batches above `limit`."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.net = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"simulated: batch {x.shape[0]} > {self.limit}")
        out: torch.Tensor = self.net(x)
        return out


def memory_hungry(limit: int = 8) -> nn.Module:
    return _MemoryHungry(limit)


class KillProcessAt(Callback):
    """SIGKILLs its own process at the start of step `step`: a crash with no cleanup at all."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_start(self, ctx: CallbackContext) -> None:
        if ctx.step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
