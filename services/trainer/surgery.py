"""Checked changes to a live model: insert or remove a slot, graft or cull a seed.

Each operation runs the model on a probe batch (eval mode, no grad) before and
after the change and compares what must not change, bit for bit:

- `insert_slot`, `remove_slot`: the model's output (a dormant slot is identity);
- `graft`: the output with the new seed at full strength (kernels output zero
  when grafted);
- `cull`: the output after the removal against the output with the seed ablated.

When the check fails the change is undone (model and optimizer as before) and
`SurgeryError` is raised. `graft` and `cull` keep the optimizer in step: a
seed's parameters form one param group named `seed:<slot_id>`, added on graft
and removed (with its state) on cull. Slot paths see through slots: a path
inside a wrapped module keeps working after its parent got a slot.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import nn

from common.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from services.trainer.lifecycle import SeedState
from services.trainer.seeds import SeedSlot, SlotShape, _Mode

__all__ = [
    "HOST_GROUP",
    "SurgeryError",
    "add_seed_group",
    "cull",
    "find_slots",
    "graft",
    "insert_slot",
    "remove_seed_group",
    "remove_slot",
    "resolve_module",
    "seed_group_name",
]

HOST_GROUP = "host"
"""Name of the optimizer param group of the host's own parameters."""


class SurgeryError(FailedPreconditionError):
    """A model change failed its check and was undone."""


def seed_group_name(slot_id: str) -> str:
    """The optimizer param group name of the seed in `slot_id`."""
    return f"seed:{slot_id}"


def find_slots(model: nn.Module) -> dict[str, SeedSlot]:
    """Every slot of `model` by slot id, in module order."""
    return {m.slot_id: m for m in model.modules() if isinstance(m, SeedSlot)}


def resolve_module(model: nn.Module, path: str) -> tuple[nn.Module, str, nn.Module]:
    """`(parent, name, module)` of the module at dotted `path`, seeing through slots."""
    parent: nn.Module | None = None
    name = ""
    current = model
    for part in path.split("."):
        children = current._modules
        if part not in children and isinstance(current, SeedSlot):
            current = current.host
            children = current._modules
        child = children.get(part)
        if child is None:
            raise NotFoundError(
                f"model has no module {path!r} (no {part!r} under {name or 'root'})"
            )
        parent, name, current = current, part, child
    if parent is None:
        raise InvalidArgumentError("a slot cannot wrap the whole model", field="slots.module_path")
    return parent, name, current


@torch.no_grad()
def _run(model: nn.Module, probe: torch.Tensor) -> Any:
    was_training = model.training
    model.eval()
    try:
        return model(probe)
    finally:
        model.train(was_training)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, tuple | list) and isinstance(b, tuple | list) and len(a) == len(b):
        return all(_same(x, y) for x, y in zip(a, b, strict=True))
    return False


def _infer_shape(
    module: nn.Module, out: torch.Tensor, kind: Literal["linear", "conv2d"] | None, path: str
) -> SlotShape:
    dims = tuple(out.shape[1:])
    conv1d = any(isinstance(m, nn.Conv1d) for m in module.modules())
    if kind is None:
        kind = "conv2d" if len(dims) == 3 or (len(dims) == 2 and conv1d) else "linear"
    if kind == "linear" and len(dims) >= 1:
        return SlotShape("linear", (dims[-1],))
    if kind == "conv2d" and len(dims) == 3:
        return SlotShape("conv2d", (dims[0], dims[1], dims[2]))
    if kind == "conv2d" and len(dims) == 2:
        return SlotShape("conv2d", (dims[0], 1, dims[1]))
    raise InvalidArgumentError(
        f"module {path!r} outputs {tuple(out.shape)}; a {kind} slot needs "
        + ("(B, ..., F)" if kind == "linear" else "(B, C, H, W) or (B, C, L)"),
        field="slots.kind",
    )


