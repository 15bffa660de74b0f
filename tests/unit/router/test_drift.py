"""PSI, reference statistics and their accumulator."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from services.router import (
    DriftAccumulator,
    InputReference,
    ReferenceStatistics,
    psi,
    reference_from_moments,
    reference_from_samples,
)


def test_psi_is_zero_for_the_reference_distribution() -> None:
    assert psi([0.25, 0.25, 0.5], [25, 25, 50]) == pytest.approx(0.0)


def test_psi_matches_the_formula() -> None:
    expected = [0.5, 0.5]
    observed = [80, 20]
    by_hand = (0.8 - 0.5) * math.log(0.8 / 0.5) + (0.2 - 0.5) * math.log(0.2 / 0.5)
    assert psi(expected, observed) == pytest.approx(by_hand)


def test_psi_stays_finite_with_empty_bins_and_zero_without_counts() -> None:
    assert math.isfinite(psi([0.0, 1.0], [10, 0]))
    assert psi([0.5, 0.5], [0, 0]) == 0.0
    with pytest.raises(ValueError, match="expected shares"):
        psi([1.0], [1, 2])


def test_reference_from_samples_puts_a_decile_in_each_bin() -> None:
    torch.manual_seed(0)
    ref = reference_from_samples(torch.randn(5000, 3), feature_dim=1, bins=10)
    assert ref.features == 3 and len(ref.edges[0]) == 9
    for shares in ref.proportions:
        assert shares == pytest.approx([0.1] * 10, abs=0.01)


def test_reference_from_moments_is_a_normal_approximation() -> None:
    ref = reference_from_moments([0.0, 10.0], [1.0, 2.0])
    assert ref is not None
    assert ref.edges[0][4] == pytest.approx(0.0, abs=1e-9)
    assert ref.edges[1][4] == pytest.approx(10.0)
    assert ref.edges[0][0] == pytest.approx(-1.2816, abs=1e-3)
    assert reference_from_moments([0.0], [0.0]) is None
    assert reference_from_moments([], []) is None


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"edges": [[0.0, 1.0]], "proportions": [[0.5, 0.5]]}, "needs 3 proportions"),
        ({"edges": [[1.0, 0.0]], "proportions": [[0.3, 0.3, 0.4]]}, "non-decreasing"),
        ({"edges": [[0.0]], "proportions": [[0.3, 0.3]]}, "sum to 1"),
        ({"edges": [[0.0], [0.0, 1.0]], "proportions": [[0.5, 0.5], [0.5, 0.5]]}, "feature 0 has"),
    ],
)
def test_malformed_references_are_rejected_with_the_reason(
    body: dict[str, object], problem: str
) -> None:
    with pytest.raises(ValidationError, match=problem):
        InputReference.model_validate(body)


def test_manifest_section_round_trips() -> None:
    ref = reference_from_samples(torch.randn(100, 2))
    section = {"schema": 1, "sample_count": 100, "inputs": {"x": ref.model_dump()}}
    parsed = ReferenceStatistics.model_validate(section)
    assert parsed.inputs["x"] == ref and parsed.sample_count == 100


def test_accumulator_sees_no_drift_on_reference_like_inputs_and_drift_on_shifted_ones() -> None:
    torch.manual_seed(1)
    ref = reference_from_samples(torch.randn(20000, 4))
    same = DriftAccumulator({"x": ref}, window_rows=4000)
    assert same.observe({"x": torch.randn(2000, 4)}, 2000) is None
    report = same.observe({"x": torch.randn(2000, 4)}, 2000)
    assert report is not None and report.rows == 4000
    assert max(report.psi["x"]) < 0.05 and report.over(0.2) == []
    shifted = DriftAccumulator({"x": ref}, window_rows=1000)
    moved = torch.randn(1000, 4)
    moved[:, 2] += 1.5
    report = shifted.observe({"x": moved}, 1000)
    assert report is not None
    assert [(name, f) for name, f, _ in report.over(0.2)] == [("x", 2)]


def test_windows_tumble_counting_starts_over() -> None:
    ref = reference_from_samples(torch.randn(1000, 1))
    acc = DriftAccumulator({"x": ref}, window_rows=10)
    assert acc.observe({"x": torch.full((10, 1), 5.0)}, 10) is not None
    assert acc.observe({"x": torch.randn(5, 1)}, 5) is None


def test_per_channel_features_of_images() -> None:
    images = torch.randn(64, 3, 4, 4)
    ref = reference_from_samples(images, feature_dim=1)
    assert ref.features == 3
    acc = DriftAccumulator({"img": ref}, window_rows=64)
    images[:, 0] += 3
    report = acc.observe({"img": images}, 64)
    assert report is not None and [f for _, f, _ in report.over(0.2)] == [0]


def test_inputs_that_do_not_fit_the_reference_are_skipped() -> None:
    ref = reference_from_samples(torch.randn(100, 4))
    acc = DriftAccumulator({"x": ref}, window_rows=1)
    report = acc.observe({"x": torch.randn(3, 5), "other": torch.randn(3, 4)}, 3)
    assert report is not None and report.psi["x"] == (0.0, 0.0, 0.0, 0.0)
