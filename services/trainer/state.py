"""Turning live training objects into checkpoint data and back (tensors + JSON, no pickle).

- `capture_rng`/`restore_rng`: Python's, numpy's and torch's global generators
  (CPU and every CUDA device).
- `optimizer_state`/`load_optimizer_state`: param groups recorded by parameter
  name (so the optimizer can be rebuilt around a freshly built model), per-
  parameter state split into tensors and JSON scalars.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from common.errors import IntegrityError
from services.trainer.checkpoint import CheckpointData, json_ready

__all__ = [
    "build_optimizer_from_state",
    "capture_rng",
    "load_model_tensors",
    "model_tensors",
    "optimizer_state",
    "restore_rng",
]


def capture_rng(data: CheckpointData) -> None:
    """Add the global generators' states to `data`."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    data.state["rng"] = {
        "python": [version, list(internal), gauss],
        "numpy": [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
        "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
    }
    data.tensors["rng/torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            data.tensors[f"rng/cuda/{index}"] = state


def restore_rng(data: CheckpointData) -> None:
    """Put back the generators `capture_rng` saved (CUDA ones when this machine has them)."""
    rng = data.state["rng"]
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(data.tensors["rng/torch"])
    if torch.cuda.is_available():
        states = [data.tensors.get(f"rng/cuda/{i}") for i in range(rng["cuda_devices"])]
        for index, state in enumerate(states[: torch.cuda.device_count()]):
            if state is not None:
                torch.cuda.set_rng_state(state, index)


def optimizer_state(
    optimizer: torch.optim.Optimizer, model: nn.Module, data: CheckpointData
) -> None:
    """Add the optimizer to `data`: groups by parameter name, tensors apart from the JSON."""
    names = {id(p): n for n, p in model.named_parameters()}
    saved = optimizer.state_dict()
    groups = []
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"], strict=True):
        try:
            params = [names[id(p)] for p in group["params"]]
        except KeyError as exc:
            raise IntegrityError("the optimizer holds a parameter the model does not") from exc
        hyper = {k: json_ready(v) for k, v in saved_group.items() if k != "params"}
        groups.append({"params": params, "indices": list(saved_group["params"]), "hyper": hyper})
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in saved["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                data.tensors[f"optim/{index}/{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = json_ready(value)
    data.state["optimizer"] = {"groups": groups, "scalars": scalars}


def build_optimizer_from_state(
    data: CheckpointData,
    model: nn.Module,
    factory: Callable[[list[dict[str, Any]]], torch.optim.Optimizer],
) -> torch.optim.Optimizer:
    """An optimizer over `model`'s parameters with the saved groups and state."""
    params = dict(model.named_parameters())
    saved = data.state["optimizer"]
    groups = []
    for group in saved["groups"]:
        missing = [n for n in group["params"] if n not in params]
        if missing:
            raise IntegrityError(f"checkpoint optimizer refers to unknown parameters {missing[:3]}")
        hyper = {k: _tuples(v) for k, v in group["hyper"].items()}
        groups.append({**hyper, "params": [params[n] for n in group["params"]]})
    optimizer = factory(groups)
    state: dict[int, dict[str, Any]] = {}
    prefix = "optim/"
    for key, tensor in data.tensors.items():
        if key.startswith(prefix):
            index, _, name = key[len(prefix) :].partition("/")
            state.setdefault(int(index), {})[name] = tensor
    for index, entries in saved["scalars"].items():
        state.setdefault(int(index), {}).update(entries)
    param_groups = [
        {**{k: _tuples(v) for k, v in g["hyper"].items()}, "params": list(g["indices"])}
        for g in saved["groups"]
    ]
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})
    return optimizer


def _tuples(value: Any) -> Any:
    # JSON has no tuples; optimizers keep some hyperparameters (betas) as tuples.
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def model_tensors(model: nn.Module, data: CheckpointData) -> None:
    """Add the model's state dict under `model/`."""
    for name, tensor in model.state_dict().items():
        data.tensors[f"model/{name}"] = tensor


def load_model_tensors(model: nn.Module, data: CheckpointData) -> None:
    """Load what `model_tensors` saved; every key must match (strict)."""
    prefix = "model/"
    state: Mapping[str, torch.Tensor] = {
        k[len(prefix) :]: v for k, v in data.tensors.items() if k.startswith(prefix)
    }
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise IntegrityError(f"checkpoint does not fit the model: {exc}") from exc
