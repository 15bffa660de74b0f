"""The supervisor's pure decisions: dependency levels, stop order, dependents, restarts."""

from __future__ import annotations

import random

import pytest

from common.config import RestartSettings
from services.supervisor.graph import dependents, start_levels, stop_order
from services.supervisor.policy import ExitCause, decide_restart

DIAMOND = {"top": [], "left": ["top"], "right": ["top"], "bottom": ["left", "right"]}


def test_levels_of_a_diamond() -> None:
    assert start_levels(DIAMOND) == [["top"], ["left", "right"], ["bottom"]]


def test_external_dependencies_do_not_delay_a_level() -> None:
    assert start_levels({"router": ["registry"], "web": ["router"]}) == [["router"], ["web"]]


def test_stop_order_is_reverse_topological() -> None:
    order = stop_order(DIAMOND)
    assert order[0] == "bottom" and order[-1] == "top"
    assert set(order[1:3]) == {"left", "right"}


def test_dependents_are_transitive_and_in_start_order() -> None:
    assert dependents(DIAMOND, "top") == ["left", "right", "bottom"]
    assert dependents(DIAMOND, "left") == ["bottom"]
    assert dependents(DIAMOND, "bottom") == []


def test_levels_reject_a_cycle() -> None:
    with pytest.raises(ValueError, match="dependency cycle"):
        start_levels({"a": ["b"], "b": ["a"]})


@pytest.mark.parametrize(
    ("policy", "cause", "code", "restart"),
    [
        ("on-failure", ExitCause.EXITED, 0, False),
        ("on-failure", ExitCause.EXITED, 1, True),
        ("on-failure", ExitCause.EXITED, -9, True),
        ("on-failure", ExitCause.UNHEALTHY, None, True),
        ("always", ExitCause.EXITED, 0, True),
        ("never", ExitCause.EXITED, 1, False),
        ("never", ExitCause.UNHEALTHY, None, False),
    ],
)
def test_restart_policy_table(
    policy: str, cause: ExitCause, code: int | None, restart: bool
) -> None:
    settings = RestartSettings(policy=policy, backoff_initial_s=0.5, backoff_max_s=30)
    decision = decide_restart(settings, cause, code, 0, random.Random(1))
    assert decision.restart is restart


def test_backoff_grows_and_is_capped() -> None:
    settings = RestartSettings(policy="always", backoff_initial_s=0.5, backoff_max_s=8)
    rng = random.Random(7)
    means = []
    for attempt in range(8):
        delays = [
            decide_restart(settings, ExitCause.EXITED, 1, attempt, rng).delay_s for _ in range(200)
        ]
        assert max(delays) <= 8
        means.append(sum(delays) / len(delays))
    assert means[3] > means[0] * 3  # exponential growth on average
    assert means[-1] <= 8
