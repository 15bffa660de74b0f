"""What this machine offers (CPU cores, RAM, GPUs) and how large a batch fits a memory budget.

Nothing here needs a GPU: without CUDA the GPU list is empty and the memory
probe answers None.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import psutil
import torch

from common.errors import FailedPreconditionError, InvalidArgumentError

__all__ = [
    "GpuInfo",
    "HardwareInfo",
    "MemoryProfile",
    "batch_size_for_budget",
    "choose_device",
    "detect_hardware",
    "measure_memory",
]


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    total_memory_bytes: int
    capability: tuple[int, int]


@dataclass(frozen=True)
class HardwareInfo:
    cpu_cores: int
    """Cores this process may run on (its CPU affinity)."""
    ram_bytes: int
    gpus: tuple[GpuInfo, ...]


def detect_hardware() -> HardwareInfo:
    """The CPU cores available to this process, total RAM, and each visible CUDA device."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    gpus = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            gpus.append(
                GpuInfo(index, props.name, int(props.total_memory), (props.major, props.minor))
            )
    return HardwareInfo(cores, int(psutil.virtual_memory().total), tuple(gpus))


def choose_device(requested: str) -> torch.device:
    """The device for `requested` ("" picks CUDA when there is one, else CPU)."""
    if not requested:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError):
        raise InvalidArgumentError(
            f"unknown device {requested!r}; use 'cpu', 'cuda' or 'cuda:N'", field="device"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise FailedPreconditionError(
                f"device {requested!r} requested but this trainer has no CUDA device; "
                "use 'cpu' or leave device empty"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise FailedPreconditionError(
                f"device {requested!r} requested but there are {torch.cuda.device_count()} GPUs"
            )
    elif device.type != "cpu":
        raise InvalidArgumentError(f"unsupported device type {device.type!r}", field="device")
    return device


@dataclass(frozen=True)
class MemoryProfile:
    """Peak memory of a training step as `fixed_bytes + per_sample_bytes * batch`."""

    fixed_bytes: int
    per_sample_bytes: int


def batch_size_for_budget(
    profile: MemoryProfile, budget_bytes: int, *, max_batch: int, multiple: int = 1
) -> int:
    """The largest batch (a multiple of `multiple`, at most `max_batch`) within the budget.

    0 when not even `multiple` samples fit; the caller decides what to say.
    """
    if budget_bytes <= profile.fixed_bytes:
        return 0
    if profile.per_sample_bytes <= 0:
        return max_batch
    fits = (budget_bytes - profile.fixed_bytes) // profile.per_sample_bytes
    batch = min(max_batch, int(fits))
    return max(0, batch - batch % multiple)


def measure_memory(
    step: Callable[[int], None], device: torch.device, *, small: int = 2, large: int = 8
) -> MemoryProfile | None:
    """Peak CUDA memory of `step(batch)` at two batch sizes, as a linear profile.

    None on a CPU device (there is no allocator to ask).
    """
    if device.type != "cuda":
        return None
    peaks = []
    for batch in (small, large):
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step(batch)
        torch.cuda.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device) - base)
    per_sample = max(0, math.ceil((peaks[1] - peaks[0]) / (large - small)))
    return MemoryProfile(max(0, peaks[0] - per_sample * small), per_sample)
