"""Per-arm evidence of the seed selector, with exponential forgetting, serialisable to JSON.

One `JobTracker` holds the evidence of one scope: a job id, or `GLOBAL_SCOPE` for
decisions made outside any job. Within a scope an arm is a `(slot_id, blueprint)`
pair, so evidence is keyed by `(scope, slot_id, blueprint)`.

Forgetting (`DecayConfig`) multiplies all evidence of the scope by a factor, so old
outcomes weigh less than new ones:

- `gamma` per update: each reported outcome in the scope first discounts all of the
  scope's evidence by `gamma`, then adds the new outcome at weight 1. After k further
  reports an outcome weighs `gamma**k` (`gamma = 1` keeps everything). Counting in
  reports, not seconds, keeps decisions reproducible from the history alone.
- `half_life_s` in time: evidence also loses half its weight every `half_life_s`
  seconds of the caller's clock (`now` arguments).

Both may be set; their factors multiply. Since one factor applies to every arm of a
scope, arms keep their evidence in *stored units* and the scope keeps the one
factor (`JobTracker.scale(now)`): true value = stored value x scale. Decay then costs
nothing per arm; an outcome is added at weight `1 / scale`. When the scale gets
extreme, every arm is rescaled once (`renormalizations` counts it, since all stored
documents change then).

`pulls` (how often an arm was ever reported) never decays. An arm "has evidence"
while its `weight` is above 0; one without is tried first by every strategy.

LinUCB (disjoint, one ridge regression per arm): `A = lambda*I + sum w x x^T`,
`b = sum w r x`, kept as `A^-1` updated by Sherman-Morrison, never inverted per
decision. Decay scales `A` and `b` alike, which leaves `theta = A^-1 b` unchanged and
widens the confidence of stale arms. The regulariser decays with the rest, but is
topped back up to `lambda` when it falls below `lambda * _PRIOR_FLOOR` (one
inversion then), so `A^-1` stays well-conditioned and no arm is more uncertain than a
few times the prior. Outcomes are queued per arm (`lin_pending`) and folded into the
matrices (`ArmStats.fold_linear`) only when LinUCB reads them, or when `_FOLD_AT` are
queued: UCB1, Thompson and epsilon-greedy never pay for LinUCB, which still sees every
outcome.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from common.errors import IntegrityError

__all__ = [
    "GLOBAL_SCOPE",
    "Arm",
    "ArmStats",
    "DecayConfig",
    "JobTracker",
]

GLOBAL_SCOPE = "global"

# Rescale every arm when the scope's scale leaves [1e-100, 1e100].
_RENORMALIZE_BELOW = 1e-100
_RENORMALIZE_ABOVE = 1e100
# A scale below this (a long idle time under a half-life) forgets all evidence.
_FORGET_BELOW = 1e-290
# The LinUCB regulariser is restored to lambda when it decays below lambda times this.
_PRIOR_FLOOR = 0.25
# Queued LinUCB outcomes are folded in one by one (Sherman-Morrison) up to this many;
# beyond, one inversion is cheaper.
_SEQUENTIAL_FOLD_MAX = 8
# Fold when this many outcomes are queued, so memory and documents stay bounded.
_FOLD_AT = 256
_FORMAT_VERSION = 1

_Vector = np.ndarray[Any, np.dtype[np.float64]]


class Arm(NamedTuple):
    """A candidate growth: grow `blueprint` in seed slot `slot_id`."""

    slot_id: str
    blueprint: str


class DecayConfig(BaseModel):
    """How fast old outcomes fade; see the module docstring for the exact rule."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # A job's seed outcomes drift as the host trains: by default an outcome weighs half
    # as much after ~69 further reports.
    gamma: float = Field(
        0.99,
        gt=0,
        le=1,
        description="discount applied to all evidence of a job per reported outcome; 1 = none",
    )
    half_life_s: float | None = Field(
        None, gt=0, description="evidence halves every this many seconds; None = no time decay"
    )


