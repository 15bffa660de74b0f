"""Checkpoint files: round trip, damaged-latest fallback, failed writes, pruning."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from common.errors import IntegrityError
from services.trainer.checkpoint import CheckpointData, CheckpointStore
from services.trainer.files import write_atomic


def _data(step: int) -> CheckpointData:
    return CheckpointData(
        tensors={
            "model/w": torch.full((3, 2), float(step)),
            "optim/0/step": torch.tensor(float(step)),
        },
        blobs={"kernel/abc": bytes(range(256)) * 3},
        state={"format": 1, "step": step, "nested": {"lr": 0.001, "betas": [0.9, 0.999]}},
    )


def test_round_trip_keeps_tensors_blobs_and_state(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    info = store.save(5, _data(5))
    assert info.path.exists() and info.size_bytes == info.path.stat().st_size
    found = store.load_latest()
    assert found is not None
    loaded_info, loaded = found
    assert loaded_info.step == 5 and loaded_info.sha256 == info.sha256
    assert torch.equal(loaded.tensors["model/w"], torch.full((3, 2), 5.0))
    assert loaded.tensors["optim/0/step"].shape == ()
    assert loaded.blobs["kernel/abc"] == bytes(range(256)) * 3
    assert loaded.state == _data(5).state


def test_only_the_last_k_are_kept(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=2)
    for step in (1, 2, 3, 4):
        store.save(step, _data(step))
    assert [c.step for c in store.checkpoints()] == [4, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step-000000003.json",
        "step-000000003.safetensors",
        "step-000000004.json",
        "step-000000004.safetensors",
    ]


def test_a_corrupted_latest_falls_back_to_the_previous_valid_one(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(1, _data(1))
    latest = store.save(2, _data(2))
    raw = bytearray(latest.path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped bit in the tensor data
    latest.path.write_bytes(bytes(raw))

    found = CheckpointStore(tmp_path).load_latest()
    assert found is not None and found[0].step == 1
    assert torch.equal(found[1].tensors["model/w"], torch.full((3, 2), 1.0))
    with pytest.raises(IntegrityError, match="sha256"):
        store.load(latest)


def test_a_truncated_or_missing_latest_falls_back_too(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(1, _data(1))
    second = store.save(2, _data(2))
    third = store.save(3, _data(3))
    third.path.unlink()
    second.path.write_bytes(second.path.read_bytes()[:100])
    fresh = CheckpointStore(tmp_path)
    found = fresh.load_latest()
    assert found is not None and found[0].step == 1
    assert len(fresh.rejected) == 2


def test_a_failing_writer_leaves_the_previous_checkpoint_valid(tmp_path: Path) -> None:
    calls = {"n": 0}

    def flaky(path: Path, data: bytes) -> None:
        calls["n"] += 1
        if calls["n"] > 2:  # the first checkpoint (data + record) goes through
            write_atomic(path, data[: len(data) // 2])
            raise OSError(28, "No space left on device")
        write_atomic(path, data)

    store = CheckpointStore(tmp_path, write=flaky)
    store.save(1, _data(1))
    with pytest.raises(OSError, match="No space"):
        store.save(2, _data(2))
    found = CheckpointStore(tmp_path).load_latest()
    assert found is not None and found[0].step == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_fails_the_write_and_keeps_the_previous_checkpoint(
    tmp_path: Path,
) -> None:
    store = CheckpointStore(tmp_path)
    store.save(1, _data(1))
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(OSError):
            store.save(2, _data(2))
    finally:
        tmp_path.chmod(0o700)
    found = CheckpointStore(tmp_path).load_latest()
    assert found is not None and found[0].step == 1
    assert not list(tmp_path.glob(".*.tmp"))


def test_nothing_is_unpickled_and_unknown_entries_are_refused(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    info = store.save(1, _data(1))
    forged = save({"x/evil": torch.zeros(1)}, metadata={"graftmesh.checkpoint.state": "{}"})
    info.path.write_bytes(forged)
    record = info.path.with_suffix(".json")
    meta = json.loads(record.read_text())
    meta["sha256"] = hashlib.sha256(forged).hexdigest()
    record.write_text(json.dumps(meta))
    with pytest.raises(IntegrityError, match="unexpected entry"):
        store.load(CheckpointStore(tmp_path).checkpoints()[0])
