"""The shared drift reference: one definition, written by exporters and read by the router."""

from __future__ import annotations

import json

import pytest
import torch

from common.drift import (
    INPUT_REFERENCE_KEY,
    InputReference,
    ReferenceStatistics,
    input_reference,
    reference_from_samples,
)
from services import router


def test_the_router_uses_the_one_shared_definition() -> None:
    assert router.InputReference is InputReference
    assert router.ReferenceStatistics is ReferenceStatistics
    assert router.reference_from_samples is reference_from_samples
    assert INPUT_REFERENCE_KEY == "input_reference"


def test_input_reference_is_json_the_schema_reads_back() -> None:
    samples = {"x": torch.randn(400, 2), "z": torch.rand(300, 3, 2, 2)}
    value = json.loads(json.dumps(input_reference(samples)))
    assert value["schema"] == 1 and value["sample_count"] == 300
    parsed = ReferenceStatistics.model_validate(value)
    assert parsed.inputs["x"] == reference_from_samples(samples["x"])
    assert parsed.inputs["z"].features == 3 and parsed.inputs["z"].feature_dim == 1


def test_deciles_put_a_tenth_of_the_samples_in_each_bin() -> None:
    ref = reference_from_samples(torch.randn(10_000, 2))
    for shares in ref.proportions:
        assert shares == pytest.approx([0.1] * 10, abs=0.01)


def test_a_feature_with_more_elements_than_quantile_takes_gets_edges_from_a_subset() -> None:
    # One feature of 2**24 + 1 elements: one more than torch.quantile takes.
    samples = torch.rand((1 << 24) + 1, 1, dtype=torch.float32)
    ref = reference_from_samples(samples)
    assert ref.edges[0] == pytest.approx([k / 10 for k in range(1, 10)], abs=0.01)
    assert sum(ref.proportions[0]) == pytest.approx(1.0)


def test_a_tensor_without_the_feature_dimension_is_refused() -> None:
    with pytest.raises(ValueError, match="no dimension 1"):
        reference_from_samples(torch.randn(10))