class ArmStats:
    """The evidence about one arm in one scope, in the scope's stored units.

    Multiply by `JobTracker.scale(now)` for true values (ratios such as `mean` need
    not). `weight` is the discounted number of outcomes, `reward_sum`/`reward_sumsq`
    their discounted sums, `successes`/`failures` the discounted Beta counts (a reward
    r counts r successes and 1 - r failures, r clipped to [0, 1]). `binary` stays true
    while every reward so far was exactly 0 or 1. Owned and mutated by its tracker.
    """

    __slots__ = (
        "arm",
        "binary",
        "failures",
        "last_update",
        "lin_ainv",
        "lin_b",
        "lin_pending",
        "lin_prior",
        "lin_theta",
        "pulls",
        "reward_sum",
        "reward_sumsq",
        "ridge",
        "successes",
        "weight",
    )

    def __init__(self, arm: Arm, dim: int, ridge: float, scale: float) -> None:
        self.arm = arm
        self.pulls = 0
        self.weight = 0.0
        self.reward_sum = 0.0
        self.reward_sumsq = 0.0
        self.successes = 0.0
        self.failures = 0.0
        self.binary = True
        self.last_update: float | None = None
        self.ridge = ridge
        # The prior lambda*I, in stored units: A_stored = (lambda / scale) I.
        self.lin_prior = ridge / scale
        self.lin_ainv: _Vector = np.eye(dim) / self.lin_prior  # (d, d) stored A^-1
        self.lin_b: _Vector = np.zeros(dim)  # (d,) stored b
        self.lin_theta: _Vector = np.zeros(dim)  # (d,) A^-1 b, the same in any units
        # Outcomes not yet in the matrices: (x, reward, weight in stored units).
        self.lin_pending: list[tuple[tuple[float, ...], float, float]] = []

    @property
    def mean(self) -> float:
        """The discounted mean reward; 0.0 without evidence."""
        return self.reward_sum / self.weight if self.weight > 0 else 0.0

    def fold_linear(self, scale: float | None) -> None:
        """Bring `lin_ainv`, `lin_b`, `lin_theta` up to date with the queued outcomes.

        With the scope's current `scale`, also restores a decayed regulariser (see
        the module docstring); None leaves the regulariser as it is.
        """
        pending = self.lin_pending
        topup = scale is not None and self.lin_prior * scale < self.ridge * _PRIOR_FLOOR
        if not pending and not topup:
            return
        ainv = self.lin_ainv
        b = self.lin_b
        if topup or len(pending) > _SEQUENTIAL_FOLD_MAX:
            a = np.linalg.inv(ainv)  # (d, d) stored A
            if pending:
                xs = np.array([p[0] for p in pending])  # (k, d)
                ws = np.array([p[2] for p in pending])  # (k,)
                a += (xs.T * ws) @ xs
                b += xs.T @ (ws * np.array([p[1] for p in pending]))
            if scale is not None and topup:
                target = self.ridge / scale
                a[np.diag_indices_from(a)] += target - self.lin_prior
                self.lin_prior = target
            ainv = np.linalg.inv(a)
            self.lin_ainv = ainv
        else:
            for x, reward, w in pending:
                xv = np.array(x)
                u = ainv @ xv  # (d,) = A^-1 x; A^-1 is symmetric
                ainv -= (w / (1.0 + w * float(u @ xv))) * np.outer(u, u)
                b += (w * reward) * xv
        self.lin_theta = ainv @ b
        pending.clear()

    def _rescale(self, factor: float) -> None:
        self.weight *= factor
        self.reward_sum *= factor
        self.reward_sumsq *= factor
        self.successes *= factor
        self.failures *= factor
        self.lin_prior *= factor
        self.lin_ainv /= factor
        self.lin_b *= factor
        self.lin_pending = [(x, r, w * factor) for x, r, w in self.lin_pending]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy of this arm's evidence (stored units).

        Folds queued LinUCB outcomes in first when more than a few are queued, so
        documents stay small.
        """
        pending = self.lin_pending
        if len(pending) > _SEQUENTIAL_FOLD_MAX:
            # The regulariser is topped up here too (with the scale of the last outcome:
            # its weight is 1 / scale): under a strategy other than LinUCB nothing else
            # folds with a scale, and outcomes weighing ever more against a decayed
            # prior would make A singular within a few thousand reports.
            self.fold_linear(1.0 / pending[-1][2])
        return {
            "slot_id": self.arm.slot_id,
            "blueprint": self.arm.blueprint,
            "pulls": self.pulls,
            "weight": self.weight,
            "reward_sum": self.reward_sum,
            "reward_sumsq": self.reward_sumsq,
            "successes": self.successes,
            "failures": self.failures,
            "binary": self.binary,
            "last_update": self.last_update,
            "lin_prior": self.lin_prior,
            "lin_ainv": self.lin_ainv.tolist(),
            "lin_b": self.lin_b.tolist(),
            "lin_pending": [[list(x), r, w] for x, r, w in self.lin_pending],
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], dim: int, ridge: float) -> ArmStats:
        """The arm `to_dict` wrote; `IntegrityError` when the document does not fit."""
        try:
            stats = cls(Arm(str(doc["slot_id"]), str(doc["blueprint"])), dim, ridge, 1.0)
            stats.pulls = int(doc["pulls"])
            stats.weight = float(doc["weight"])
            stats.reward_sum = float(doc["reward_sum"])
            stats.reward_sumsq = float(doc["reward_sumsq"])
            stats.successes = float(doc["successes"])
            stats.failures = float(doc["failures"])
            stats.binary = bool(doc["binary"])
            last = doc["last_update"]
            stats.last_update = None if last is None else float(last)
            stats.lin_prior = float(doc["lin_prior"])
            ainv = np.array(doc["lin_ainv"], dtype=np.float64)
            b = np.array(doc["lin_b"], dtype=np.float64)
            stats.lin_pending = [
                (tuple(float(v) for v in x), float(r), float(w)) for x, r, w in doc["lin_pending"]
            ]
        except (KeyError, TypeError, ValueError) as exc:
            raise IntegrityError(f"malformed arm evidence: {exc!r}") from exc
        if (
            ainv.shape != (dim, dim)
            or b.shape != (dim,)
            or any(len(x) != dim for x, _, _ in stats.lin_pending)
        ):
            raise IntegrityError(
                f"arm {tuple(stats.arm)} has a LinUCB model of shape {ainv.shape}/{b.shape}, "
                f"the scope uses {dim} inputs"
            )
        stats.lin_ainv = ainv
        stats.lin_b = b
        stats.lin_theta = ainv @ b
        return stats


class JobTracker:
    """The evidence of one scope (a job, or `GLOBAL_SCOPE`): arms, step, feature names.

    `features` are the context feature names fixed for the scope; LinUCB models have
    `dim = len(features) + intercept` inputs (`[1, f1, ..., fd]` with the intercept).
    `step` counts the outcomes reported in the scope.
    """

    __slots__ = (
        "_feature_set",
        "_gamma",
        "_half_life",
        "_step_scale",
        "_t_ref",
        "_zero",
        "arms",
        "dim",
        "features",
        "intercept",
        "renormalizations",
        "ridge",
        "scope",
        "step",
    )

    def __init__(
        self,
        scope: str,
        features: Sequence[str] = (),
        *,
        decay: DecayConfig | None = None,
        ridge: float = 1.0,
        intercept: bool = True,
    ) -> None:
        names = tuple(features)
        if ridge <= 0:
            raise ValueError(f"ridge must be > 0, got {ridge}")
        if len(set(names)) != len(names):
            raise ValueError(f"feature names repeat: {list(names)}")
        if not names and not intercept:
            raise ValueError("a scope without features needs the intercept for LinUCB")
        decay = decay or DecayConfig()
        self.scope = scope
        self.features = names
        self._feature_set = frozenset(names)
        self.intercept = intercept
        self.dim = len(names) + int(intercept)
        self.ridge = ridge
        self.step = 0
        self.renormalizations = 0
        self.arms: dict[Arm, ArmStats] = {}
        self._zero = ((1.0,) if intercept else ()) + (0.0,) * len(names)
        self._gamma = decay.gamma
        self._half_life = decay.half_life_s
        self._step_scale = 1.0  # gamma ** (updates since the last renormalization)
        self._t_ref: float | None = None  # time origin of the half-life part of the scale

    # -- reading ----------------------------------------------------------------------

    def scale(self, now: float) -> float:
        """The factor from stored units to true values at time `now`."""
        scale = self._step_scale
        if self._half_life is not None:
            if self._t_ref is None:
                self._t_ref = now
            elif now > self._t_ref:
                scale *= 0.5 ** ((now - self._t_ref) / self._half_life)
        return scale

    def refreshed(self, arms: Iterable[Arm], now: float) -> tuple[list[ArmStats | None], float]:
        """Each arm's evidence (None: never reported) and the scale to read it with."""
        scale = self.scale(now)
        if not _RENORMALIZE_BELOW <= scale <= _RENORMALIZE_ABOVE:
            scale = self._renormalize(scale, now)
        get = self.arms.get
        return [get(arm) for arm in arms], scale

    def context_vector(self, features: Mapping[str, float] | None) -> tuple[float, ...]:
        """The LinUCB input for one slot's health features: missing names count as 0.

        Raises `KeyError` naming a feature that is not among the scope's features.
        """
        if not features:
            return self._zero
        if not self._feature_set.issuperset(features):
            raise KeyError(", ".join(sorted(set(features) - self._feature_set)))
        get = features.get
        values = [float(get(name, 0.0)) for name in self.features]
        return (1.0, *values) if self.intercept else tuple(values)

    # -- writing ----------------------------------------------------------------------

    def update(self, arm: Arm, reward: float, x: Sequence[float] | None, now: float) -> ArmStats:
        """Add one outcome of `arm` (context vector `x`, None: all features 0) at time `now`.

        Every update first discounts the scope's evidence by `gamma`, so the new
        outcome enters at weight 1.
        """
        if x is None:
            x = self._zero
        elif len(x) != self.dim:
            raise ValueError(f"context vector has {len(x)} values, the scope uses {self.dim}")
        self.step += 1
        self._step_scale *= self._gamma
        scale = self.scale(now)
        if not _RENORMALIZE_BELOW <= scale <= _RENORMALIZE_ABOVE:
            scale = self._renormalize(scale, now)
        w = 1.0 / scale
        stats = self.arms.get(arm)
        if stats is None:
            stats = ArmStats(arm, self.dim, self.ridge, scale)
            self.arms[arm] = stats
        stats.pulls += 1
        stats.weight += w
        stats.reward_sum += reward * w
        stats.reward_sumsq += reward * reward * w
        clipped = 0.0 if reward < 0.0 else 1.0 if reward > 1.0 else reward
        stats.successes += clipped * w
        stats.failures += (1.0 - clipped) * w
        if reward not in (0.0, 1.0):
            stats.binary = False
        stats.last_update = now
        pending = stats.lin_pending
        pending.append((x if type(x) is tuple else tuple(x), reward, w))
        if len(pending) >= _FOLD_AT:
            stats.fold_linear(scale)
        return stats

    def _renormalize(self, scale: float, now: float) -> float:
        # Evidence that underflows here is forgotten for good: its arm has no evidence.
        for stats in list(self.arms.values()):
            if scale >= _FORGET_BELOW:
                stats._rescale(scale)
            if scale < _FORGET_BELOW or stats.weight <= 0.0 or not 0 < stats.lin_prior < math.inf:
                fresh = ArmStats(stats.arm, self.dim, self.ridge, 1.0)
                fresh.pulls = stats.pulls
                fresh.last_update = stats.last_update
                self.arms[stats.arm] = fresh
        self._step_scale = 1.0
        if self._half_life is not None:
            self._t_ref = now
        self.renormalizations += 1
        return 1.0

    # -- JSON -------------------------------------------------------------------------

    def header_dict(self) -> dict[str, Any]:
        """The scope's own fields (everything but the arms), JSON-ready."""
        return {
            "v": _FORMAT_VERSION,
            "scope": self.scope,
            "features": list(self.features),
            "intercept": self.intercept,
            "ridge": self.ridge,
            "step": self.step,
            "step_scale": self._step_scale,
            "t_ref": self._t_ref,
            "renormalizations": self.renormalizations,
        }

    def to_dict(self) -> dict[str, Any]:
        """The whole scope, arms included, JSON-ready."""
        doc = self.header_dict()
        doc["arms"] = [stats.to_dict() for stats in self.arms.values()]
        return doc

    def to_json(self) -> str:
        """The whole scope as a JSON document (floats round-trip exactly)."""
        return json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_parts(
        cls,
        header: Mapping[str, Any],
        arms: Iterable[Mapping[str, Any]],
        *,
        decay: DecayConfig | None = None,
    ) -> JobTracker:
        """The scope from `header_dict()` and its arms' `ArmStats.to_dict()` documents.

        Decay is configuration, not state: pass the same again.
        """
        try:
            if header["v"] != _FORMAT_VERSION:
                raise IntegrityError(f"unknown tracker format version {header['v']!r}")
            tracker = cls(
                str(header["scope"]),
                [str(name) for name in header["features"]],
                decay=decay,
                ridge=float(header["ridge"]),
                intercept=bool(header["intercept"]),
            )
            tracker.step = int(header["step"])
            tracker._step_scale = float(header["step_scale"])
            t_ref = header["t_ref"]
            tracker._t_ref = None if t_ref is None else float(t_ref)
            tracker.renormalizations = int(header["renormalizations"])
        except (KeyError, TypeError, ValueError) as exc:
            raise IntegrityError(f"malformed tracker header: {exc!r}") from exc
        for doc in arms:
            stats = ArmStats.from_dict(doc, tracker.dim, tracker.ridge)
            tracker.arms[stats.arm] = stats
        return tracker

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], *, decay: DecayConfig | None = None) -> JobTracker:
        """The scope `to_dict` wrote (decay passed again, as for `from_parts`)."""
        arms = doc.get("arms")
        if not isinstance(arms, list):
            raise IntegrityError("tracker document has no 'arms' list")
        return cls.from_parts(doc, arms, decay=decay)

    @classmethod
    def from_json(cls, text: str | bytes, *, decay: DecayConfig | None = None) -> JobTracker:
        """The scope `to_json` wrote; `IntegrityError` when it is not such a document."""
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise IntegrityError(f"tracker document is not JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise IntegrityError("tracker document is not a JSON object")
        return cls.from_dict(doc, decay=decay)
