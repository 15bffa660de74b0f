"""The routing policy: route validation, the weighted split, cost and deadline, fallbacks, p2c."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from common.errors import InvalidArgumentError
from services.router import (
    Constraints,
    Refusal,
    ReplicaLoad,
    RouteTarget,
    VersionView,
    normalise_targets,
    pick_replica,
    plan,
    shares,
)

CANARY = (RouteTarget(1, 9.0), RouteTarget(2, 1.0))


def views(*items: VersionView) -> list[VersionView]:
    return list(items)


def test_targets_are_sorted_and_weights_normalised_to_shares() -> None:
    targets = normalise_targets([RouteTarget(3, 1.0), RouteTarget(1, 3.0)])
    assert [t.version for t in targets] == [1, 3]
    assert shares(targets) == {1: 0.75, 3: 0.25}


@pytest.mark.parametrize(
    ("targets", "field"),
    [
        ([RouteTarget(0, 1.0)], "targets[0].version"),
        ([RouteTarget(1, 1.0), RouteTarget(1, 2.0)], "targets[1].version"),
        ([RouteTarget(1, -1.0)], "targets[0].weight"),
        ([RouteTarget(1, float("nan"))], "targets[0].weight"),
        ([RouteTarget(1, 0.0), RouteTarget(2, 0.0)], "targets"),
    ],
)
def test_invalid_routes_name_the_field(targets: list[RouteTarget], field: str) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        normalise_targets(targets)
    assert err.value.field == field


def test_an_empty_route_is_valid_and_clears() -> None:
    assert normalise_targets([]) == ()


def test_weighted_split_follows_the_weights() -> None:
    available = views(VersionView(1, True), VersionView(2, True))
    rng = random.Random(7)
    drawn = Counter(
        plan(CANARY, available, Constraints(), rng.random()).order[0] for _ in range(5000)
    )
    assert 0.87 < drawn[1] / 5000 < 0.93
    assert drawn[1] + drawn[2] == 5000


def test_the_split_point_is_exact_on_u() -> None:
    available = views(VersionView(1, True), VersionView(2, True))
    assert plan(CANARY, available, Constraints(), 0.0).order[0] == 1
    assert plan(CANARY, available, Constraints(), 0.8999).order[0] == 1
    assert plan(CANARY, available, Constraints(), 0.9).order[0] == 2
    assert plan(CANARY, available, Constraints(), 0.999999).order[0] == 2


def test_other_targets_follow_the_choice_as_fallbacks_cheapest_first() -> None:
    targets = (RouteTarget(1, 1.0), RouteTarget(2, 1.0), RouteTarget(3, 1.0))
    available = views(
        VersionView(1, True, cost=3.0),
        VersionView(2, True, cost=1.0),
        VersionView(3, True, cost=2.0),
    )
    assert plan(targets, available, Constraints(), 0.0).order == (1, 2, 3)


def test_an_unavailable_target_gets_no_traffic() -> None:
    available = views(VersionView(1, False), VersionView(2, True))
    for u in (0.0, 0.5, 0.95):
        assert plan(CANARY, available, Constraints(), u).order == (2,)


def test_a_drawn_version_too_slow_for_the_deadline_gives_way_to_the_cheapest_in_time() -> None:
    targets = (RouteTarget(1, 1.0), RouteTarget(2, 1.0), RouteTarget(3, 1.0))
    available = views(
        VersionView(1, True, latency_us=9000, cost=0.1),
        VersionView(2, True, latency_us=800, cost=5.0),
        VersionView(3, True, latency_us=900, cost=2.0),
    )
    chosen = plan(targets, available, Constraints(budget_us=1000), 0.0)
    assert chosen.order[0] == 3
    assert "cheapest" in chosen.reason


def test_when_nothing_is_predicted_in_time_the_fastest_is_tried() -> None:
    targets = (RouteTarget(1, 1.0), RouteTarget(2, 1.0))
    available = views(VersionView(1, True, latency_us=5000), VersionView(2, True, latency_us=3000))
    chosen = plan(targets, available, Constraints(budget_us=100), 0.0)
    assert chosen.order[0] == 2 and chosen.refusal is None


def test_unmeasured_versions_count_as_in_time_and_free() -> None:
    available = views(VersionView(1, True), VersionView(2, True))
    chosen = plan(CANARY, available, Constraints(budget_us=1, max_cost=0.0), 0.0)
    assert chosen.order[0] == 1


def test_max_cost_excludes_expensive_versions_and_refuses_when_none_fits() -> None:
    available = views(VersionView(1, True, cost=2.0), VersionView(2, True, cost=0.5))
    assert plan(CANARY, available, Constraints(max_cost=1.0), 0.0).order == (2,)
    refused = plan(CANARY, available, Constraints(max_cost=0.1), 0.0)
    assert refused.order == () and refused.refusal is Refusal.OVER_MAX_COST


def test_quality_floor_excludes_versions_below_it_or_without_the_metric() -> None:
    available = views(VersionView(1, True, quality=0.8), VersionView(2, True, quality=0.95))
    assert plan(CANARY, available, Constraints(quality_min=0.9), 0.0).order == (2,)
    unknown = views(VersionView(1, True), VersionView(2, True))
    refused = plan(CANARY, unknown, Constraints(quality_min=0.9), 0.0)
    assert refused.refusal is Refusal.BELOW_QUALITY_FLOOR
    lower_is_better = views(VersionView(1, True, quality=0.3), VersionView(2, True, quality=0.1))
    assert plan(CANARY, lower_is_better, Constraints(quality_max=0.2), 0.0).order == (2,)


def test_earlier_versions_come_last_and_take_over_when_no_target_can_serve() -> None:
    targets = (RouteTarget(3, 1.0),)
    available = views(VersionView(3, True), VersionView(2, True), VersionView(1, True))
    assert plan(targets, available, Constraints(), 0.5, fallbacks=[2, 1]).order == (3, 2, 1)
    loading = views(VersionView(3, False), VersionView(2, True))
    chosen = plan(targets, loading, Constraints(), 0.5, fallbacks=[2])
    assert chosen.order == (2,) and chosen.refusal is None


def test_nothing_available_is_refused_as_unavailable() -> None:
    chosen = plan(CANARY, views(VersionView(1, False)), Constraints(), 0.5, fallbacks=[7])
    assert chosen.order == () and chosen.refusal is Refusal.UNAVAILABLE


def test_p2c_picks_the_less_loaded_of_two() -> None:
    busy = ReplicaLoad("busy", in_flight=5)
    idle = ReplicaLoad("idle", in_flight=0)
    rng = random.Random(1)
    assert all(pick_replica([busy, idle], rng) is idle for _ in range(50))


def test_p2c_weighs_load_by_latency_when_known() -> None:
    slow = ReplicaLoad("slow", in_flight=0, latency_us=1000)
    fast_but_busy = ReplicaLoad("fast", in_flight=2, latency_us=100)
    assert pick_replica([slow, fast_but_busy], random.Random(0)) is fast_but_busy


def test_p2c_never_picks_the_most_loaded_of_many_and_spreads_over_the_rest() -> None:
    replicas = [ReplicaLoad(f"r{i}", in_flight=i) for i in range(4)]
    rng = random.Random(3)
    picked = Counter(pick_replica(replicas, rng).replica_id for _ in range(2000))  # type: ignore[union-attr]
    assert picked["r3"] == 0
    assert picked["r0"] > picked["r1"] > picked["r2"] > 0


def test_p2c_with_one_or_no_candidate() -> None:
    only = ReplicaLoad("only", in_flight=9)
    assert pick_replica([only], random.Random()) is only
    assert pick_replica([], random.Random()) is None
