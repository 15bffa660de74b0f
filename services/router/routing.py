"""The routing policy: which version serves a request, then which replica. Pure, no I/O.

Choosing the version (`plan`)
-----------------------------

A request by alias carries the alias's route: targets `(version v, weight w_v)`,
the weights normalised to shares `s_v = w_v / sum(w)` (`shares`). Each version
also has what the router measured and knows about it: whether it can serve now
(`available`: loaded, not draining, not ejected), its predicted latency `L_v`
(EWMA of the time a request spends at the version, queue included) and cost per
request `C_v` (the cheapest of its healthy replicas), and the value `Q_v` of the
model's quality metric (registry metrics). The request brings its remaining time
budget `B`, its cost ceiling `M` and the route's quality floor `F`.

1. **Hard constraints.** `ok(v) = Q_v meets F  and  C_v <= M`. An unmeasured
   cost counts as 0 (so a new version can be measured); a version without the
   floor's metric fails the floor.
2. **Deadline.** `fast(v) = L_v <= B`, an unmeasured latency counting as 0.
3. **Weighted split (canary).** Among the available targets with `s_v > 0`,
   draw `d` with probability proportional to `s_v` (one uniform number `u`).
   This is the operator's intended split, so it wins whenever `d` fits:
   `ok(d) and fast(d)` -> serve `d`.
4. **Cost-aware choice** when `d` does not fit: the cheapest available target
   that does, ordering by `(C_v, L_v, -s_v, v)`. When no target meets the
   deadline, the fastest one meeting the hard constraints is tried anyway (the
   deadline is enforced while it runs: an estimate is not a verdict).
5. **Fallbacks.** After the chosen version come the other available targets
   meeting the hard constraints (cheapest first), then the alias's earlier
   versions still loaded (newest first). The caller tries them in order when a
   version fails retryably, so the previous version takes over from a failing
   new one.

When nothing is available the plan is empty with `Refusal.UNAVAILABLE`; when
versions are available but none meets the hard constraints, the refusal names
which (`OVER_MAX_COST` -> RESOURCE_EXHAUSTED, `BELOW_QUALITY_FLOOR`).

Choosing the replica (`pick_replica`)
-------------------------------------

Power of two choices: draw two distinct candidates at random and keep the less
loaded, where the load of a replica is its expected completion time for one
more request, `(in_flight + 1) * max(latency_us, 1)` (the "peak EWMA" idea),
when both latencies are known, and `in_flight` otherwise; ties go to the first
drawn. With one candidate it is that one. Drawing two instead of scanning all
keeps the choice O(1) and avoids herding every request onto the one replica
that looked best a moment ago.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from common.errors import InvalidArgumentError

__all__ = [
    "Constraints",
    "Plan",
    "Refusal",
    "ReplicaLoad",
    "RouteTarget",
    "VersionView",
    "normalise_targets",
    "pick_replica",
    "plan",
    "replica_load",
    "shares",
]


@dataclass(frozen=True, slots=True)
class RouteTarget:
    """A share of an alias's traffic: `weight` is relative, >= 0."""

    version: int
    weight: float


def normalise_targets(
    targets: Sequence[RouteTarget], field: str = "targets"
) -> tuple[RouteTarget, ...]:
    """The targets of a valid route, sorted by version; `InvalidArgumentError` naming the field.

    Versions must be >= 1 and distinct, weights finite and >= 0 with at least one
    positive. An empty sequence is valid (it clears a route) and stays empty.
    """
    seen: set[int] = set()
    for i, target in enumerate(targets):
        if target.version < 1:
            raise InvalidArgumentError(
                f"must be >= 1, got {target.version}", f"{field}[{i}].version"
            )
        if target.version in seen:
            raise InvalidArgumentError(
                f"version {target.version} appears twice", f"{field}[{i}].version"
            )
        seen.add(target.version)
        if not math.isfinite(target.weight) or target.weight < 0:
            raise InvalidArgumentError(
                f"must be finite and >= 0, got {target.weight}", f"{field}[{i}].weight"
            )
    if targets and not any(t.weight > 0 for t in targets):
        raise InvalidArgumentError("at least one weight must be positive", field)
    return tuple(sorted(targets, key=lambda t: t.version))


def shares(targets: Sequence[RouteTarget]) -> dict[int, float]:
    """Each target's share of the traffic: its weight over the sum (all 0 when the sum is 0)."""
    total = sum(t.weight for t in targets)
    return {t.version: (t.weight / total if total > 0 else 0.0) for t in targets}


@dataclass(frozen=True, slots=True)
class VersionView:
    """What the policy knows about one version; None means not measured / not known."""

    version: int
    available: bool
    latency_us: float | None = None
    cost: float | None = None
    quality: float | None = None


