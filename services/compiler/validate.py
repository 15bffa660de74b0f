"""Checks a compiled kernel must pass before it is stored, one report entry per check.

The kernel is loaded from its bytes exactly as a consumer loads it
(`load_kernel`) and compared with the eager module it was exported from:

- `loads`: checksum, pickle-free archive, `torch.export.load`
- `output_shape`: (B, *slot) for each validation batch size (1 and 7 by
  default: the batch dimension is dynamic)
- `zero_at_init`: the output is exactly zero before training (function-preserving growth)
- `gradient_at_init`: some parameter gets a non-zero gradient at init (else the seed never learns)
- `forward_matches_eager`, `backward_matches_eager`: with the same random
  (non-zero) weights in both, outputs, parameter gradients and input gradients
  agree within the dtype's tolerance, at each batch size
- `finite_outputs`: no NaN/Inf in outputs or gradients for random, large
  (x`extreme_magnitude`) and all-zero inputs
- `sgd_step_trains`: one SGD step on a regression target lowers the loss
- `latency_ratio`: kernel / eager time of forward+backward at `latency_batch`,
  median of `latency_runs`; recorded, and a failure only above `max_latency_ratio`
"""

from __future__ import annotations

import statistics
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from common.kernels import load_kernel

__all__ = ["CheckResult", "ValidationReport", "ValidationSettings", "validate_kernel"]

_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    # (rtol, atol relative to the reference's largest magnitude)
    torch.float32: (1e-4, 1e-5),
    torch.float64: (1e-9, 1e-12),
}


class CheckResult(BaseModel):
    """One check: its name, whether it passed, what it saw, and a figure when it has one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    passed: bool
    detail: str
    value: float | None = None


class ValidationReport(BaseModel):
    """Every check run on one kernel, in order."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    checks: tuple[CheckResult, ...]
    # Median microseconds per forward+backward of each at the latency check's batch;
    # None when that check did not measure them.
    kernel_latency_us: float | None = None
    eager_latency_us: float | None = None

    @property
    def passed(self) -> bool:
        """Whether every check passed."""
        return all(check.passed for check in self.checks)

    @property
    def failed(self) -> list[CheckResult]:
        """The checks that failed."""
        return [check for check in self.checks if not check.passed]

    def check(self, name: str) -> CheckResult:
        """The check called `name` (`KeyError` if it was not run)."""
        for check in self.checks:
            if check.name == name:
                return check
        raise KeyError(name)

    def summary(self) -> str:
        """One line per failed check (or "all N checks passed")."""
        if self.passed:
            return f"all {len(self.checks)} checks passed"
        return "; ".join(f"{c.name}: {c.detail}" for c in self.failed)


