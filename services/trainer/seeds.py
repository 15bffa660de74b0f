"""`SeedSlot`: the module that wraps a host site and can grow a seed there.

A slot wraps the module at its path (`blocks.0.fc`; the path is the slot's id)
and passes that module's output `y` through its seed according to the
lifecycle state (`lifecycle.py`):

- DORMANT, GERMINATED, CULLED, EMBARGOED: `y` itself (one attribute test; no
  autograd node, no allocation).
- TRAINING: `y + (s - s.detach())` with `s = kernel(y.detach())`: the value is
  `y` bit for bit and the host's gradients are exactly those without a seed,
  while the seed's parameters get the gradient the loss would give them if it
  were added at full strength.
- BLENDING: `lerp(y, y + kernel(y), alpha) = y + alpha * kernel(y)`; alpha is
  set by the growth controller from the blend schedule.
- HOLDING, FOSSILIZED: `y + kernel(y)`.

`ablated()` makes a slot pass `y` through whatever its state, which is how the
contribution of a seed in HOLDING is measured. Kernels map `(B, *shape)` to
`(B, *shape)`: a linear slot on a `(B, T, F)` output runs its kernel over
`(B*T, F)`, a conv2d slot on a `(B, C, L)` output (Conv1d hosts) over
`(B, C, 1, L)`.

A kernel whose graph was compiled in training mode keeps using batch
statistics in `eval()`; give the slot an `eval_kernel` (the same blueprint
compiled in eval mode) and it is tied to the kernel's parameters and buffers
and used whenever the slot is in eval mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal

import torch
from torch import nn

from common.errors import InvalidArgumentError
from services.trainer.lifecycle import SeedState, check_transition

__all__ = ["SeedSlot", "SlotRecord", "SlotShape", "tie_parameters"]


@dataclass(frozen=True)
class SlotShape:
    """What a slot's kernels map: `(B, features)` (linear) or `(B, C, H, W)` (conv2d)."""

    kind: Literal["linear", "conv2d"]
    dims: tuple[int, ...]

    def __post_init__(self) -> None:
        expected = 1 if self.kind == "linear" else 3
        if len(self.dims) != expected or any(d <= 0 for d in self.dims):
            raise InvalidArgumentError(
                f"a {self.kind} slot has {expected} positive dims, got {list(self.dims)}",
                field="slots.kind",
            )

    def to_json(self) -> dict[str, Any]:
        """The compiler's slot form: `{"kind": "linear", "features": F}` or conv2d dims."""
        if self.kind == "linear":
            return {"kind": "linear", "features": self.dims[0]}
        c, h, w = self.dims
        return {"kind": "conv2d", "channels": c, "height": h, "width": w}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SlotShape:
        """The inverse of `to_json`."""
        if data.get("kind") == "linear":
            return cls("linear", (int(data["features"]),))
        return cls("conv2d", (int(data["channels"]), int(data["height"]), int(data["width"])))


@dataclass
class SlotRecord:
    """Everything about a slot besides its tensors: lifecycle, seed identity, counters.

    Plain data (JSON round trip with `to_json`/`from_json`); checkpoints and the
    manifest store it.
    """

    slot_id: str
    shape: SlotShape
    state: SeedState = SeedState.DORMANT
    alpha: float = 0.0
    steps_in_state: int = 0
    blueprint: str = ""
    kernel_id: str = ""
    kernel_sha256: str = ""
    eval_kernel_sha256: str = ""
    added_params: int = 0
    decision_id: str = ""
    germinated_at_step: int = -1
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "slot_id": self.slot_id,
            "shape": self.shape.to_json(),
            "state": self.state.value,
            "alpha": self.alpha,
            "steps_in_state": self.steps_in_state,
            "blueprint": self.blueprint,
            "kernel_id": self.kernel_id,
            "kernel_sha256": self.kernel_sha256,
            "eval_kernel_sha256": self.eval_kernel_sha256,
            "added_params": self.added_params,
            "decision_id": self.decision_id,
            "germinated_at_step": self.germinated_at_step,
            "history": list(self.history),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SlotRecord:
        return cls(
            slot_id=str(data["slot_id"]),
            shape=SlotShape.from_json(data["shape"]),
            state=SeedState(data["state"]),
            alpha=float(data["alpha"]),
            steps_in_state=int(data["steps_in_state"]),
            blueprint=str(data["blueprint"]),
            kernel_id=str(data["kernel_id"]),
            kernel_sha256=str(data["kernel_sha256"]),
            eval_kernel_sha256=str(data["eval_kernel_sha256"]),
            added_params=int(data["added_params"]),
            decision_id=str(data["decision_id"]),
            germinated_at_step=int(data["germinated_at_step"]),
            history=list(data["history"]),
        )


