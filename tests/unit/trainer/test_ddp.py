"""Data-parallel training under torchrun: two real gloo ranks on CPU, growth from rank 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from common.errors import InvalidArgumentError
from services.trainer.checkpoint import CheckpointStore
from services.trainer.ddp import Communicator, DistributedTrainer, RankShardSampler, _load_spec
from services.trainer.growth import GrowthController
from services.trainer.loop import Trainer
from services.trainer.sampler import EpochSampler
from services.trainer.spec import JobSpec
from tests.ports import free_port
from tests.unit.trainer.conftest import growth_spec
from tests.unit.trainer.inprocess import CompilerKernelSource, SelectorClient, make_compiler

REPO = Path(__file__).resolve().parents[3]
RUN_TIMEOUT_S = 240


def inprocess_growth(spec: JobSpec, out_dir: Path) -> tuple[SelectorClient, CompilerKernelSource]:
    """The `--growth` factory rank 0 uses here: the real selector and compiler cores."""
    del spec
    return SelectorClient(), CompilerKernelSource(make_compiler(out_dir / "kernels"))


def _spec_file(tmp_path: Path, **overrides: Any) -> Path:
    spec = growth_spec()
    spec.update(max_steps=60, checkpoint_every_steps=20)
    spec.update(overrides)
    path = tmp_path / f"spec-{spec['max_steps']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _torchrun(spec: Path, out: Path) -> subprocess.CompletedProcess[str]:
    """Two ranks under torchrun, bounded in time; the whole process group is killed on timeout."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        "-m",
        "services.trainer.ddp",
        str(spec),
        "--out",
        str(out),
        "--growth",
        f"{__name__}:inprocess_growth",
        "--timeout-s",
        "120",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "GRAFTMESH_TRAINER_TORCH_THREADS": "1"}
    proc = subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # torchrun and its ranks share one process group to stop
    )
    try:
        output, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in {RUN_TIMEOUT_S} s:\n{output[-4000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, output, "")


def _events(out: Path, rank: int, kind: str) -> list[dict[str, Any]]:
    lines = (out / f"events-rank-{rank}.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["type"] == kind]


def _rank_report(out: Path, rank: int) -> dict[str, Any]:
    report: dict[str, Any] = json.loads((out / f"rank-{rank}.json").read_text())
    return report


def _grafts(out: Path, rank: int) -> list[tuple[int, str, str]]:
    return [
        (e["step"], e["slot_id"], e["kernel_id"])
        for e in _events(out, rank, "SlotTransition")
        if e["from_state"] == "dormant" and e["to_state"] == "germinated"
    ]


@pytest.mark.slow
def test_two_ranks_grow_the_same_seed_end_identical_and_match_one_process(
    tmp_path: Path,
) -> None:
    spec_path = _spec_file(tmp_path)
    out = tmp_path / "run"
    done = _torchrun(spec_path, out)
    assert done.returncode == 0, done.stdout[-4000:]

    reports = [_rank_report(out, r) for r in (0, 1)]
    assert [r["step"] for r in reports] == [60, 60]
    assert reports[0]["state_sha256"] == reports[1]["state_sha256"]

    grafts = _grafts(out, 0)
    assert grafts, "no kernel was grafted"
    assert _grafts(out, 1) == grafts

    # Rank 0 alone writes checkpoints.
    saved = _events(out, 0, "CheckpointSaved")
    assert sorted({e["step"] for e in saved}) == [0, 20, 40, 60]
    assert _events(out, 1, "CheckpointSaved") == []
    assert sorted(p.name for p in (out / "checkpoints").glob("*.safetensors")) == [
        f"step-{s:09d}.safetensors"
        for s in (20, 40, 60)  # the last 3 are kept
    ]
    assert (out / "model" / "manifest.json").is_file()

    # Each step follows the whole batch's gradient, so the job matches one process.
    spec = _load_spec(spec_path)
    torch.set_num_threads(1)
    single = Trainer(
        spec,
        growth=GrowthController(
            spec.growth,
            selector=SelectorClient(),
            kernels=CompilerKernelSource(make_compiler(tmp_path / "kernels")),
            job_id=spec.name,
            seed=spec.seed,
        ),
    ).run()
    result = json.loads((out / "result.json").read_text())
    assert result["metrics"]["test_accuracy"] > 0.5  # two balanced classes
    assert result["metrics"]["val_loss"] == pytest.approx(single.metrics["val_loss"], abs=0.01)
    assert result["metrics"]["test_accuracy"] == pytest.approx(
        single.metrics["test_accuracy"], abs=0.03
    )
    assert [o["blueprint"] for o in result["outcomes"]] == [o["blueprint"] for o in single.outcomes]

    # A longer run in the same folder resumes both ranks from rank 0's last checkpoint.
    done = _torchrun(_spec_file(tmp_path, max_steps=80), out)
    assert done.returncode == 0, done.stdout[-4000:]
    reports = [_rank_report(out, r) for r in (0, 1)]
    assert [r["resumed_from_step"] for r in reports] == [60, 60]
    assert [r["step"] for r in reports] == [80, 80]
    assert reports[0]["state_sha256"] == reports[1]["state_sha256"]


def test_rank_shards_partition_each_batch_and_keep_the_single_process_position() -> None:
    plain = EpochSampler(50, 16, seed=3)
    shards = [RankShardSampler(50, 16, seed=3, rank=r, world_size=3) for r in range(3)]
    for _ in range(8):  # across an epoch boundary
        whole = plain.next_batch()
        pieces = [s.next_batch() for s in shards]
        if whole is None:
            assert pieces == [None, None, None]
            continue
        assert all(p is not None for p in pieces)
        assert torch.equal(torch.cat([p for p in pieces if p is not None]), whole)
        assert [s.global_batch for s in shards] == [len(whole)] * 3
    for shard in shards:
        assert shard.state_dict() == plain.state_dict()


def test_a_batch_smaller_than_the_world_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match=r"data\.batch_size"):
        RankShardSampler(50, 2, seed=3, rank=0, world_size=3)


def test_distributed_trainer_refuses_a_checkpoint_store_off_rank_zero(tmp_path: Path) -> None:
    follower = Communicator(1, 2, torch.device("cpu"))
    with pytest.raises(InvalidArgumentError, match="only rank 0 writes checkpoints"):
        DistributedTrainer(
            growth_spec(), comm=follower, checkpoints=CheckpointStore(tmp_path / "ck")
        )