class ValidationSettings(BaseModel):
    """How hard `validate_kernel` looks."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch_sizes: tuple[Annotated[int, Field(gt=0)], ...] = (1, 7)
    extreme_magnitude: Annotated[float, Field(gt=0)] = 1e4
    latency_batch: Annotated[int, Field(gt=0)] = 64
    latency_runs: Annotated[int, Field(gt=0)] = 5
    latency_iters: Annotated[int, Field(gt=0)] = 2
    max_latency_ratio: Annotated[float, Field(gt=0)] = 10.0
    seed: int = 0


def validate_kernel(
    artifact: bytes,
    artifact_sha256: str,
    reference: Callable[[], nn.Module],
    shape: tuple[int, ...],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    min_batch: int = 1,
    settings: ValidationSettings | None = None,
) -> ValidationReport:
    """Run every check on the kernel `artifact` against fresh eager modules from `reference`.

    `reference()` must build the module the kernel was exported from, with the
    same initial weights and mode. `shape` is the slot's shape without the batch
    dimension; batch sizes below `min_batch` are raised to it (batch norm over
    features needs 2 in training). Never raises for a bad kernel: a check that
    throws is a failed check whose detail is the exception.
    """
    settings = settings or ValidationSettings()
    run = _Run(
        artifact,
        artifact_sha256,
        reference,
        shape,
        dtype=dtype,
        device=torch.device(device),
        min_batch=min_batch,
        settings=settings,
    )
    return run.report()


class _Run:
    def __init__(
        self,
        artifact: bytes,
        sha256: str,
        reference: Callable[[], nn.Module],
        shape: tuple[int, ...],
        *,
        dtype: torch.dtype,
        device: torch.device,
        min_batch: int,
        settings: ValidationSettings,
    ) -> None:
        self.artifact = artifact
        self.sha256 = sha256
        self.reference = reference
        self.shape = shape
        self.dtype = dtype
        self.device = device
        self.settings = settings
        self.batches = sorted({max(b, min_batch) for b in settings.batch_sizes})
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.rtol, self.atol = _TOLERANCES.get(dtype, (1e-2, 1e-3))
        self.loaded: nn.Module | None = None
        self.initial: dict[str, torch.Tensor] = {}
        self.latency_us: tuple[float, float] | None = None  # kernel, eager: the latency check's

    def report(self) -> ValidationReport:
        checks: list[CheckResult] = []
        loaded = self._run("loads", self._check_loads)
        checks.append(loaded)
        steps: list[tuple[str, Callable[[], CheckResult]]] = [
            ("output_shape", self._check_output_shape),
            ("zero_at_init", self._check_zero_at_init),
            ("gradient_at_init", self._check_gradient_at_init),
            ("forward_matches_eager", self._check_forward),
            ("backward_matches_eager", self._check_backward),
            ("finite_outputs", self._check_finite),
            ("sgd_step_trains", self._check_sgd_step),
            ("latency_ratio", self._check_latency),
        ]
        for name, step in steps:
            if loaded.passed:
                checks.append(self._run(name, step))
            else:
                checks.append(
                    CheckResult(name=name, passed=False, detail="not run: the kernel did not load")
                )
        kernel_us, eager_us = self.latency_us or (None, None)
        return ValidationReport(
            checks=tuple(checks), kernel_latency_us=kernel_us, eager_latency_us=eager_us
        )

    def _run(self, name: str, step: Callable[[], CheckResult]) -> CheckResult:
        try:
            return step()
        except Exception as exc:
            where = traceback.extract_tb(exc.__traceback__)[-1]
            return CheckResult(
                name=name,
                passed=False,
                detail=f"{type(exc).__name__}: {exc} (at {where.name}:{where.lineno})",
            )

    # --- helpers ------------------------------------------------------------------------------

    def _kernel(self) -> nn.Module:
        """The loaded kernel, back in its initial state (cheaper than loading it per check)."""
        if self.loaded is None:
            self.loaded = load_kernel(self.artifact, self.sha256, device=self.device)
            self.initial = {k: v.clone() for k, v in self.loaded.state_dict().items()}
        self.loaded.load_state_dict(self.initial)
        self.loaded.zero_grad(set_to_none=True)
        return self.loaded

    def _input(self, batch: int, scale: float = 1.0) -> torch.Tensor:
        x = torch.randn((batch, *self.shape), generator=self.generator, dtype=torch.float64) * scale
        return x.to(dtype=self.dtype, device=self.device)

    def _like(self, t: torch.Tensor) -> torch.Tensor:
        x = torch.randn(t.shape, generator=self.generator, dtype=torch.float64)
        return x.to(dtype=t.dtype, device=t.device)

    def _perturbed_pair(self) -> tuple[nn.Module, nn.Module]:
        """A kernel and its eager reference holding the same random non-zero weights."""
        kernel, eager = self._kernel(), self.reference()
        state = {}
        for name, value in eager.state_dict().items():
            state[name] = value
            if not value.is_floating_point() or "running_" in name:
                continue
            noise = self._like(value)
            if value.dim() >= 2:  # weights: the scale of the default init
                state[name] = noise / max(1.0, float(value[0].numel()) ** 0.5)
            elif name.endswith("weight"):  # norm scales
                state[name] = 1.0 + 0.1 * noise
            else:
                state[name] = 0.1 * noise
        eager.load_state_dict(state)
        kernel.load_state_dict(state)
        return kernel, eager

    def _close(self, got: torch.Tensor, want: torch.Tensor) -> float:
        """Largest error as a fraction of the tolerance (<= 1 is close)."""
        if got.shape != want.shape:
            return float("inf")
        got64, want64 = got.detach().double(), want.detach().double()
        scale = max(1.0, float(want64.abs().max()) if want64.numel() else 1.0)
        bound = self.atol * scale + self.rtol * want64.abs()
        return float(((got64 - want64).abs() / bound).max()) if want64.numel() else 0.0

    # --- checks -------------------------------------------------------------------------------

    def _check_loads(self) -> CheckResult:
        kernel = self._kernel()
        count = sum(p.numel() for p in kernel.parameters())
        frozen = [n for n, p in kernel.named_parameters() if not p.requires_grad]
        if frozen:
            return CheckResult(
                name="loads", passed=False, detail=f"parameters without requires_grad: {frozen}"
            )
        return CheckResult(
            name="loads", passed=True, detail=f"{count} trainable parameters", value=float(count)
        )

    def _check_output_shape(self) -> CheckResult:
        kernel = self._kernel()
        seen = []
        with torch.no_grad():
            for batch in self.batches:
                out = kernel(self._input(batch))
                seen.append(tuple(out.shape))
                if out.shape != (batch, *self.shape):
                    return CheckResult(
                        name="output_shape",
                        passed=False,
                        detail=f"batch {batch}: output {tuple(out.shape)}, "
                        f"expected {(batch, *self.shape)}",
                    )
        return CheckResult(name="output_shape", passed=True, detail=f"outputs {seen}")

    def _check_zero_at_init(self) -> CheckResult:
        kernel = self._kernel()
        with torch.no_grad():
            largest = float(kernel(self._input(max(self.batches))).abs().max())
        return CheckResult(
            name="zero_at_init",
            passed=largest == 0.0,
            detail="output is exactly zero" if largest == 0.0 else f"max |output| = {largest:.3g}",
            value=largest,
        )

    def _check_gradient_at_init(self) -> CheckResult:
        kernel = self._kernel()
        out = kernel(self._input(max(self.batches)))
        (out * self._like(out)).sum().backward()
        moving = sorted(
            n for n, p in kernel.named_parameters() if p.grad is not None and bool(p.grad.any())
        )
        return CheckResult(
            name="gradient_at_init",
            passed=bool(moving),
            detail=f"non-zero gradients: {', '.join(moving)}"
            if moving
            else "every gradient is zero",
            value=float(len(moving)),
        )

    def _check_forward(self) -> CheckResult:
        kernel, eager = self._perturbed_pair()
        worst = 0.0
        with torch.no_grad():
            for batch in self.batches:
                x = self._input(batch)
                worst = max(worst, self._close(kernel(x), eager(x)))
        return CheckResult(
            name="forward_matches_eager",
            passed=worst <= 1.0,
            detail=f"largest difference {worst:.3g}x the tolerance "
            f"(rtol {self.rtol}, atol {self.atol})",
            value=worst,
        )

    def _check_backward(self) -> CheckResult:
        kernel, eager = self._perturbed_pair()
        worst, where = 0.0, ""
        for batch in self.batches:
            x = self._input(batch)
            xk, xe = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
            out_k, out_e = kernel(xk), eager(xe)
            upstream = self._like(out_e)
            (out_k * upstream).sum().backward()
            (out_e * upstream).sum().backward()
            pairs = {"input": (xk.grad, xe.grad)}
            eager_params = dict(eager.named_parameters())
            for name, param in kernel.named_parameters():
                pairs[name] = (param.grad, eager_params[name].grad)
            for name, (got, want) in pairs.items():
                if got is None or want is None:
                    if got is not want:
                        return CheckResult(
                            name="backward_matches_eager",
                            passed=False,
                            detail=f"batch {batch}: {name} has a gradient in only one of them",
                        )
                    continue
                if not bool(torch.isfinite(got).all()):
                    return CheckResult(
                        name="backward_matches_eager",
                        passed=False,
                        detail=f"batch {batch}: gradient of {name} is not finite",
                    )
                error = self._close(got, want)
                if error > worst:
                    worst, where = error, f"{name} at batch {batch}"
            kernel.zero_grad(set_to_none=True)
            eager.zero_grad(set_to_none=True)
        return CheckResult(
            name="backward_matches_eager",
            passed=worst <= 1.0,
            detail=f"largest difference {worst:.3g}x the tolerance ({where or 'no gradients'})",
            value=worst,
        )

    def _check_finite(self) -> CheckResult:
        kernel, _ = self._perturbed_pair()
        batch = max(self.batches)
        magnitude = self.settings.extreme_magnitude
        cases = {
            "random": self._input(batch),
            f"random x{magnitude:g}": self._input(batch, magnitude),
            "zeros": torch.zeros((batch, *self.shape), dtype=self.dtype, device=self.device),
        }
        for label, case in cases.items():
            x = case.clone().requires_grad_(True)
            out = kernel(x)
            if not bool(torch.isfinite(out).all()):
                return CheckResult(
                    name="finite_outputs", passed=False, detail=f"{label} input: output not finite"
                )
            out.square().mean().backward()
            grads = [("input", x.grad)] + [(n, p.grad) for n, p in kernel.named_parameters()]
            for name, grad in grads:
                if grad is not None and not bool(torch.isfinite(grad).all()):
                    return CheckResult(
                        name="finite_outputs",
                        passed=False,
                        detail=f"{label} input: gradient of {name} not finite",
                    )
            kernel.zero_grad(set_to_none=True)
        return CheckResult(
            name="finite_outputs", passed=True, detail=f"finite for {', '.join(cases)} inputs"
        )

    def _check_sgd_step(self) -> CheckResult:
        kernel = self._kernel()
        batch = max(self.batches)
        x = self._input(batch)
        target = self._input(batch)
        optimiser = torch.optim.SGD(kernel.parameters(), lr=1e-2)
        before = kernel(x)
        loss = (before - target).square().mean()
        loss.backward()
        optimiser.step()
        old_loss = loss.item()
        with torch.no_grad():
            after = kernel(x)
            new_loss = (after - target).square().mean().item()
            moved = (after - before.detach()).abs().max().item()
        return CheckResult(
            name="sgd_step_trains",
            passed=moved > 0.0 and new_loss < old_loss,
            detail=f"loss {old_loss:.6g} -> {new_loss:.6g}, output moved by up to {moved:.3g}",
            value=old_loss - new_loss,
        )

    def _check_latency(self) -> CheckResult:
        kernel, eager = self._kernel(), self.reference()
        x = self._input(self.settings.latency_batch)
        runs, iters = self.settings.latency_runs, self.settings.latency_iters
        kernel_s, eager_s = _compare_latency(kernel, eager, x, runs, iters)
        ratio = kernel_s / eager_s
        limit = self.settings.max_latency_ratio
        if ratio > limit:
            # One noisy measurement (a busy machine) must not reject a kernel: look again, longer.
            again = _compare_latency(kernel, eager, x, 3 * runs, iters)
            if again[0] / again[1] < ratio:
                kernel_s, eager_s = again
                ratio = kernel_s / eager_s
        self.latency_us = (kernel_s * 1e6, eager_s * 1e6)
        return CheckResult(
            name="latency_ratio",
            passed=ratio <= limit,
            detail=(
                f"forward+backward at batch {self.settings.latency_batch}: kernel "
                f"{kernel_s * 1e6:.0f} us, eager {eager_s * 1e6:.0f} us "
                f"(x{ratio:.2f}, limit x{limit:g})"
            ),
            value=ratio,
        )


def _compare_latency(
    kernel: nn.Module, eager: nn.Module, x: torch.Tensor, runs: int, iters: int
) -> tuple[float, float]:
    """Median seconds per forward+backward of each module, runs interleaved to share the noise."""

    def step(module: nn.Module) -> None:
        module(x).sum().backward()

    for module in (kernel, eager):  # warm-up: allocator, autograd graph, lazy init
        step(module)
        step(module)
    timings: dict[int, list[float]] = {id(kernel): [], id(eager): []}
    for _ in range(runs):
        for module in (kernel, eager):
            with _synchronised(x.device):
                started = time.perf_counter()
                for _ in range(iters):
                    step(module)
            timings[id(module)].append((time.perf_counter() - started) / iters)
    return statistics.median(timings[id(kernel)]), statistics.median(timings[id(eager)])


@contextmanager
def _synchronised(device: torch.device) -> Iterator[None]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
