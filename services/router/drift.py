"""Input drift: the population stability index (PSI) of recent inputs against a version's
reference statistics, per feature. No I/O.

Reference statistics (`manifest.json`, key `input_reference`)
-------------------------------------------------------------

Written by whoever registers the model (the trainer), from its training inputs;
the schema, `InputReference`, `ReferenceStatistics` and `reference_from_samples`
are defined once in `common.drift` and re-exported here.

`reference_from_samples` computes this from a reference tensor. A version
without `input_reference` but with the registry's per-feature `mean` and `std`
(the registry's `ReferenceStatistics` message) is checked against a normal approximation: edges at
`mean + std * z_k` for the deciles `z_k` of the standard normal, 10% per bin
(`reference_from_moments`).

PSI
---

Over a window of recent rows, with `a_i` the observed and `e_i` the reference
share of bin i, both floored at `1e-4` so an empty bin stays finite:
`PSI = sum_i (a_i - e_i) * ln(a_i / e_i)`. By the usual reading, below 0.1 is
stable, 0.1 to 0.25 a moderate shift, above 0.25 a major one. Windows tumble:
each `window_rows` observed rows give one PSI per feature, then counting starts
over.
"""

from __future__ import annotations

import math
import statistics
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from common.drift import DECILES, InputReference, ReferenceStatistics, reference_from_samples

__all__ = [
    "PSI_FLOOR",
    "DriftAccumulator",
    "DriftReport",
    "InputReference",
    "ReferenceStatistics",
    "psi",
    "reference_from_moments",
    "reference_from_samples",
]

PSI_FLOOR = 1e-4


def psi(expected: Sequence[float], observed_counts: Sequence[float]) -> float:
    """The PSI of observed bin counts against the expected bin shares (0 with no counts)."""
    if len(expected) != len(observed_counts):
        raise ValueError(f"{len(expected)} expected shares, {len(observed_counts)} counts")
    total = float(sum(observed_counts))
    if total <= 0:
        return 0.0
    value = 0.0
    for e, count in zip(expected, observed_counts, strict=True):
        a = max(count / total, PSI_FLOOR)
        e_ = max(e, PSI_FLOOR)
        value += (a - e_) * math.log(a / e_)
    return value


def reference_from_moments(
    mean: Sequence[float], std: Sequence[float], feature_dim: int = 1
) -> InputReference | None:
    """A normal approximation per feature (decile edges), or None when the moments are unusable."""
    if not mean or len(mean) != len(std):
        return None
    if any(not math.isfinite(m) for m in mean) or any(not math.isfinite(s) or s <= 0 for s in std):
        return None
    normal = statistics.NormalDist()
    z = [normal.inv_cdf(k / DECILES) for k in range(1, DECILES)]
    return InputReference(
        feature_dim=feature_dim,
        edges=[[m + s * zk for zk in z] for m, s in zip(mean, std, strict=True)],
        proportions=[[1.0 / DECILES] * DECILES for _ in mean],
    )


@dataclass(frozen=True, slots=True)
class DriftReport:
    """The PSI of every feature of every input over one finished window of `rows` rows."""

    rows: int
    psi: Mapping[str, tuple[float, ...]]

    def over(self, threshold: float) -> list[tuple[str, int, float]]:
        """`(input, feature, psi)` for every feature whose PSI exceeds `threshold`."""
        return [
            (name, f, value)
            for name, values in self.psi.items()
            for f, value in enumerate(values)
            if value > threshold
        ]


class DriftAccumulator:
    """Bin counts of one version's recent inputs, in tumbling windows of `window_rows` rows.

    Thread-safe: replica threads call `observe`. Inputs the reference does not
    cover, or whose shape does not fit it, are skipped.
    """

    def __init__(self, reference: Mapping[str, InputReference], window_rows: int) -> None:
        self._lock = threading.Lock()
        self._window_rows = window_rows
        self._edges = {
            name: torch.tensor(ref.edges, dtype=torch.float32) for name, ref in reference.items()
        }
        self._expected = {name: ref.proportions for name, ref in reference.items()}
        self._feature_dim = {name: ref.feature_dim for name, ref in reference.items()}
        self._counts = {
            name: torch.zeros(ref.features, len(ref.edges[0]) + 1, dtype=torch.float64)
            for name, ref in reference.items()
        }
        self._rows = 0

    @property
    def inputs(self) -> list[str]:
        return list(self._edges)

    def observe(self, named: Mapping[str, torch.Tensor], rows: int) -> DriftReport | None:
        """Count a batch of `rows` rows; the report of the window when this batch closed one."""
        binned: dict[str, torch.Tensor] = {}
        for name, tensor in named.items():
            edges = self._edges.get(name)
            if edges is None:
                continue
            dim = self._feature_dim[name]
            if tensor.dim() <= dim or tensor.shape[dim] != edges.shape[0]:
                continue
            flat = tensor.detach().movedim(dim, 0).reshape(edges.shape[0], -1)
            flat = flat.to(device="cpu", dtype=torch.float32).contiguous()
            idx = torch.searchsorted(edges, flat)
            counts = torch.zeros_like(self._counts[name])
            counts.scatter_add_(1, idx, torch.ones(idx.shape, dtype=torch.float64))
            binned[name] = counts
        with self._lock:
            for name, counts in binned.items():
                self._counts[name] += counts
            self._rows += rows
            if self._rows < self._window_rows:
                return None
            report = DriftReport(
                rows=self._rows,
                psi={
                    name: tuple(
                        psi(expected, row)
                        for expected, row in zip(self._expected[name], counts.tolist(), strict=True)
                    )
                    for name, counts in self._counts.items()
                },
            )
            for counts in self._counts.values():
                counts.zero_()
            self._rows = 0
            return report
