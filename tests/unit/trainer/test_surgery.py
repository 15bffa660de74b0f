"""Surgery: checked model changes, undone when the check fails, optimizer kept in step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from common.errors import FailedPreconditionError, NotFoundError
from common.kernels import load_kernel
from services.compiler import BlueprintCompiler
from services.trainer.lifecycle import SeedState
from services.trainer.models import DataShape, build_model
from services.trainer.seeds import SeedSlot, SlotShape
from services.trainer.spec import ModelSpec
from services.trainer.surgery import (
    SurgeryError,
    cull,
    find_slots,
    graft,
    insert_slot,
    remove_slot,
    seed_group_name,
)
from tests.unit.trainer.inprocess import compile_kernel_sync

TEMPLATES = {
    "mlp": (
        ModelSpec(template="mlp", params={"hidden": [32, 32]}),
        DataShape((8,), 4),
        "blocks.1.fc",
    ),
    "cnn": (ModelSpec(template="cnn"), DataShape((1, 8, 8), 10), "blocks.0.conv"),
    "resnet": (
        ModelSpec(template="resnet", params={"width": 8}),
        DataShape((1, 8, 8), 10),
        "stages.1.0",
    ),
    "transformer": (ModelSpec(template="transformer"), DataShape((16,), 3), "blocks.1.mlp.fc2"),
}


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([{"params": list(model.parameters()), "name": "host"}], lr=1e-3)


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_insert_and_remove_leave_every_template_output_unchanged(template: str) -> None:
    spec, shape, path = TEMPLATES[template]
    torch.manual_seed(0)
    model = build_model(spec, shape).eval()
    probe = torch.randn(4, *shape.input_shape)
    with torch.no_grad():
        before = model(probe)
    slot = insert_slot(model, path, probe)
    assert isinstance(slot, SeedSlot) and find_slots(model) == {path: slot}
    with torch.no_grad():
        assert torch.equal(model(probe), before)
    remove_slot(model, path, probe)
    assert find_slots(model) == {}
    with torch.no_grad():
        assert torch.equal(model(probe), before)


def test_graft_adds_a_param_group_and_cull_removes_it_with_its_state(
    compiler: BlueprintCompiler,
) -> None:
    torch.manual_seed(0)
    model = build_model(ModelSpec(template="mlp", params={"hidden": [32, 32]}), DataShape((8,), 4))
    probe = torch.randn(8, 8)
    insert_slot(model, "blocks.0.fc", probe)
    optimizer = _optimizer(model)
    artifact = compile_kernel_sync(compiler, "bottleneck_mlp", SlotShape("linear", (32,)))
    slot = graft(
        model,
        "blocks.0.fc",
        load_kernel(artifact.data, artifact.sha256),
        probe,
        optimizer=optimizer,
    )
    names = [g.get("name") for g in optimizer.param_groups]
    assert names == ["host", seed_group_name("blocks.0.fc")]
    assert optimizer.param_groups[1]["params"] == slot.seed_parameters()
    slot.transition(SeedState.TRAINING)
    torch.autograd.backward(
        nn.functional.cross_entropy(model(torch.randn(16, 8)), torch.randint(0, 4, (16,)))
    )
    optimizer.step()
    seed_params = slot.seed_parameters()
    assert all(p in optimizer.state for p in seed_params)

    cull(model, "blocks.0.fc", probe, optimizer=optimizer)
    assert [g.get("name") for g in optimizer.param_groups] == ["host"]
    assert not any(p in optimizer.state for p in seed_params)
    assert slot.state is SeedState.CULLED and slot.kernel is None


def test_graft_of_a_kernel_that_does_not_output_zero_is_undone(compiler: BlueprintCompiler) -> None:
    torch.manual_seed(0)
    model = build_model(ModelSpec(template="mlp", params={"hidden": [32, 32]}), DataShape((8,), 4))
    probe = torch.randn(8, 8)
    slot = insert_slot(model, "blocks.0.fc", probe)
    optimizer = _optimizer(model)
    artifact = compile_kernel_sync(compiler, "residual_mlp", SlotShape("linear", (32,)))
    kernel = load_kernel(artifact.data, artifact.sha256)
    with torch.no_grad():
        for p in kernel.parameters():
            p.add_(0.5)  # no longer zero at graft time: it would change the host
    with pytest.raises(SurgeryError, match="does not output zero"):
        graft(model, "blocks.0.fc", kernel, probe, optimizer=optimizer)
    assert slot.state is SeedState.DORMANT and slot.kernel is None
    assert slot.record.kernel_sha256 == "" and slot.record.added_params == 0
    assert [g.get("name") for g in optimizer.param_groups] == ["host"]
    assert len(optimizer.param_groups[0]["params"]) == len(list(model.parameters()))


class _Noisy(nn.Module):
    """A host whose eval-mode output is not reproducible (it adds fresh noise)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.out(self.fc(x) + torch.randn(x.shape[0], 4))
        return out


def test_insert_into_a_host_whose_output_is_not_reproducible_is_undone() -> None:
    model = _Noisy()
    original = model.fc
    with pytest.raises(SurgeryError, match="undone"):
        insert_slot(model, "fc", torch.randn(4, 4))
    assert model.fc is original
    assert find_slots(model) == {}


def test_surgery_refuses_what_it_cannot_do(compiler: BlueprintCompiler) -> None:
    torch.manual_seed(0)
    model = build_model(ModelSpec(template="mlp", params={"hidden": [32]}), DataShape((8,), 4))
    probe = torch.randn(8, 8)
    with pytest.raises(NotFoundError, match="no module"):
        insert_slot(model, "blocks.3.fc", probe)
    insert_slot(model, "blocks.0.fc", probe)
    with pytest.raises(FailedPreconditionError, match="already has a slot"):
        insert_slot(model, "blocks.0.fc", probe)
    artifact = compile_kernel_sync(compiler, "low_rank_adapter", SlotShape("linear", (32,)))
    graft(model, "blocks.0.fc", load_kernel(artifact.data, artifact.sha256), probe)
    with pytest.raises(FailedPreconditionError, match="cull it before removing"):
        remove_slot(model, "blocks.0.fc", probe)


def test_paths_see_through_an_outer_slot() -> None:
    torch.manual_seed(0)
    model = build_model(ModelSpec(template="mlp", params={"hidden": [32, 32]}), DataShape((8,), 4))
    probe = torch.randn(8, 8)
    insert_slot(model, "blocks.0", probe)
    inner = insert_slot(model, "blocks.0.fc", probe)
    assert set(find_slots(model)) == {"blocks.0", "blocks.0.fc"}
    assert inner.shape == SlotShape("linear", (32,))
