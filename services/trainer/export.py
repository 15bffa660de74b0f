"""The trained model as servable artifacts: `model.pt2`, `model.safetensors`, `manifest.json`.

- `model.pt2`: the whole model (host and grown seeds) as one `torch.export`
  program with a dynamic batch dimension, saved by `common.kernels.save_program`
  (no example inputs, no pickled payload; `check_archive` passes). It loads with
  `torch.export.load` alone, no project code: slots in DORMANT, CULLED,
  EMBARGOED or TRAINING export as the identity, BLENDING with its alpha,
  HOLDING and FOSSILIZED at full strength. Exported in eval mode without grad.
- `model.safetensors`: the model's state dict (the weights of the same model).
- `manifest.json`: format, torch version, the job, the host spec, input and
  output specs, every slot (state, blueprint, kernel id and sha256, alpha,
  added params), the kernel ids, the parameter count, the metrics, the sha256
  and size of both files, and reference input statistics over the training
  inputs: `reference_statistics` (per flattened feature its mean, std and
  quantile edges) and `input_reference`, the drift reference the router
  measures served inputs against (`common.drift`: per feature along dim 1,
  decile edges and bin shares; absent for inputs with no feature dimension).

Every file is written atomically; the manifest goes last, so a manifest only
ever describes files that are completely there.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import torch
from safetensors.torch import save as save_tensors
from torch import nn
from torch.export import Dim

from common.drift import INPUT_REFERENCE_KEY, input_reference
from common.kernels import check_archive, save_program
from services.trainer.files import sha256_hex, write_atomic
from services.trainer.seeds import SlotRecord

__all__ = [
    "MANIFEST_FORMAT",
    "ExportedModel",
    "drift_reference",
    "export_model",
    "reference_statistics",
]

MANIFEST_FORMAT: Final = 1
_STATS_ROWS: Final = 20_000


@dataclass(frozen=True)
class ExportedModel:
    """Where the artifacts are and what the manifest says."""

    directory: Path
    program_sha256: str
    weights_sha256: str
    manifest: Mapping[str, Any]


def reference_statistics(inputs: torch.Tensor, *, bins: int = 10) -> dict[str, Any]:
    """Per-feature mean, std and `bins` quantile bins (`bins + 1` edges) of `inputs` (N, ...).

    Features are the flattened sample dimensions; at most 20 000 rows (evenly
    spaced) are used, which pins every decile to well under 1% of the data.
    """
    x = inputs.detach().float().reshape(inputs.shape[0], -1).cpu()
    if x.shape[0] > _STATS_ROWS:
        x = x[torch.linspace(0, x.shape[0] - 1, _STATS_ROWS).long()]
    levels = torch.linspace(0.0, 1.0, bins + 1)
    edges = torch.quantile(x, levels, dim=0).T  # (F, bins + 1)
    return {
        "rows": int(inputs.shape[0]),
        "sample_shape": [int(d) for d in inputs.shape[1:]],
        "features": int(x.shape[1]),
        "mean": x.mean(0).tolist(),
        "std": x.std(0, unbiased=False).tolist(),
        "quantile_levels": levels.tolist(),
        "quantile_edges": edges.tolist(),
    }


def _stats_rows(inputs: torch.Tensor) -> torch.Tensor:
    """At most 20 000 evenly spaced rows of `inputs`, on the CPU."""
    x = inputs.detach().cpu()
    if x.shape[0] > _STATS_ROWS:
        x = x[torch.linspace(0, x.shape[0] - 1, _STATS_ROWS).long()]
    return x


def drift_reference(inputs: torch.Tensor) -> dict[str, Any] | None:
    """The manifest's `input_reference` of the model's input `x` from the training inputs
    `(N, F, ...)` (features along dim 1); None for inputs without a feature dimension."""
    if inputs.dim() < 2 or inputs.shape[0] == 0:
        return None
    reference = input_reference({"x": _stats_rows(inputs)})
    reference["sample_count"] = int(inputs.shape[0])
    return reference


def export_model(
    model: nn.Module,
    out_dir: Path | str,
    *,
    example: torch.Tensor,
    reference_inputs: torch.Tensor,
    host: Mapping[str, Any],
    slots: Sequence[SlotRecord],
    metrics: Mapping[str, float],
    num_outputs: int,
    task: str,
    job: Mapping[str, Any] | None = None,
) -> ExportedModel:
    """Write the three artifacts of `model` to `out_dir` (see the module doc).

    `example` is one input batch of at least two samples (its values do not
    matter); the batch dimension of the program is dynamic.
    """
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            program = torch.export.export(
                model, (example,), dynamic_shapes=({0: Dim("batch", min=1)},)
            )
    finally:
        model.train(was_training)
    sample = [int(d) for d in example.shape[1:]]
    io_spec = {
        "inputs": [
            {
                "name": "x",
                "dtype": str(example.dtype).removeprefix("torch."),
                "shape": [-1, *sample],
            }
        ],
        "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, num_outputs]}],
    }
    program_bytes = save_program(
        program, extra_files={"io.json": json.dumps(io_spec, sort_keys=True)}
    )
    check_archive(program_bytes)  # what a loader will demand: fail here, not there
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    weights_bytes = save_tensors(state, metadata={"format": str(MANIFEST_FORMAT)})
    program_sha, weights_sha = sha256_hex(program_bytes), sha256_hex(weights_bytes)
    files = {
        "model.pt2": {"sha256": program_sha, "size_bytes": len(program_bytes)},
        "model.safetensors": {"sha256": weights_sha, "size_bytes": len(weights_bytes)},
    }
    slot_entries = []
    for record in slots:
        entry = record.to_json()
        entry.pop("history", None)
        slot_entries.append(entry)
    manifest = {
        "format": MANIFEST_FORMAT,
        "created": time.time(),
        "torch_version": torch.__version__,
        "job": dict(job or {}),
        "host": dict(host),
        "task": task,
        **io_spec,
        "slots": slot_entries,
        "kernel_ids": sorted({r.kernel_id for r in slots if r.kernel_id}),
        "param_count": sum(p.numel() for p in model.parameters()),
        "metrics": {k: float(v) for k, v in metrics.items()},
        "reference_statistics": reference_statistics(reference_inputs),
        "files": files,
    }
    drift = drift_reference(reference_inputs)
    if drift is not None:
        manifest[INPUT_REFERENCE_KEY] = drift
    write_atomic(directory / "model.pt2", program_bytes)
    write_atomic(directory / "model.safetensors", weights_bytes)
    write_atomic(
        directory / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True).encode()
    )
    return ExportedModel(directory, program_sha, weights_sha, manifest)
