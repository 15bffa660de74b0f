"""SeedSlot: what each lifecycle state computes, with real compiled kernels."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from common.kernels import load_kernel
from services.compiler import BlueprintCompiler
from services.trainer.lifecycle import LifecycleError, SeedState
from services.trainer.models import DataShape, build_model
from services.trainer.seeds import SeedSlot, SlotShape
from services.trainer.spec import ModelSpec
from services.trainer.surgery import find_slots, graft, insert_slot
from tests.unit.trainer.inprocess import compile_kernel_sync

WIDTH = 16


def _host() -> tuple[nn.Module, SeedSlot, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(
        ModelSpec(template="mlp", params={"hidden": [WIDTH, WIDTH]}), DataShape((4,), 3)
    )
    probe = torch.randn(8, 4)
    slot = insert_slot(model, "blocks.0.fc", probe)
    return model, slot, probe


def _grafted(
    compiler: BlueprintCompiler, blueprint: str = "residual_mlp"
) -> tuple[nn.Module, SeedSlot, torch.Tensor]:
    model, slot, probe = _host()
    artifact = compile_kernel_sync(compiler, blueprint, SlotShape("linear", (WIDTH,)))
    graft(
        model,
        slot.slot_id,
        load_kernel(artifact.data, artifact.sha256),
        probe,
        kernel_sha256=artifact.sha256,
    )
    return model, slot, probe


def _perturb(kernel: nn.Module) -> None:
    # A trained seed: the zero-initialised output layer has moved away from zero.
    with torch.no_grad():
        for p in kernel.parameters():
            p.add_(torch.randn_like(p) * 0.3)


def test_dormant_slot_is_identity_and_adds_no_parameters() -> None:
    model, slot, probe = _host()
    plain = build_model(
        ModelSpec(template="mlp", params={"hidden": [WIDTH, WIDTH]}), DataShape((4,), 3)
    )
    plain.load_state_dict({k.replace(".host.", "."): v for k, v in model.state_dict().items()})
    assert slot.state is SeedState.DORMANT
    assert torch.equal(model(probe), plain(probe))
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in plain.parameters())


def test_training_keeps_host_output_and_gradients_bit_identical_while_the_seed_learns(
    compiler: BlueprintCompiler,
) -> None:
    model, slot, _ = _grafted(compiler)
    assert slot.kernel is not None
    _perturb(slot.kernel)
    slot.transition(SeedState.TRAINING)
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))

    out = model(x)
    torch.autograd.backward(nn.functional.cross_entropy(out, y))
    host_grads = {
        n: p.grad.clone()
        for n, p in model.named_parameters()
        if "kernel" not in n and p.grad is not None
    }
    seed_grads = [p.grad for p in slot.seed_parameters()]
    model.zero_grad(set_to_none=True)

    with slot.ablated():
        reference = model(x)
    torch.autograd.backward(nn.functional.cross_entropy(reference, y))

    assert torch.equal(out, reference)
    for name, p in model.named_parameters():
        if "kernel" not in name:
            assert p.grad is not None and torch.equal(host_grads[name], p.grad), name
    assert all(g is not None for g in seed_grads)
    assert sum(float(g.abs().sum()) for g in seed_grads if g is not None) > 0


def test_blending_outputs_lerp_of_host_and_host_plus_seed(compiler: BlueprintCompiler) -> None:
    _, slot, _ = _grafted(compiler)
    assert slot.kernel is not None
    _perturb(slot.kernel)
    slot.transition(SeedState.TRAINING)
    slot.transition(SeedState.BLENDING)
    slot.set_alpha(0.3)
    x = torch.randn(8, 4)
    with torch.no_grad():
        y = slot.host(x)
        expected = torch.lerp(y, y + slot.kernel(y), 0.3)
        blended = slot(x)
    assert torch.allclose(blended, expected, atol=1e-6)
    assert not torch.allclose(blended, y)


def test_holding_and_fossilized_add_the_full_seed(compiler: BlueprintCompiler) -> None:
    _, slot, _ = _grafted(compiler)
    assert slot.kernel is not None
    _perturb(slot.kernel)
    for state in (SeedState.TRAINING, SeedState.BLENDING, SeedState.HOLDING):
        slot.transition(state)
    x = torch.randn(8, 4)
    with torch.no_grad():
        y = slot.host(x)
        assert slot.alpha == 1.0
        assert torch.equal(slot(x), y + slot.kernel(y))
        slot.transition(SeedState.FOSSILIZED)
        assert torch.equal(slot(x), y + slot.kernel(y))
        with slot.ablated():
            assert torch.equal(slot(x), y)


def test_culled_slot_drops_its_kernel_and_passes_the_host_through(
    compiler: BlueprintCompiler,
) -> None:
    _, slot, _ = _grafted(compiler)
    slot.transition(SeedState.TRAINING)
    removed = slot.cull()
    assert removed is not None and slot.kernel is None
    assert slot.state is SeedState.CULLED
    x = torch.randn(8, 4)
    assert torch.equal(slot(x), slot.host(x))
    slot.transition(SeedState.EMBARGOED)
    slot.transition(SeedState.DORMANT)
    assert slot.record.kernel_sha256 == "" and slot.record.added_params == 0


def test_the_slot_refuses_transitions_outside_the_table(compiler: BlueprintCompiler) -> None:
    _, slot, _ = _grafted(compiler)
    with pytest.raises(LifecycleError):
        slot.transition(SeedState.HOLDING)  # GERMINATED -> HOLDING skips two states
    with pytest.raises(LifecycleError):
        slot.transition(SeedState.FOSSILIZED)
    slot.transition(SeedState.TRAINING)
    with pytest.raises(Exception, match="while blending"):
        slot.set_alpha(0.5)


def test_a_linear_slot_on_a_sequence_output_runs_its_kernel_per_token(
    compiler: BlueprintCompiler,
) -> None:
    torch.manual_seed(0)
    model = build_model(
        ModelSpec(template="transformer", params={"d_model": 16, "layers": 1}), DataShape((8,), 2)
    )
    probe = torch.randn(4, 8)
    slot = insert_slot(model, "blocks.0.mlp.fc2", probe)
    assert slot.shape == SlotShape("linear", (16,))
    artifact = compile_kernel_sync(compiler, "bottleneck_mlp", slot.shape)
    graft(model, slot.slot_id, load_kernel(artifact.data, artifact.sha256), probe)
    assert find_slots(model)["blocks.0.mlp.fc2"].state is SeedState.GERMINATED


def test_a_conv1d_site_becomes_a_conv2d_slot_of_height_one(compiler: BlueprintCompiler) -> None:
    torch.manual_seed(0)
    model = build_model(
        ModelSpec(template="cnn", params={"channels": [4, 8]}), DataShape((1, 12), 3)
    )
    probe = torch.randn(4, 1, 12)
    slot = insert_slot(model, "blocks.0.conv", probe)
    assert slot.shape == SlotShape("conv2d", (4, 1, 12))
    artifact = compile_kernel_sync(compiler, "conv3x3", slot.shape)
    kernel = load_kernel(artifact.data, artifact.sha256)
    graft(model, slot.slot_id, kernel, probe)
    _perturb(kernel)
    slot.transition(SeedState.TRAINING)
    slot.transition(SeedState.BLENDING)
    slot.set_alpha(1.0)
    model.eval()
    with torch.no_grad():
        grown = model(probe)
        with slot.ablated():
            plain = model(probe)
    assert grown.shape == plain.shape == (4, 3)
    assert not torch.equal(grown, plain)
