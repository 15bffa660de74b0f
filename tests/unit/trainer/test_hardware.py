"""Hardware detection and batch sizing (CUDA paths run only where there is a GPU)."""

from __future__ import annotations

import pytest
import torch

from common.errors import FailedPreconditionError, InvalidArgumentError
from services.trainer.hardware import (
    MemoryProfile,
    batch_size_for_budget,
    choose_device,
    detect_hardware,
    measure_memory,
)


def test_detects_this_machine() -> None:
    info = detect_hardware()
    assert info.cpu_cores >= 1 and info.ram_bytes > 0
    assert len(info.gpus) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)


def test_batch_size_fits_the_budget() -> None:
    profile = MemoryProfile(fixed_bytes=1000, per_sample_bytes=100)
    assert batch_size_for_budget(profile, 10_000, max_batch=512) == 90
    assert batch_size_for_budget(profile, 10_000, max_batch=512, multiple=8) == 88
    assert batch_size_for_budget(profile, 10_000, max_batch=32) == 32
    assert batch_size_for_budget(profile, 900, max_batch=32) == 0


def test_device_choice() -> None:
    assert choose_device("cpu").type == "cpu"
    with pytest.raises(InvalidArgumentError):
        choose_device("tpu")
    if not torch.cuda.is_available():
        assert choose_device("").type == "cpu"
        with pytest.raises(FailedPreconditionError, match="no CUDA"):
            choose_device("cuda")
        assert measure_memory(lambda _b: None, torch.device("cpu")) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_measured_memory_grows_with_the_batch() -> None:
    device = torch.device("cuda")
    model = torch.nn.Linear(512, 512).to(device)

    def step(batch: int) -> None:
        model(torch.randn(batch, 512, device=device)).sum().backward()

    profile = measure_memory(step, device, small=4, large=64)
    assert profile is not None and profile.per_sample_bytes > 0
