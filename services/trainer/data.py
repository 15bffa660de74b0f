"""Training data: the built-in data sets and user files, as in-memory tensors.

Built-in (`DataSpec.dataset`), all generated or bundled, nothing downloaded:

- `two_spirals`: two interleaved spirals in the plane, 2 classes. Params:
  `samples` [2000], `test_samples` [1000], `turns` [2.0], `noise` [0.05].
- `digits`: scikit-learn's bundled 8x8 digits (1797 images, 10 classes),
  scaled to [0, 1]. Params: `layout` ["flat" (64,) or "image" (1, 8, 8)],
  `test_fraction` [0.2].
- `mnist1d`: MNIST-1D generated procedurally by the `mnist1d` package with its
  default arguments (4000 train / 1000 test signals of length 40, 10 classes;
  the package's download path is never used). Params: `layout` ["flat" or
  "signal" (1, 40)].
- `synthetic_regression`: `y = sin(x w1) + 0.5 (x w2)^2 + noise`. Params:
  `features` [8], `samples` [2000], `test_samples` [500], `noise` [0.1].

A user `path` is a `.npz` (arrays `x`, `y`, optionally `x_test`, `y_test`;
loaded with `allow_pickle=False`) or a `.csv` (numbers only; params `target`
[last column; a header name or an index], `header` [auto]). Params of any
source: `task` ("classification" or "regression"; inferred from the labels
when left out). The validation split is drawn from the training data with
`val_fraction` by a permutation seeded by `split_seed` [0], so every job sees
the same split; the test split, when the source has one, is never trained on.
"""

from __future__ import annotations

import csv
import math
import random
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from common.errors import InvalidArgumentError, NotFoundError
from services.trainer.models import DataShape
from services.trainer.spec import DataSpec

__all__ = ["DATASETS", "DataBundle", "Split", "load_data"]

Task = Literal["classification", "regression"]