def insert_slot(
    model: nn.Module,
    path: str,
    probe: torch.Tensor,
    *,
    kind: Literal["linear", "conv2d"] | None = None,
) -> SeedSlot:
    """Wrap the module at `path` in a dormant `SeedSlot` (id `path`); checked, undone on failure."""
    parent, name, module = resolve_module(model, path)
    if isinstance(module, SeedSlot):
        raise FailedPreconditionError(f"module {path!r} already has a slot")
    captured: list[torch.Tensor] = []

    def capture(_m: nn.Module, _i: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            captured.append(out)

    handle = module.register_forward_hook(capture)
    try:
        reference = _run(model, probe)
    finally:
        handle.remove()
    if not captured:
        raise InvalidArgumentError(
            f"module {path!r} did not run on the probe batch or does not return a tensor; "
            "choose a module on the forward path that returns one tensor",
            field="slots.module_path",
        )
    slot = SeedSlot(module, path, _infer_shape(module, captured[0], kind, path))
    slot.train(module.training)
    parent._modules[name] = slot
    if not _same(_run(model, probe), reference):
        parent._modules[name] = module
        raise SurgeryError(
            f"inserting a slot at {path!r} changed the model's output on the probe batch; "
            "undone (is the model's forward deterministic in eval mode?)"
        )
    return slot


def remove_slot(model: nn.Module, slot_id: str, probe: torch.Tensor) -> nn.Module:
    """Unwrap a slot that holds no seed (DORMANT, CULLED or EMBARGOED); returns the host module."""
    parent, name, slot = resolve_module(model, slot_id)
    if not isinstance(slot, SeedSlot):
        raise NotFoundError(f"no slot at {slot_id!r}")
    if slot.kernel is not None:
        raise FailedPreconditionError(
            f"slot {slot_id!r} holds a seed ({slot.state.value}); cull it before removing the slot"
        )
    reference = _run(model, probe)
    parent._modules[name] = slot.host
    if not _same(_run(model, probe), reference):
        parent._modules[name] = slot
        raise SurgeryError(f"removing slot {slot_id!r} changed the model's output; undone")
    return slot.host


@contextlib.contextmanager
def _forced(slot: SeedSlot, mode: _Mode) -> Iterator[None]:
    previous = slot._mode
    slot._mode = mode
    try:
        yield
    finally:
        slot._mode = previous


@contextlib.contextmanager
def _buffers_kept(module: nn.Module) -> Iterator[None]:
    # A kernel compiled in training mode updates its batch-norm statistics even in eval.
    saved = [(b, b.clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def graft(
    model: nn.Module,
    slot_id: str,
    kernel: nn.Module,
    probe: torch.Tensor,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    eval_kernel: nn.Module | None = None,
    blueprint: str = "",
    kernel_id: str = "",
    kernel_sha256: str = "",
    eval_kernel_sha256: str = "",
    decision_id: str = "",
    step: int = 0,
) -> SeedSlot:
    """Germinate `kernel` in slot `slot_id` and add its param group; checked, undone on failure.

    The check runs the probe with the new seed at full strength: a kernel that
    does not output exactly zero would change the model, and is refused.
    """
    slot = _slot(model, slot_id)
    saved = copy.deepcopy(slot.record)
    reference = _run(model, probe)
    slot.germinate(
        kernel,
        eval_kernel=eval_kernel,
        blueprint=blueprint,
        kernel_id=kernel_id,
        kernel_sha256=kernel_sha256,
        eval_kernel_sha256=eval_kernel_sha256,
        decision_id=decision_id,
        step=step,
    )
    with _forced(slot, _Mode.FULL), _buffers_kept(kernel):
        unchanged = _same(_run(model, probe), reference)
    if not unchanged:
        slot.restore(saved, None, None)
        raise SurgeryError(
            f"the kernel grafted into {slot_id!r} does not output zero on the probe batch "
            "(it would change the model); undone"
        )
    if optimizer is not None:
        add_seed_group(optimizer, slot_id, slot.seed_parameters())
    return slot


def cull(
    model: nn.Module,
    slot_id: str,
    probe: torch.Tensor,
    *,
    optimizer: torch.optim.Optimizer | None = None,
) -> nn.Module | None:
    """Remove the seed of `slot_id` (-> CULLED) and its param group; checked, undone on failure.

    Returns the removed kernel.
    """
    slot = _slot(model, slot_id)
    if slot.state not in (
        SeedState.GERMINATED,
        SeedState.TRAINING,
        SeedState.BLENDING,
        SeedState.HOLDING,
    ):
        slot.cull()  # raises the lifecycle error
    saved = copy.deepcopy(slot.record)
    kernel, eval_kernel = slot.kernel, slot._eval_kernel
    with slot.ablated():
        reference = _run(model, probe)
    slot.cull()
    removed = remove_seed_group(optimizer, slot_id) if optimizer is not None else None
    if not _same(_run(model, probe), reference):
        slot.restore(saved, kernel, eval_kernel)
        if optimizer is not None and removed is not None:
            _restore_group(optimizer, *removed)
        raise SurgeryError(
            f"culling the seed of {slot_id!r} did not give the ablated model; undone"
        )
    return kernel


def _slot(model: nn.Module, slot_id: str) -> SeedSlot:
    _, _, module = resolve_module(model, slot_id)
    if not isinstance(module, SeedSlot):
        raise NotFoundError(f"no slot at {slot_id!r}; insert one first")
    return module


def add_seed_group(
    optimizer: torch.optim.Optimizer, slot_id: str, params: list[nn.Parameter]
) -> dict[str, Any]:
    """Add the param group `seed:<slot_id>` with the host group's hyperparameters."""
    name = seed_group_name(slot_id)
    if any(g.get("name") == name for g in optimizer.param_groups):
        raise FailedPreconditionError(f"optimizer already has a param group {name!r}")
    host = optimizer.param_groups[0]
    group = {k: copy.deepcopy(v) for k, v in host.items() if k not in ("params", "name")}
    group.update(params=list(params), name=name)
    optimizer.add_param_group(group)
    added: dict[str, Any] = optimizer.param_groups[-1]
    return added


def remove_seed_group(
    optimizer: torch.optim.Optimizer, slot_id: str
) -> tuple[int, dict[str, Any], dict[torch.Tensor, Any]] | None:
    """Remove the group `seed:<slot_id>` and its state; returns what to put back on undo."""
    name = seed_group_name(slot_id)
    for index, group in enumerate(optimizer.param_groups):
        if group.get("name") == name:
            optimizer.param_groups.pop(index)
            state = {p: optimizer.state.pop(p) for p in group["params"] if p in optimizer.state}
            return index, group, state
    return None


def _restore_group(
    optimizer: torch.optim.Optimizer,
    index: int,
    group: dict[str, Any],
    state: dict[torch.Tensor, Any],
) -> None:
    optimizer.param_groups.insert(index, group)
    optimizer.state.update(state)
