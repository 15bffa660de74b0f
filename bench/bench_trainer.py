"""Trainer: what seed slots cost, what surgery costs, and what growth buys.

1. Step time (forward + backward + AdamW, batch 128) of an MLP 64-256x4-10
   with 4 dormant slots vs the same plain host; target ratio <= 1.03.
2. Step time with one seed in BLENDING (a compiled `residual_mlp` kernel) vs a
   static model of the same final architecture (the eager blueprint module
   wired in as `y + m(y)`); target ratio <= 1.15.
3. Surgery (insert slot, graft, cull, remove slot) on each template; target
   < 100 ms per operation.
4. Growth quality (reported, not judged): a small host that grows through the
   real compiler and seed selector cores vs static hosts of its initial and of
   its final size, same steps: two-spirals (train accuracy), digits from a
   width-4 MLP (test accuracy; static width 4 ~85%, width 16 ~97.6%) and
   MNIST-1D (test accuracy).

Step times are the fastest of interleaved runs (the machine is shared).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.breaker import BreakerConfig
from common.kernels import load_kernel
from services.compiler import build_module, get_blueprint, parse_slot
from services.trainer.data import load_data
from services.trainer.growth import GrowthController
from services.trainer.lifecycle import SeedState
from services.trainer.loop import Trainer, TrainingResult
from services.trainer.models import DataShape, build_model, slot_sites
from services.trainer.sampler import EpochSampler
from services.trainer.seeds import SlotShape
from services.trainer.spec import DataSpec, GrowthSpec, ModelSpec
from services.trainer.surgery import cull, graft, insert_slot, remove_slot
from tests.unit.trainer.inprocess import CompilerKernelSource, SelectorClient, make_compiler

BATCH = 128
RUNS, ITERS = 9, 20
WIDTH = 256


def _step_times(models: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Seconds per training step of each model: fastest of `RUNS` interleaved runs."""
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}

    def step(name: str) -> None:
        optimizer = optimizers[name]
        optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(nn.functional.cross_entropy(models[name](x), y))
        optimizer.step()

    for name in models:
        for _ in range(5):
            step(name)
    samples: dict[str, list[float]] = {name: [] for name in models}
    order = list(models)
    for run in range(RUNS):
        for name in order if run % 2 == 0 else reversed(order):
            started = time.perf_counter()
            for _ in range(ITERS):
                step(name)
            samples[name].append((time.perf_counter() - started) / ITERS)
    return {name: min(values) for name, values in samples.items()}


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(
        ModelSpec(template="mlp", params={"hidden": [WIDTH] * 4}), DataShape((64,), 10)
    )


class _Residual(nn.Module):
    """`y + m(y)` after `host`: the static form of a fossilized seed."""

    def __init__(self, host: nn.Module, branch: nn.Module) -> None:
        super().__init__()
        self.host = host
        self.branch = branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.host(x)
        out: torch.Tensor = y + self.branch(y)
        return out


def _overheads(source: CompilerKernelSource) -> None:
    x, y = torch.randn(BATCH, 64), torch.randint(0, 10, (BATCH,))
    probe = x[:8]
    plain, slotted = _mlp(), _mlp()
    for site in slot_sites(slotted):
        insert_slot(slotted, site, probe)
    times = _step_times({"plain": plain, "dormant": slotted}, x, y)
    ratio = times["dormant"] / times["plain"]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"MLP 64-{WIDTH}x4-10, batch {BATCH}"
    )
    print(
        f"step, 4 dormant slots: {times['dormant'] * 1e6:.0f} us vs plain host "
        f"{times['plain'] * 1e6:.0f} us: ratio {ratio:.3f} (target <= 1.03)"
    )

    shape = SlotShape("linear", (WIDTH,))
    artifact = asyncio.run(source.compile("residual_mlp", shape))
    blending = _mlp()
    slot = insert_slot(blending, "blocks.1.fc", probe)
    kernel = load_kernel(artifact.data, artifact.sha256)
    graft(blending, "blocks.1.fc", kernel, probe)
    slot.transition(SeedState.TRAINING)
    slot.transition(SeedState.BLENDING)
    slot.set_alpha(0.5)
    static = _mlp()
    branch = build_module(get_blueprint("residual_mlp", parse_slot(shape.to_json())))
    block = static.get_submodule("blocks.1")
    block.fc = _Residual(block.get_submodule("fc"), branch)
    times = _step_times({"static": static, "blending": blending}, x, y)
    ratio = times["blending"] / times["static"]
    print(
        f"step, one seed BLENDING (residual_mlp kernel): {times['blending'] * 1e6:.0f} us "
        f"vs static model of the same final architecture {times['static'] * 1e6:.0f} us: "
        f"ratio {ratio:.3f} (target <= 1.15)"
    )