@dataclass(frozen=True)
class Split:
    """Inputs `x` (N, *sample) float32 and targets `y` (N,) int64 or (N, outputs) float32."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def to(self, device: torch.device) -> Split:
        return Split(self.x.to(device), self.y.to(device))


@dataclass(frozen=True)
class DataBundle:
    """A data set ready for training: its splits and what kind of task it is."""

    name: str
    task: Task
    train: Split
    val: Split | None
    test: Split | None
    num_outputs: int

    @property
    def shape(self) -> DataShape:
        return DataShape(tuple(int(d) for d in self.train.x.shape[1:]), self.num_outputs)


_Raw = tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]


def _two_spirals(p: _Params) -> _Raw:
    samples = p.integer("samples", 2000)
    test_samples = p.integer("test_samples", 1000)
    turns = p.number("turns", 2.0)
    noise = p.number("noise", 0.05)
    rng = np.random.default_rng(p.integer("data_seed", 0))

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, 2, n)
        t = np.sqrt(rng.uniform(0.0, 1.0, n)) * turns * 2 * math.pi  # uniform along the arc
        r = t / (turns * 2 * math.pi)
        sign = np.where(labels == 0, 1.0, -1.0)
        points = np.stack([sign * r * np.cos(t), sign * r * np.sin(t)], axis=1)
        points += rng.normal(0.0, noise, points.shape)
        return points.astype(np.float32), labels.astype(np.int64)

    x, y = draw(samples)
    xt, yt = draw(test_samples)
    return x, y, xt, yt


def _digits(p: _Params) -> _Raw:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x: np.ndarray = (np.asarray(bunch.data, dtype=np.float32) / 16.0).reshape(-1, 64)
    y = np.asarray(bunch.target, dtype=np.int64)
    layout = p.choice("layout", ("flat", "image"), "flat")
    if layout == "image":
        x = x.reshape(-1, 1, 8, 8)
    order = np.random.default_rng(p.integer("data_seed", 0)).permutation(len(y))
    n_test = round(len(y) * p.number("test_fraction", 0.2))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


_MNIST1D_LOCK = threading.Lock()


@cache
def _mnist1d_default() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from mnist1d.data import get_dataset_args, make_dataset

    # make_dataset seeds the global `random` and `numpy.random` generators; put them back
    # so that generating the data does not change a job's random streams.
    with _MNIST1D_LOCK:
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            data = make_dataset(get_dataset_args())
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
    return (
        np.asarray(data["x"], dtype=np.float32),
        np.asarray(data["y"], dtype=np.int64),
        np.asarray(data["x_test"], dtype=np.float32),
        np.asarray(data["y_test"], dtype=np.int64),
    )


def _mnist1d(p: _Params) -> _Raw:
    x, y, xt, yt = _mnist1d_default()
    if p.choice("layout", ("flat", "signal"), "flat") == "signal":
        x, xt = x[:, None, :], xt[:, None, :]
    return x, y, xt, yt


def _synthetic_regression(p: _Params) -> _Raw:
    features = p.integer("features", 8)
    rng = np.random.default_rng(p.integer("data_seed", 0))
    w1 = rng.normal(0, 1 / math.sqrt(features), (features,))
    w2 = rng.normal(0, 1 / math.sqrt(features), (features,))
    noise = p.number("noise", 0.1)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.normal(0, 1, (n, features))
        y = np.sin(x @ w1) + 0.5 * (x @ w2) ** 2 + rng.normal(0, noise, n)
        return x.astype(np.float32), y.astype(np.float32)[:, None]

    x, y = draw(p.integer("samples", 2000))
    xt, yt = draw(p.integer("test_samples", 500))
    return x, y, xt, yt


DATASETS: Mapping[str, Callable[[_Params], _Raw]] = {
    "two_spirals": _two_spirals,
    "digits": _digits,
    "mnist1d": _mnist1d,
    "synthetic_regression": _synthetic_regression,
}
"""Built-in data sets by name."""


class _Params:
    """Typed access to a source's params; every key must be read, so typos are errors."""

    def __init__(self, params: Mapping[str, Any], allowed: set[str]) -> None:
        self._params = dict(params)
        self._allowed = allowed

    def _get(self, key: str, default: Any) -> Any:
        self._allowed.add(key)
        return self._params.get(key, default)

    def integer(self, key: str, default: int) -> int:
        value = self._get(key, default)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InvalidArgumentError(
                f"must be a non-negative integer, got {value!r}", field=f"data.params.{key}"
            )
        return value

    def number(self, key: str, default: float) -> float:
        value = self._get(key, default)
        if (
            not isinstance(value, int | float)
            or isinstance(value, bool)
            or not math.isfinite(value)
        ):
            raise InvalidArgumentError(
                f"must be a finite number, got {value!r}", field=f"data.params.{key}"
            )
        return float(value)

    def choice(self, key: str, options: tuple[str, ...], default: str) -> str:
        value = self._get(key, default)
        if value not in options:
            raise InvalidArgumentError(
                f"must be one of {', '.join(options)}, got {value!r}", field=f"data.params.{key}"
            )
        return str(value)

    def raw(self, key: str, default: Any) -> Any:
        return self._get(key, default)

    def check_unknown(self) -> None:
        unknown = sorted(set(self._params) - self._allowed)
        if unknown:
            raise InvalidArgumentError(
                f"unknown data param(s) {', '.join(unknown)}; "
                f"known here: {', '.join(sorted(self._allowed))}",
                field=f"data.params.{unknown[0]}",
            )


