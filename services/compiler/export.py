"""Eager module -> portable kernel (`torch.export` program, `.pt2` bytes), and kernel ids.

`export_kernel` traces a built blueprint with a dynamic batch dimension and
saves it with `common.kernels.save_program`: no example inputs, no source paths,
plain tensors only, so it loads without pickle. Loading (`load_kernel`,
`check_archive`, `streamline`) lives in `common.kernels`, because the trainer and
the router load kernels without importing this package; its module doc says
what torch stores and why nothing is unpickled.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from typing import Any, Final

import torch
from torch import nn
from torch.export import Dim

from common.kernels import KERNEL_INFO_FILE, save_program, sha256_hex

__all__ = ["FORMAT_VERSION", "export_kernel", "kernel_id"]

FORMAT_VERSION: Final = 1
"""Bumped whenever building or exporting changes what a blueprint compiles to (it is in the id)."""

# torch.export keeps tracing state in globals; one export at a time per process.
_EXPORT_LOCK = threading.Lock()


def kernel_id(
    canonical_blueprint: str,
    slot: Mapping[str, Any],
    *,
    dtype: str,
    device: str,
    seed: int,
    training: bool,
) -> str:
    """The kernel's id: sha256 of everything that decides what the kernel is.

    That is the canonical blueprint (`canonical_json`), the target slot, this
    torch version, dtype, device, init seed, training or eval mode and
    `FORMAT_VERSION`; the same inputs give the same id before anything is
    compiled. (The sha256 of the artifact's bytes is separate: it checks integrity.)
    """
    payload = {
        "blueprint": json.loads(canonical_blueprint),
        "slot": dict(slot),
        "torch": torch.__version__,
        "dtype": dtype,
        "device": device,
        "seed": seed,
        "training": training,
        "format": FORMAT_VERSION,
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return sha256_hex(text.encode())


def export_kernel(
    module: nn.Module,
    example: torch.Tensor,
    *,
    training: bool,
    min_batch: int = 1,
    info: Mapping[str, Any] | None = None,
) -> bytes:
    """The `.pt2` bytes of `module`, with a dynamic batch dimension of at least `min_batch`.

    `example` is one input (any batch size >= 2 and >= `min_batch`; its values do
    not matter). The module is traced in training mode when `training` (batch
    norm uses and updates batch statistics) and in eval mode otherwise. `info`
    is stored as `extra/kernel.json`. The same inputs give the same bytes
    (see `save_program`).
    """
    module.train(training)
    batch = Dim("batch", min=min_batch)
    with _EXPORT_LOCK:
        program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
        extra = {KERNEL_INFO_FILE: json.dumps(dict(info or {}), sort_keys=True)}
        return save_program(program, extra_files=extra)