_SURGERY_CASES = {
    "mlp": (
        ModelSpec(template="mlp", params={"hidden": [WIDTH] * 4}),
        DataShape((64,), 10),
        "residual_mlp",
    ),
    "cnn": (
        ModelSpec(template="cnn", params={"channels": [16, 32]}),
        DataShape((1, 8, 8), 10),
        "conv3x3",
    ),
    "resnet": (
        ModelSpec(template="resnet", params={"width": 16}),
        DataShape((3, 16, 16), 10),
        "conv3x3",
    ),
    "transformer": (
        ModelSpec(template="transformer", params={"d_model": 64}),
        DataShape((64,), 10),
        "bottleneck_mlp",
    ),
}


def _surgery(source: CompilerKernelSource) -> None:
    print("\nsurgery on the templates (probe batch 8), ms:")
    print(f"{'template':<12} {'slot':<18} {'insert':>7} {'graft':>7} {'cull':>7} {'remove':>7}")
    worst = 0.0
    for name, (spec, shape, blueprint) in _SURGERY_CASES.items():
        torch.manual_seed(0)
        model = build_model(spec, shape)
        optimizer = torch.optim.AdamW([{"params": list(model.parameters()), "name": "host"}])
        probe = torch.randn(8, *shape.input_shape)
        site = slot_sites(model)[-1]
        timings = {}
        started = time.perf_counter()
        slot = insert_slot(model, site, probe)
        timings["insert"] = time.perf_counter() - started
        artifact = asyncio.run(source.compile(blueprint, slot.shape))
        kernel = load_kernel(artifact.data, artifact.sha256)
        started = time.perf_counter()
        graft(model, site, kernel, probe, optimizer=optimizer)
        timings["graft"] = time.perf_counter() - started
        slot.transition(SeedState.TRAINING)
        started = time.perf_counter()
        cull(model, site, probe, optimizer=optimizer)
        timings["cull"] = time.perf_counter() - started
        slot.transition(SeedState.EMBARGOED)
        slot.transition(SeedState.DORMANT)
        started = time.perf_counter()
        remove_slot(model, site, probe)
        timings["remove"] = time.perf_counter() - started
        worst = max(worst, *timings.values())
        print(
            f"{name:<12} {site:<18} "
            + " ".join(f"{timings[k] * 1e3:>7.2f}" for k in ("insert", "graft", "cull", "remove"))
        )
    print(f"slowest surgery operation: {worst * 1e3:.1f} ms (target < 100 ms)")


# --- growth quality ------------------------------------------------------------------------


def _growth_spec(**overrides: Any) -> dict[str, Any]:
    growth = {
        "enabled": True,
        "plateau_patience": 3,
        "plateau_min_delta": 2e-3,
        "seed_training_steps": 100,
        "blend_steps": 150,
        "blend_schedule": "cosine",
        "holding_steps": 50,
        "embargo_steps": 200,
        "strategy": "ucb1",
        "fossilize_min_improvement": 0.002,
    }
    growth.update(overrides)
    return growth


def _run(
    spec: dict[str, Any], source: CompilerKernelSource | None, job: str
) -> tuple[TrainingResult, float]:
    controller = None
    if source is not None:
        controller = GrowthController(
            GrowthSpec.model_validate(spec["growth"]),
            selector=SelectorClient(),
            kernels=source,
            job_id=job,
            seed=0,
            breaker=BreakerConfig(failure_threshold=3, reset_timeout_s=60),
        )
    started = time.perf_counter()
    result = Trainer(spec, growth=controller).run()
    return result, time.perf_counter() - started