def load_data(spec: DataSpec) -> DataBundle:
    """The data `spec` names, split into train/val(/test) tensors on the CPU."""
    params = _Params(spec.params, {"task", "split_seed"})
    if spec.dataset is not None:
        source = DATASETS.get(spec.dataset)
        if source is None:
            raise InvalidArgumentError(
                f"unknown dataset {spec.dataset!r}; built-in: {', '.join(DATASETS)} "
                "(or give a .npz/.csv path)",
                field="data.dataset",
            )
        name = spec.dataset
        x, y, xt, yt = source(params)
    else:
        assert spec.path is not None
        name = spec.path
        x, y, xt, yt = _read_file(Path(spec.path), params)
    task_param = params.raw("task", None)
    split_seed = params.integer("split_seed", 0)
    params.check_unknown()
    task = _task(task_param, y)
    train_x, train_y = _tensors(x, y, task)
    test = Split(*_tensors(xt, yt, task)) if xt is not None and yt is not None else None
    n = len(train_y)
    n_val = round(n * spec.val_fraction)
    if spec.val_fraction > 0 and n_val == 0:
        n_val = 1
    if n - n_val < 1:
        raise InvalidArgumentError(
            f"val_fraction leaves no training data ({n} samples)", field="data.val_fraction"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    val_idx, train_idx = order[:n_val], order[n_val:]
    val = Split(train_x[val_idx], train_y[val_idx]) if n_val else None
    train = Split(train_x[train_idx], train_y[train_idx])
    if task == "classification":
        labels = torch.cat([s.y for s in (train, val, test) if s is not None])
        if int(labels.min()) < 0:
            raise InvalidArgumentError("class labels must be >= 0", field="data")
        num_outputs = int(labels.max()) + 1
    else:
        num_outputs = int(train.y.shape[1])
    return DataBundle(name, task, train, val, test, num_outputs)


def _task(param: Any, y: np.ndarray) -> Task:
    if param is not None:
        if param not in ("classification", "regression"):
            raise InvalidArgumentError(
                f"must be 'classification' or 'regression', got {param!r}", field="data.params.task"
            )
        return "classification" if param == "classification" else "regression"
    integral = np.issubdtype(y.dtype, np.integer) or bool(np.all(np.mod(y, 1) == 0))
    return "classification" if integral and y.ndim == 1 else "regression"


def _tensors(x: np.ndarray, y: np.ndarray, task: Task) -> tuple[torch.Tensor, torch.Tensor]:
    if len(x) != len(y):
        raise InvalidArgumentError(f"x has {len(x)} samples but y has {len(y)}", field="data")
    if not np.issubdtype(x.dtype, np.number) or not np.all(np.isfinite(x)):
        raise InvalidArgumentError("inputs must be finite numbers", field="data")
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if task == "classification":
        return xt, torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)).reshape(-1)
    ya = np.ascontiguousarray(y, dtype=np.float32)
    return xt, torch.from_numpy(ya.reshape(len(ya), -1))


def _read_file(path: Path, params: _Params) -> _Raw:
    if not path.is_file():
        raise NotFoundError(f"data file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as archive:
                arrays = {k: archive[k] for k in archive.files}
        except ValueError as exc:
            raise InvalidArgumentError(
                f"{path.name}: {exc} (object arrays would need pickle, which is never used; "
                "store numeric arrays)",
                field="data.path",
            ) from exc
        if "x" not in arrays or "y" not in arrays:
            raise InvalidArgumentError(
                f"{path.name} holds {sorted(arrays)}; it needs arrays 'x' and 'y' "
                "(and optionally 'x_test', 'y_test')",
                field="data.path",
            )
        return arrays["x"], arrays["y"], arrays.get("x_test"), arrays.get("y_test")
    if suffix == ".csv":
        return _read_csv(path, params)
    raise InvalidArgumentError(
        f"unsupported data file type {suffix!r}; use .npz or .csv", field="data.path"
    )


def _read_csv(path: Path, params: _Params) -> _Raw:
    target = params.raw("target", None)
    header_param = params.raw("header", None)
    with path.open(newline="") as handle:
        rows = [row for row in csv.reader(handle) if row]
    if not rows:
        raise InvalidArgumentError(f"{path.name} is empty", field="data.path")

    def numeric(row: list[str]) -> bool:
        try:
            [float(v) for v in row]
        except ValueError:
            return False
        return True

    header = bool(header_param) if header_param is not None else not numeric(rows[0])
    names = rows[0] if header else [str(i) for i in range(len(rows[0]))]
    body = rows[1:] if header else rows
    if target is None:
        column = len(names) - 1
    elif isinstance(target, int) and not isinstance(target, bool):
        column = target if target >= 0 else len(names) + target
    elif str(target) in names:
        column = names.index(str(target))
    else:
        raise InvalidArgumentError(
            f"no column {target!r} in {path.name}; columns: {', '.join(names)}",
            field="data.params.target",
        )
    if not 0 <= column < len(names):
        raise InvalidArgumentError(f"column {target!r} out of range", field="data.params.target")
    values = []
    for number, row in enumerate(body, start=2 if header else 1):
        if len(row) != len(names):
            raise InvalidArgumentError(
                f"{path.name} line {number}: {len(row)} fields, expected {len(names)}",
                field="data.path",
            )
        try:
            values.append([float(v) for v in row])
        except ValueError as exc:
            raise InvalidArgumentError(
                f"{path.name} line {number}: {exc}", field="data.path"
            ) from exc
    table = np.asarray(values, dtype=np.float64)
    y = table[:, column]
    x = np.delete(table, column, axis=1)
    if np.all(np.mod(y, 1) == 0):
        y = y.astype(np.int64)
    return x.astype(np.float32), y, None, None