@dataclass(frozen=True, slots=True)
class Constraints:
    """The request's limits: remaining time budget, cost ceiling and the route's quality floor.

    `quality_min`/`quality_max`: the version's metric must be >= / <= this.
    """

    budget_us: float | None = None
    max_cost: float | None = None
    quality_min: float | None = None
    quality_max: float | None = None

    def meets_quality(self, view: VersionView) -> bool:
        if self.quality_min is None and self.quality_max is None:
            return True
        if view.quality is None:
            return False
        if self.quality_min is not None and view.quality < self.quality_min:
            return False
        return not (self.quality_max is not None and view.quality > self.quality_max)

    def meets_cost(self, view: VersionView) -> bool:
        return self.max_cost is None or (view.cost or 0.0) <= self.max_cost

    def meets_deadline(self, view: VersionView) -> bool:
        return self.budget_us is None or (view.latency_us or 0.0) <= self.budget_us


class Refusal(StrEnum):
    """Why a plan is empty."""

    UNAVAILABLE = "unavailable"
    OVER_MAX_COST = "over_max_cost"
    BELOW_QUALITY_FLOOR = "below_quality_floor"


@dataclass(frozen=True, slots=True)
class Plan:
    """Versions to try in order (first: the choice), or why there is none, and why."""

    order: tuple[int, ...]
    reason: str
    refusal: Refusal | None = None


def _cost_key(view: VersionView, share: float) -> tuple[float, float, float, int]:
    return (view.cost or 0.0, view.latency_us or 0.0, -share, view.version)


def plan(
    targets: Sequence[RouteTarget],
    views: Sequence[VersionView],
    constraints: Constraints,
    u: float,
    fallbacks: Sequence[int] = (),
) -> Plan:
    """The versions to try for one request by alias (the module docstring has the formula).

    `views` describes the route's versions and the `fallbacks` (the alias's
    earlier versions, newest first); a version without a view counts as
    unavailable. `u` is a uniform number in [0, 1) that draws the weighted split.
    """
    by_version = {v.version: v for v in views}
    share = shares(targets)
    live = [
        by_version[t.version]
        for t in targets
        if share[t.version] > 0 and t.version in by_version and by_version[t.version].available
    ]
    spare = [
        by_version[v]
        for v in dict.fromkeys(fallbacks)
        if v in by_version and by_version[v].available and v not in {x.version for x in live}
    ]
    if not live and not spare:
        return Plan((), "no version of the route can serve now", Refusal.UNAVAILABLE)

    def hard_ok(view: VersionView) -> bool:
        return constraints.meets_quality(view) and constraints.meets_cost(view)

    candidates = [v for v in live if hard_ok(v)]
    if not candidates:
        backups = [v for v in spare if hard_ok(v)]
        if backups:
            return Plan(
                tuple(v.version for v in backups),
                "no route target meets the constraints; earlier version(s) serve",
            )
        everything = live + spare
        if not any(constraints.meets_quality(v) for v in everything):
            return Plan(
                (), "no available version meets the quality floor", Refusal.BELOW_QUALITY_FLOOR
            )
        return Plan((), "no available version fits max_cost", Refusal.OVER_MAX_COST)

    drawn = _draw(live, share, u)
    if drawn is not None and hard_ok(drawn) and constraints.meets_deadline(drawn):
        first, reason = drawn, f"weighted split drew v{drawn.version}"
    else:
        fitting = [v for v in candidates if constraints.meets_deadline(v)]
        if fitting:
            first = min(fitting, key=lambda v: _cost_key(v, share[v.version]))
            reason = f"cheapest version in time and budget: v{first.version}"
        else:
            first = min(candidates, key=lambda v: (v.latency_us or 0.0, v.version))
            reason = f"no version predicted in time; fastest: v{first.version}"
    rest = sorted(
        (v for v in candidates if v.version != first.version),
        key=lambda v: _cost_key(v, share[v.version]),
    )
    backups = [v for v in spare if hard_ok(v)]
    order = (first.version, *(v.version for v in rest), *(v.version for v in backups))
    return Plan(order, reason)


def _draw(live: Sequence[VersionView], share: dict[int, float], u: float) -> VersionView | None:
    total = sum(share[v.version] for v in live)
    if total <= 0:
        return None
    point = min(max(u, 0.0), math.nextafter(1.0, 0.0)) * total
    acc = 0.0
    for view in live:
        acc += share[view.version]
        if point < acc:
            return view
    return live[-1]


@dataclass(frozen=True, slots=True)
class ReplicaLoad:
    """A replica as the picker sees it."""

    replica_id: str
    in_flight: int
    latency_us: float | None = None


def replica_load(replica: ReplicaLoad, other: ReplicaLoad) -> tuple[float, float]:
    """The loads of `replica` and `other` on one comparable scale (see the module docstring)."""
    if replica.latency_us is not None and other.latency_us is not None:
        return (
            (replica.in_flight + 1) * max(replica.latency_us, 1.0),
            (other.in_flight + 1) * max(other.latency_us, 1.0),
        )
    return float(replica.in_flight), float(other.in_flight)


def pick_replica(candidates: Sequence[ReplicaLoad], rng: random.Random) -> ReplicaLoad | None:
    """Power of two choices among `candidates` (None when there is none)."""
    if not candidates:
        return None
    if len(candidates) == 1:
        return candidates[0]
    i, j = rng.sample(range(len(candidates)), 2)
    first, second = candidates[i], candidates[j]
    load_first, load_second = replica_load(first, second)
    return second if load_second < load_first else first
