"""Data sources: built-ins generated offline, user files, splits and their errors."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from common.errors import InvalidArgumentError, NotFoundError
from services.trainer.data import load_data
from services.trainer.spec import DataSpec


def test_two_spirals_is_generated_deterministically_with_a_test_split() -> None:
    spec = DataSpec(
        dataset="two_spirals", val_fraction=0.2, params={"samples": 500, "test_samples": 100}
    )
    a, b = load_data(spec), load_data(spec)
    assert a.task == "classification" and a.num_outputs == 2
    assert len(a.train) == 400 and a.val is not None and len(a.val) == 100
    assert a.test is not None and len(a.test) == 100
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.train.y, b.train.y)
    assert a.shape.input_shape == (2,)


def test_digits_come_bundled_scaled_and_in_either_layout() -> None:
    flat = load_data(DataSpec(dataset="digits"))
    image = load_data(DataSpec(dataset="digits", params={"layout": "image"}))
    assert flat.num_outputs == 10 and flat.shape.input_shape == (64,)
    assert image.shape.input_shape == (1, 8, 8)
    assert float(flat.train.x.max()) <= 1.0
    assert flat.test is not None and len(flat.test) == round(1797 * 0.2)


def test_mnist1d_is_generated_without_download_and_leaves_global_rngs_alone() -> None:
    random.seed(5)
    np.random.seed(5)
    py_before, np_before = random.random(), np.random.random()
    random.seed(5)
    np.random.seed(5)
    bundle = load_data(DataSpec(dataset="mnist1d", params={"layout": "signal"}))
    assert (random.random(), np.random.random()) == (py_before, np_before)
    assert bundle.num_outputs == 10 and bundle.shape.input_shape == (1, 40)
    assert bundle.test is not None and len(bundle.test) == 1000
    assert len(bundle.train) + len(bundle.val or []) == 4000


def test_synthetic_regression_has_float_targets() -> None:
    bundle = load_data(
        DataSpec(dataset="synthetic_regression", params={"features": 4, "samples": 100})
    )
    assert bundle.task == "regression" and bundle.num_outputs == 1
    assert bundle.train.y.dtype == torch.float32 and bundle.train.y.shape[1] == 1


def test_user_npz_and_csv_files_load(tmp_path: Path) -> None:
    x = np.arange(40, dtype=np.float32).reshape(20, 2)
    y = np.arange(20) % 3
    np.savez(tmp_path / "d.npz", x=x, y=y, x_test=x[:5], y_test=y[:5])
    npz = load_data(DataSpec(path=str(tmp_path / "d.npz"), val_fraction=0.25))
    assert npz.task == "classification" and npz.num_outputs == 3 and len(npz.train) == 15
    assert npz.test is not None and len(npz.test) == 5

    lines = ["a,b,label"] + [f"{i},{i * 2},{i % 2}" for i in range(10)]
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    csv = load_data(
        DataSpec(path=str(tmp_path / "d.csv"), val_fraction=0.0, params={"target": "label"})
    )
    assert csv.shape.input_shape == (2,) and csv.num_outputs == 2 and csv.val is None
    assert csv.train.x.shape == (10, 2)


def test_object_arrays_are_refused_without_unpickling(tmp_path: Path) -> None:
    np.savez(tmp_path / "bad.npz", x=np.array([{"a": 1}] * 4, dtype=object), y=np.zeros(4))
    with pytest.raises(InvalidArgumentError, match="pickle"):
        load_data(DataSpec(path=str(tmp_path / "bad.npz")))


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (DataSpec(dataset="cifar11"), "data.dataset"),
        (DataSpec(dataset="two_spirals", params={"smaples": 10}), "data.params.smaples"),
        (DataSpec(dataset="two_spirals", params={"noise": "loud"}), "data.params.noise"),
        (DataSpec(dataset="digits", params={"layout": "cube"}), "data.params.layout"),
    ],
)
def test_bad_data_specs_name_the_field(spec: DataSpec, field: str) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        load_data(spec)
    assert caught.value.field == field


def test_missing_file_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        load_data(DataSpec(path=str(tmp_path / "nope.npz")))
