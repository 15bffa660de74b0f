"""Guards of the training loop: non-finite gradients, loss spikes, and when to give up.

- `GradientGuard` skips a step whose loss or gradient norm is not finite and
  counts it; `max_consecutive` bad steps in a row abort the run.
- `SpikeDetector` flags a loss whose robust z-score, `(loss - median) /
  (1.4826 * MAD)` over the last `window` accepted losses, exceeds `threshold`.
  Median and MAD ignore the outliers a mean and standard deviation would
  chase, and spikes themselves never enter the window.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterable
from typing import Any

import grpc
import torch

from common.errors import GraftmeshError

__all__ = ["GradientGuard", "SpikeDetector", "TrainingAborted", "grad_norm"]

# The MAD of a normal distribution is 0.6745 sigma; this scales it to sigma.
_MAD_TO_SIGMA = 1.4826


class TrainingAborted(GraftmeshError):
    """Training stopped because it went bad; the message says how and what to change."""

    code = grpc.StatusCode.ABORTED


def grad_norm(parameters: Iterable[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of the gradients (inf or nan when one is not finite)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads, 2.0, error_if_nonfinite=False)


class GradientGuard:
    """Counts skipped (non-finite) steps and aborts after too many in a row."""

    def __init__(self, max_consecutive: int) -> None:
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.skipped = 0

    def record(self, finite: bool, step: int, what: str) -> None:
        """Count the outcome of a step; raises `TrainingAborted` past the limit."""
        if finite:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.skipped += 1
        if self.consecutive >= self.max_consecutive:
            raise TrainingAborted(
                f"{self.consecutive} consecutive steps with non-finite {what} (last at step "
                f"{step}); lower optimizer.lr, set safety.grad_clip_norm, or check the data "
                "for NaN/Inf"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"consecutive": self.consecutive, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.consecutive = int(state["consecutive"])
        self.skipped = int(state["skipped"])


class SpikeDetector:
    """Robust z-score of each loss against the last `window` accepted ones."""

    def __init__(self, threshold: float, window: int, *, min_history: int = 20) -> None:
        self.threshold = threshold
        self.window: deque[float] = deque(maxlen=window)
        self.min_history = min(min_history, window)

    @property
    def enabled(self) -> bool:
        return self.threshold > 0

    def score(self, loss: float) -> float:
        """The robust z-score of `loss` (0 until `min_history` losses are in)."""
        if len(self.window) < self.min_history:
            return 0.0
        values = list(self.window)
        median = statistics.median(values)
        mad = statistics.median(abs(v - median) for v in values)
        # A flat history has MAD 0; a floor relative to the level keeps tiny wiggles from counting.
        scale = max(_MAD_TO_SIGMA * mad, 1e-3 * abs(median), 1e-12)
        return (loss - median) / scale

    def observe(self, loss: float) -> float | None:
        """The z-score when `loss` is a spike (then it is not added), else None (added)."""
        if not math.isfinite(loss):
            return math.inf
        if self.enabled:
            z = self.score(loss)
            if z > self.threshold:
                return z
        self.window.append(loss)
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"window": list(self.window)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window.clear()
        self.window.extend(float(v) for v in state["window"])
