"""The drift reference of a model's inputs, as `manifest.json` carries it. No I/O.

Whoever exports a model (the trainer) writes it with `reference_from_samples`;
the router reads it back with `ReferenceStatistics` and measures drift against
it. This module is the one definition both sides share.

Schema (`manifest.json`, key `input_reference`)
-----------------------------------------------

::

    "input_reference": {
      "schema": 1,
      "sample_count": 5000,
      "inputs": {
        "x": {
          "feature_dim": 1,
          "edges":       [[-1.28, -0.84, ..., 1.28], ...],
          "proportions": [[0.1, 0.1, ..., 0.1], ...]
        }
      }
    }

- `inputs` is keyed by the input's name in the model's input signature.
- `feature_dim`: the dimension that indexes features (1 for `(N, F)` tables and
  for `(N, C, H, W)` images, per channel); every other element of the input
  counts towards its feature's distribution.
- `edges[f]`: the K interior cut points of feature f, non-decreasing (e.g. the
  deciles of the reference data, K = 9). They make K + 1 bins: bin 0 is
  `(-inf, e_0]`, bin i is `(e_{i-1}, e_i]`, bin K is `(e_{K-1}, +inf)`. Every
  feature of one input has the same K.
- `proportions[f]`: the share of the reference elements in each of the K + 1
  bins (they sum to 1).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import Any, Final

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "DECILES",
    "INPUT_REFERENCE_KEY",
    "REFERENCE_SCHEMA",
    "InputReference",
    "ReferenceStatistics",
    "input_reference",
    "reference_from_samples",
]

INPUT_REFERENCE_KEY: Final = "input_reference"
REFERENCE_SCHEMA: Final = 1
DECILES: Final = 10
# torch.quantile refuses inputs over 2**24 elements; past this many elements per
# feature the edges come from an evenly spaced subset (still far below 1% error).
_MAX_QUANTILE_ELEMENTS: Final = 1 << 22


class InputReference(BaseModel):
    """The reference distribution of one input's features (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    feature_dim: int = Field(1, ge=0)
    edges: list[list[float]] = Field(min_length=1)
    proportions: list[list[float]] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> InputReference:
        if len(self.edges) != len(self.proportions):
            raise ValueError(
                f"edges has {len(self.edges)} features, proportions {len(self.proportions)}"
            )
        bins = len(self.edges[0])
        for f, (cuts, shares) in enumerate(zip(self.edges, self.proportions, strict=True)):
            if len(cuts) != bins:
                raise ValueError(f"feature {f} has {len(cuts)} edges, feature 0 has {bins}")
            if any(not math.isfinite(c) for c in cuts) or any(
                b < a for a, b in itertools.pairwise(cuts)
            ):
                raise ValueError(f"edges of feature {f} must be finite and non-decreasing")
            if len(shares) != bins + 1:
                raise ValueError(f"feature {f} needs {bins + 1} proportions, has {len(shares)}")
            if any(not math.isfinite(s) or s < 0 for s in shares) or not math.isclose(
                sum(shares), 1.0, abs_tol=1e-3
            ):
                raise ValueError(f"proportions of feature {f} must be >= 0 and sum to 1")
        return self

    @property
    def features(self) -> int:
        return len(self.edges)


class ReferenceStatistics(BaseModel):
    """`manifest.json`'s `input_reference`: per input, its reference distribution."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = Field(REFERENCE_SCHEMA, alias="schema")
    sample_count: int = Field(0, ge=0)
    inputs: dict[str, InputReference] = {}


def reference_from_samples(
    samples: torch.Tensor, feature_dim: int = 1, bins: int = DECILES
) -> InputReference:
    """The reference of one input from a tensor of reference data: quantile edges and shares."""
    if samples.dim() <= feature_dim:
        raise ValueError(f"a tensor of {samples.dim()} dims has no dimension {feature_dim}")
    flat = samples.detach().movedim(feature_dim, 0).reshape(samples.shape[feature_dim], -1)
    flat = flat.to(torch.float64)
    subset = flat
    if flat.shape[1] > _MAX_QUANTILE_ELEMENTS:
        picks = torch.linspace(0, flat.shape[1] - 1, _MAX_QUANTILE_ELEMENTS).long()
        subset = flat[:, picks]
    qs = torch.linspace(0, 1, bins + 1, dtype=torch.float64)[1:-1]
    edges = torch.quantile(subset, qs, dim=1).T.contiguous()  # (F, bins - 1)
    idx = torch.searchsorted(edges, flat.contiguous())
    counts = torch.zeros(flat.shape[0], bins, dtype=torch.float64)
    counts.scatter_add_(1, idx, torch.ones_like(flat))
    proportions = counts / counts.sum(dim=1, keepdim=True)
    return InputReference(
        feature_dim=feature_dim, edges=edges.tolist(), proportions=proportions.tolist()
    )


def input_reference(
    samples: Mapping[str, torch.Tensor], feature_dim: int = 1, bins: int = DECILES
) -> dict[str, Any]:
    """The JSON value of `input_reference` for reference tensors by input name, each
    `(N, ...)` with its features along `feature_dim`. `sample_count` is the smallest N."""
    statistics = ReferenceStatistics.model_validate(
        {
            "schema": REFERENCE_SCHEMA,
            "sample_count": min((int(t.shape[0]) for t in samples.values()), default=0),
            "inputs": {
                name: reference_from_samples(t, feature_dim, bins) for name, t in samples.items()
            },
        }
    )
    return statistics.model_dump(mode="json", by_alias=True)