def _static_width(hidden_layers: int, target_params: int, shape: DataShape) -> int:
    """The hidden width of a static MLP whose parameter count is closest to `target_params`."""

    def params(width: int) -> int:
        model = build_model(
            ModelSpec(template="mlp", params={"hidden": [width] * hidden_layers}), shape
        )
        return sum(p.numel() for p in model.parameters())

    return min(range(1, 257), key=lambda w: abs(params(w) - target_params))


def _compare(
    title: str,
    base: dict[str, Any],
    hidden: list[int],
    metric: str,
    source: CompilerKernelSource,
    *,
    references: dict[str, list[int]] | None = None,
) -> None:
    bundle = load_data(DataSpec.model_validate(base["data"]))
    shape = bundle.shape
    per_epoch = EpochSampler(len(bundle.train), base["data"]["batch_size"], 0).batches_per_epoch
    grown_spec = {
        **base,
        "model": {"template": "mlp", "params": {"hidden": hidden}},
        "slots": [{"module_path": f"blocks.{i}.fc"} for i in range(len(hidden))],
    }
    grown, grown_s = _run(grown_spec, source, title)
    final_width = _static_width(len(hidden), grown.param_count, shape)
    rows: list[tuple[str, TrainingResult, float]] = [(f"grown from {hidden}", grown, grown_s)]
    statics = {"static initial": hidden, "static final size": [final_width] * len(hidden)}
    statics.update(references or {})
    for label, widths in statics.items():
        spec = {
            **base,
            "model": {"template": "mlp", "params": {"hidden": widths}},
            "growth": {"enabled": False},
        }
        result, took = _run(spec, None, title)
        rows.append((f"{label} {widths}", result, took))
    print(f"\n{title}: {grown.step} steps ({grown.step / per_epoch:.0f} epochs) per model")
    print(f"{'model':<30} {metric:>15} {'params':>7} {'seconds':>8}")
    for label, result, took in rows:
        print(f"{label:<30} {result.metrics[metric]:>15.4f} {result.param_count:>7} {took:>8.1f}")
    fates = [
        (s.slot_id, s.state.value, s.blueprint)
        for s in grown.slots
        if s.blueprint or s.state is not SeedState.DORMANT
    ]
    outcomes = [
        f"{o.get('blueprint', '?')}@{o.get('slot_id', '?')}: reward {o['reward']:+.4f}, "
        f"{'fossilized' if o.get('fossilized') else 'culled'}"
        for o in grown.outcomes
    ]
    print(f"grown slots: {fates or 'none'}; seeds judged: {outcomes or 'none'}")
    if not grown.growth_available:
        print(f"growth unavailable: {grown.growth_reason}")


def _quality(source: CompilerKernelSource) -> None:
    spirals = {
        "data": {"dataset": "two_spirals", "batch_size": 64, "val_fraction": 0.1},
        "optimizer": {"name": "adamw", "lr": 0.01},
        "max_steps": 3000,
        "eval_every_steps": 50,
        "seed": 0,
        "growth": _growth_spec(),
    }
    _compare("two-spirals", spirals, [8, 8], "train_accuracy", source)
    digits = {
        "data": {"dataset": "digits", "batch_size": 64, "val_fraction": 0.1},
        "optimizer": {"name": "adamw", "lr": 0.01},
        "epochs": 60,
        "eval_every_steps": 40,
        "seed": 0,
        "growth": _growth_spec(),
    }
    _compare("digits", digits, [4], "test_accuracy", source, references={"static width 16": [16]})
    mnist1d = {
        "data": {"dataset": "mnist1d", "batch_size": 64, "val_fraction": 0.1},
        "optimizer": {"name": "adamw", "lr": 0.003},
        "epochs": 25,
        "eval_every_steps": 50,
        "seed": 0,
        "growth": _growth_spec(),
    }
    _compare("MNIST-1D", mnist1d, [32, 32], "test_accuracy", source)


def main() -> None:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as root:
        source = CompilerKernelSource(make_compiler(Path(root)))
        _overheads(source)
        _surgery(source)
        _quality(source)
        stats = source.compiler.stats().store
        print(f"\nkernels compiled: {stats.compiles}, cache hits: {stats.hits}")


if __name__ == "__main__":
    main()