class _Mode(Enum):
    IDENTITY = 0
    SHADOW = 1
    BLEND = 2
    FULL = 3


_MODE_OF: dict[SeedState, _Mode] = {
    SeedState.DORMANT: _Mode.IDENTITY,
    SeedState.GERMINATED: _Mode.IDENTITY,
    SeedState.TRAINING: _Mode.SHADOW,
    SeedState.BLENDING: _Mode.BLEND,
    SeedState.HOLDING: _Mode.FULL,
    SeedState.FOSSILIZED: _Mode.FULL,
    SeedState.CULLED: _Mode.IDENTITY,
    SeedState.EMBARGOED: _Mode.IDENTITY,
}


class SeedSlot(nn.Module):
    """A host site that can grow a seed; see the module doc for what each state computes.

    `host` is the wrapped module (its parameters keep training as before);
    `kernel` is the grafted seed, None until germination and after a cull.
    Change the state only through `germinate`, `transition`, `set_alpha` and
    `cull`: they enforce the lifecycle table.
    """

    def __init__(self, host: nn.Module, slot_id: str, shape: SlotShape) -> None:
        super().__init__()
        self.host = host
        self.kernel: nn.Module | None = None
        self.record = SlotRecord(slot_id=slot_id, shape=shape)
        self._mode = _Mode.IDENTITY
        self._ablated = False
        # Not a registered submodule: its parameters are the kernel's (tied), and
        # registering it would list every tensor twice in the state dict.
        self._eval_kernel: nn.Module | None
        object.__setattr__(self, "_eval_kernel", None)

    # -- reading ---------------------------------------------------------------------------

    @property
    def slot_id(self) -> str:
        return self.record.slot_id

    @property
    def shape(self) -> SlotShape:
        return self.record.shape

    @property
    def state(self) -> SeedState:
        return self.record.state

    @property
    def alpha(self) -> float:
        return self.record.alpha

    def seed_parameters(self) -> list[nn.Parameter]:
        """The grafted kernel's parameters (empty when there is none)."""
        return [] if self.kernel is None else list(self.kernel.parameters())

    # -- lifecycle -------------------------------------------------------------------------

    def germinate(
        self,
        kernel: nn.Module,
        *,
        eval_kernel: nn.Module | None = None,
        blueprint: str = "",
        kernel_id: str = "",
        kernel_sha256: str = "",
        eval_kernel_sha256: str = "",
        decision_id: str = "",
        step: int = 0,
    ) -> None:
        """Graft `kernel` (DORMANT -> GERMINATED); the output stays the host's."""
        check_transition(self.record.state, SeedState.GERMINATED, self.slot_id)
        if eval_kernel is not None:
            tie_parameters(eval_kernel, kernel)
            eval_kernel.eval()
        self.kernel = kernel
        kernel.train(self.training)
        object.__setattr__(self, "_eval_kernel", eval_kernel)
        record = self.record
        record.blueprint = blueprint
        record.kernel_id = kernel_id
        record.kernel_sha256 = kernel_sha256
        record.eval_kernel_sha256 = eval_kernel_sha256 if eval_kernel is not None else ""
        record.added_params = sum(p.numel() for p in kernel.parameters())
        record.decision_id = decision_id
        record.germinated_at_step = step
        self._enter(SeedState.GERMINATED, 0.0)

    def transition(self, target: SeedState) -> None:
        """Move to `target` (any state but GERMINATED and CULLED, which have their own calls)."""
        if target in (SeedState.GERMINATED, SeedState.CULLED):
            raise InvalidArgumentError(
                f"use {'germinate' if target is SeedState.GERMINATED else 'cull'}() "
                f"to move slot {self.slot_id!r} to {target.value}"
            )
        check_transition(self.record.state, target, self.slot_id)
        alpha = {
            SeedState.TRAINING: 0.0,
            SeedState.BLENDING: 0.0,
            SeedState.HOLDING: 1.0,
            SeedState.FOSSILIZED: 1.0,
        }.get(target, 0.0)
        if target is SeedState.DORMANT:
            self._clear_seed()
        self._enter(target, alpha)

    def cull(self) -> nn.Module | None:
        """Remove the seed (-> CULLED); returns the removed kernel."""
        check_transition(self.record.state, SeedState.CULLED, self.slot_id)
        kernel = self.kernel
        self.kernel = None
        object.__setattr__(self, "_eval_kernel", None)
        self._enter(SeedState.CULLED, 0.0)
        return kernel

    def set_alpha(self, alpha: float) -> None:
        """Set the blend factor; only meaningful (and only allowed) while BLENDING."""
        if self.record.state is not SeedState.BLENDING:
            raise InvalidArgumentError(
                f"slot {self.slot_id!r} is {self.record.state.value}; alpha is set while blending"
            )
        self.record.alpha = min(1.0, max(0.0, float(alpha)))

    def tick(self) -> None:
        """Count one training step in the current state."""
        self.record.steps_in_state += 1

    def restore(
        self, record: SlotRecord, kernel: nn.Module | None, eval_kernel: nn.Module | None
    ) -> None:
        """Put back a checkpointed slot as it was (no transition checks: it was checked then)."""
        if record.slot_id != self.slot_id:
            raise InvalidArgumentError(f"record of {record.slot_id!r} given to {self.slot_id!r}")
        if eval_kernel is not None and kernel is not None:
            tie_parameters(eval_kernel, kernel)
            eval_kernel.eval()
        self.kernel = kernel
        if kernel is not None:
            kernel.train(self.training)
        object.__setattr__(self, "_eval_kernel", eval_kernel)
        self.record = record
        self._mode = _MODE_OF[record.state]

    @contextlib.contextmanager
    def ablated(self) -> Iterator[None]:
        """Within the block the slot passes the host output through, whatever its state."""
        previous, self._ablated = self._ablated, True
        try:
            yield
        finally:
            self._ablated = previous

    def _enter(self, state: SeedState, alpha: float) -> None:
        record = self.record
        record.history.append({"from": record.state.value, "to": state.value})
        record.state = state
        record.alpha = alpha
        record.steps_in_state = 0
        self._mode = _MODE_OF[state]

    def _clear_seed(self) -> None:
        record = self.record
        self.kernel = None
        object.__setattr__(self, "_eval_kernel", None)
        record.blueprint = record.kernel_id = record.kernel_sha256 = ""
        record.eval_kernel_sha256 = record.decision_id = ""
        record.added_params = 0
        record.germinated_at_step = -1

    # -- computing -------------------------------------------------------------------------

    def train(self, mode: bool = True) -> SeedSlot:
        super().train(mode)
        if self._eval_kernel is not None:
            self._eval_kernel.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.host(x)
        mode = self._mode
        if mode is _Mode.IDENTITY or self._ablated:
            return y
        kernel = self.kernel
        assert kernel is not None  # every non-identity mode holds a kernel
        if mode is _Mode.SHADOW:
            if not torch.is_grad_enabled():
                return y
            s = self._run_kernel(kernel, y.detach())
            return y + (s - s.detach())
        if not self.training and self._eval_kernel is not None:
            kernel = self._eval_kernel
        if mode is _Mode.BLEND:
            return y + self.record.alpha * self._run_kernel(kernel, y)
        return y + self._run_kernel(kernel, y)

    def _run_kernel(self, kernel: nn.Module, y: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor
        if y.dim() == (2 if self.record.shape.kind == "linear" else 4):
            out = kernel(y)
        elif self.record.shape.kind == "linear":
            out = kernel(y.reshape(-1, y.shape[-1])).reshape(y.shape)  # (B*T, F) and back
        else:
            out = kernel(y.unsqueeze(2)).squeeze(2)  # (B, C, 1, L) and back
        return out

    def extra_repr(self) -> str:
        r = self.record
        return (
            f"slot_id={r.slot_id!r}, kind={r.shape.kind}, state={r.state.value}, alpha={r.alpha:g}"
        )


def tie_parameters(target: nn.Module, source: nn.Module) -> None:
    """Make `target` use `source`'s parameters and buffers (same names and shapes required)."""
    for kind in ("_parameters", "_buffers"):
        named = source.named_parameters() if kind == "_parameters" else source.named_buffers()
        for name, tensor in named:
            prefix, _, leaf = name.rpartition(".")
            try:
                owner = target.get_submodule(prefix) if prefix else target
            except AttributeError as exc:
                raise InvalidArgumentError(
                    f"eval kernel has no module {prefix!r}; it must be the same blueprint"
                ) from exc
            current = getattr(owner, kind).get(leaf)
            if current is None or current.shape != tensor.shape:
                raise InvalidArgumentError(
                    f"eval kernel tensor {name!r} does not match the kernel's; "
                    "it must be the same blueprint compiled for the same slot"
                )
            getattr(owner, kind)[leaf] = tensor
