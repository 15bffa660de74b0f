"""AlertEngine: grouping, floods, inhibition, supervisor events, ids, state."""

from __future__ import annotations

import json

import pytest

from services.alerts.engine import AlertEngine
from services.alerts.model import Alert, ErrorEvent
from services.alerts.rules import AlertRules, parse_rules
from tests.unit.alerts.factories import T0, agent_event, error

# db <- registry <- trainer; router stands apart.
DEPENDENCIES = {"db": [], "registry": ["db"], "trainer": ["registry"], "router": []}


def feed(engine: AlertEngine, events: list[ErrorEvent], lag_s: float = 0.0) -> list[Alert]:
    """Every alert `events` raise, each received `lag_s` after it happened."""
    alerts: list[Alert] = []
    for event in events:
        assert event.timestamp is not None
        alerts.extend(engine.on_error(event, event.timestamp + lag_s))
    return alerts


def kinds(alerts: list[Alert]) -> list[str]:
    return [a.kind.value for a in alerts]


def connection_burst(agent: str = "trainer", n: int = 50, start: float = T0) -> list[ErrorEvent]:
    return [
        error(agent, at=start + i * 0.05, error_type="ConnectionError", message=f"refused {i}")
        for i in range(n)
    ]


# --------------------------------------------------------------------------- grouping


def test_first_occurrence_of_a_fingerprint_alerts_and_repeats_do_not() -> None:
    engine = AlertEngine()
    alerts = feed(engine, [error(at=T0 + i * 10) for i in range(3)])
    assert kinds(alerts) == ["error"]
    alert = alerts[0]
    assert alert.severity == "error" and alert.agent == "trainer" and alert.count == 1
    assert "ValueError: loss is NaN" in alert.message and alert.sample is not None
    assert engine.stats.fingerprints == 1


def test_different_fingerprints_alert_apart() -> None:
    alerts = feed(AlertEngine(), [error(message="a b"), error(message="c d"), error("other")])
    assert kinds(alerts) == ["error"] * 3


def test_warnings_do_not_alert_by_default_but_can_be_made_to() -> None:
    warning = error(severity="warning")
    assert feed(AlertEngine(), [warning]) == []
    rules = parse_rules({"new_error_min_severity": "warning"})
    assert kinds(feed(AlertEngine(rules), [warning])) == ["error"]


def test_a_fingerprint_quiet_for_its_ttl_is_new_again() -> None:
    engine = AlertEngine(AlertRules(fingerprint_ttl_s=100))
    assert kinds(feed(engine, [error(at=T0), error(at=T0 + 99)])) == ["error"]
    assert kinds(feed(engine, [error(at=T0 + 199)])) == ["error"]


def test_fingerprints_are_bounded() -> None:
    engine = AlertEngine(AlertRules(max_fingerprints=2))
    feed(engine, [error(message=m) for m in ("a x", "b y", "c z")])
    assert engine.stats.fingerprints == 2


# --------------------------------------------------------------------------- floods


def test_burst_of_50_connection_errors_is_one_flood_and_one_summary() -> None:
    engine = AlertEngine()
    alerts = feed(engine, connection_burst())
    # The first (a new fingerprint) alerts on its own; the tenth starts the flood.
    assert kinds(alerts) == ["error", "flood"]
    start = alerts[1]
    assert start.count == 10 and start.first_seen == T0 and start.agent == "trainer"
    assert engine.stats.active_floods == 1
    assert engine.tick(T0 + 2.45 + 59) == []  # not yet quiet for the window
    summary = engine.tick(T0 + 2.45 + 60)
    assert kinds(summary) == ["flood"]
    end = summary[0]
    assert end.count == 50 and end.first_seen == T0 and end.last_seen == pytest.approx(T0 + 2.45)
    assert end.sample is not None and end.sample["error_type"] == "ConnectionError"
    assert end.id != start.id and end.fingerprint == start.fingerprint
    assert engine.stats.active_floods == 0


def test_flood_summary_also_comes_when_later_errors_outlive_it() -> None:
    engine = AlertEngine()
    feed(engine, connection_burst(n=12))
    alerts = feed(engine, [error("router", at=T0 + 100)])
    assert kinds(alerts) == ["flood", "error"]
    assert alerts[0].count == 12


def test_new_fingerprints_during_a_flood_are_folded_into_it() -> None:
    engine = AlertEngine()
    feed(engine, connection_burst(n=10))
    alerts = feed(
        engine,
        [error(at=T0 + 1, error_type="ConnectionError", message=f"peer {c} gone") for c in "xyz"],
    )
    assert alerts == []
    assert engine.active_floods[0].count == 13


@pytest.mark.parametrize(
    ("error_type", "message", "threshold", "window_s"),
    [
        ("ConnectionError", "refused", 10, 60),
        ("TimeoutError", "no answer", 5, 30),
        ("MemoryError", "", 3, 300),
        ("RuntimeError", "CUDA out of memory", 3, 300),
    ],
)
def test_each_pattern_floods_at_its_own_threshold_within_its_window(
    error_type: str, message: str, threshold: int, window_s: float
) -> None:
    step = window_s / threshold  # threshold errors spread over (almost) the window
    events = [
        error(at=T0 + i * step * 0.99, error_type=error_type, message=message)
        for i in range(threshold)
    ]
    engine = AlertEngine()
    assert kinds(feed(engine, events[:-1])) == ["error"]
    assert kinds(feed(engine, events[-1:])) == ["flood"]
    # Errors spaced so that `threshold` of them span more than the window never flood.
    wide = window_s / (threshold - 1) * 1.05
    slow = [
        error("slow", at=T0 + i * wide, error_type=error_type, message=message)
        for i in range(threshold * 3)
    ]
    assert "flood" not in kinds(feed(AlertEngine(), slow))


def test_critical_errors_flood_at_five_a_minute_as_critical() -> None:
    events = [
        error(at=T0 + i, severity="critical", message=f"crash {c}") for i, c in enumerate("abcde")
    ]
    alerts = feed(AlertEngine(), events)
    assert kinds(alerts) == ["error"] * 4 + ["flood"]
    assert alerts[-1].severity == "critical"


def test_the_same_error_repeating_fast_is_a_flood_of_its_fingerprint() -> None:
    alerts = feed(AlertEngine(), [error(at=T0 + i) for i in range(20)])
    assert kinds(alerts) == ["error", "flood"]
    assert "fingerprint" in alerts[1].message


def test_folded_bus_events_count_their_occurrences() -> None:
    engine = AlertEngine()
    alerts = feed(
        engine,
        [
            error(at=T0, error_type="ConnectionError"),
            error(at=T0 + 10, error_type="ConnectionError", count=49),
        ],
    )
    assert kinds(alerts) == ["error", "flood"] and alerts[1].count == 50


def test_flood_by_all_agents_is_reported_for_the_mesh() -> None:
    rules = parse_rules(
        {
            "floods": {
                "outage": {"pattern": "NoServers", "threshold": 3, "window_s": 5, "group_by": "all"}
            }
        }
    )
    events = [error(a, at=T0, error_type="NoServersError") for a in ("a", "b", "c")]
    alerts = feed(AlertEngine(rules), events)
    assert kinds(alerts)[-1] == "flood" and alerts[-1].agent == "mesh"


# --------------------------------------------------------------------------- supervisor events


def test_failed_agent_raises_critical_agent_down_once_per_episode() -> None:
    engine = AlertEngine(dependencies=DEPENDENCIES)
    alerts = engine.on_agent_event(
        agent_event("db", "failed", "backoff", reason="breaker open"), T0
    )
    assert kinds(alerts) == ["agent_down"]
    assert alerts[0].severity == "critical" and alerts[0].agent == "db"
    assert "breaker open" in alerts[0].message and alerts[0].sample is not None
    assert engine.on_agent_event(agent_event("db", "failed", "failed", at=T0 + 1), T0 + 1) == []
    assert engine.stats.agents_down == ("db",)


def test_unhealthy_agent_raises_agent_down_as_error() -> None:
    alerts = AlertEngine().on_agent_event(agent_event("db", "unhealthy"), T0)
    assert kinds(alerts) == ["agent_down"] and alerts[0].severity == "error"


def test_a_crash_and_restart_is_one_agent_restarted_alert() -> None:
    engine = AlertEngine()
    assert engine.on_agent_event(agent_event("db", "backoff", "healthy"), T0) == []
    assert engine.on_agent_event(agent_event("db", "starting", "backoff", restarts=1), T0 + 1) == []
    alerts = engine.on_agent_event(
        agent_event("db", "healthy", "starting", at=T0 + 2, restarts=1), T0 + 2
    )
    assert kinds(alerts) == ["agent_restarted"]
    assert alerts[0].severity == "warning" and alerts[0].count == 1
    assert alerts[0].first_seen == T0 and engine.stats.agents_down == ()


def test_first_start_is_no_alert() -> None:
    engine = AlertEngine()
    for state, previous in (
        ("pending", "pending"),
        ("starting", "pending"),
        ("healthy", "starting"),
    ):
        assert engine.on_agent_event(agent_event("db", state, previous), T0) == []


def test_recovery_after_agent_down_is_an_info_alert() -> None:
    engine = AlertEngine()
    engine.on_agent_event(agent_event("db", "unhealthy"), T0)
    alerts = engine.on_agent_event(agent_event("db", "healthy", "unhealthy", at=T0 + 30), T0 + 30)
    assert kinds(alerts) == ["agent_down"]
    assert alerts[0].severity == "info" and "after 30.0s" in alerts[0].message


def test_circuit_breaker_report_is_a_breaker_open_alert_for_its_agent() -> None:
    report = error(
        "supervisor",
        severity="critical",
        error_type="CircuitBreakerOpen",
        message="restart circuit breaker of db opened",
        details={"agent": "db", "restarts": 5},
    )
    alerts = feed(AlertEngine(), [report])
    assert kinds(alerts) == ["breaker_open"]
    assert alerts[0].agent == "db" and alerts[0].severity == "critical"
    assert alerts[0].subject == "alerts.critical.db"


# --------------------------------------------------------------------------- inhibition


def test_errors_of_dependents_fold_into_the_down_agent() -> None:
    engine = AlertEngine(dependencies=DEPENDENCIES)
    engine.on_agent_event(agent_event("db", "failed", at=T0), T0)
    folded = [
        error("registry", at=T0 + 1, message="db unreachable"),
        error("trainer", at=T0 + 2, message="registry unreachable", count=3),
        error("trainer", at=T0 + 3, error_type="ConnectionError", message="refused"),
    ]
    assert feed(engine, folded) == []
    # Neither the down agent's own errors nor those of an unrelated agent are inhibited.
    assert kinds(feed(engine, [error("db", at=T0 + 4), error("router", at=T0 + 4)])) == [
        "error",
        "error",
    ]
    assert engine.stats.inhibited == 5
    alerts = engine.on_agent_event(
        agent_event("db", "healthy", "starting", at=T0 + 10, restarts=1), T0 + 10
    )
    assert kinds(alerts) == ["agent_down", "agent_restarted"]
    recovered = alerts[0]
    assert recovered.count == 5 and recovered.severity == "info"
    assert "registry: 1" in recovered.message and "trainer: 4" in recovered.message
    assert recovered.sample is not None and recovered.sample["agent"] == "registry"
    # Back up: the dependents alert again.
    assert kinds(feed(engine, [error("trainer", at=T0 + 11, message="fresh trouble")])) == ["error"]


def test_backoff_and_stopped_inhibit_without_alerting() -> None:
    for state in ("backoff", "stopped"):
        engine = AlertEngine(dependencies=DEPENDENCIES)
        assert engine.on_agent_event(agent_event("registry", state), T0) == []
        assert feed(engine, [error("trainer", at=T0 + 1)]) == []


def test_errors_from_before_the_agent_went_down_are_not_inhibited() -> None:
    engine = AlertEngine(dependencies=DEPENDENCIES)
    engine.on_agent_event(agent_event("db", "failed", at=T0 + 10), T0 + 10)
    assert kinds(feed(engine, [error("trainer", at=T0)], lag_s=10)) == ["error"]


def test_errors_fold_into_the_dependency_down_longest() -> None:
    engine = AlertEngine(dependencies=DEPENDENCIES)
    engine.on_agent_event(agent_event("registry", "failed", at=T0 + 5), T0 + 5)
    engine.on_agent_event(agent_event("db", "failed", at=T0), T0)
    feed(engine, [error("trainer", at=T0 + 6)])
    assert engine.episodes["db"].folded == 1 and engine.episodes["registry"].folded == 0


# --------------------------------------------------------------------------- time, ids, state


def test_event_times_ahead_of_the_receiver_are_clamped() -> None:
    engine = AlertEngine()
    alerts = engine.on_error(error(at=T0 + 3600), T0)
    assert alerts[0].timestamp == T0 and engine.now == T0


def test_the_same_events_give_the_same_alert_ids() -> None:
    events = [*connection_burst(n=15), error("router", at=T0 + 1000)]
    first = feed(AlertEngine(), events)
    second = feed(AlertEngine(), events)
    assert [a.id for a in first] == [a.id for a in second]
    assert len({a.id for a in first}) == len(first) == 4


def test_state_round_trip_continues_exactly_where_it_stopped() -> None:
    events = [*connection_burst(n=30), error(at=T0 + 5), error(at=T0 + 6)]
    whole = AlertEngine(dependencies=DEPENDENCIES)
    expected = feed(whole, events) + whole.tick(T0 + 200)

    engine = AlertEngine(dependencies=DEPENDENCIES)
    alerts = feed(engine, events[:12])
    saved = json.loads(json.dumps(engine.to_state()))  # it must survive JSON
    restored = AlertEngine.from_state(saved, dependencies=DEPENDENCIES)
    alerts += feed(restored, events[12:]) + restored.tick(T0 + 200)
    assert [(a.id, a.kind, a.count) for a in alerts] == [(a.id, a.kind, a.count) for a in expected]
    assert restored.stats.errors == len(events)


def test_state_keeps_down_episodes() -> None:
    engine = AlertEngine(dependencies=DEPENDENCIES)
    engine.on_agent_event(agent_event("db", "failed"), T0)
    restored = AlertEngine.from_state(engine.to_state(), dependencies=DEPENDENCIES)
    assert feed(restored, [error("trainer", at=T0 + 1)]) == []
    assert restored.stats.agents_down == ("db",)


def test_state_of_another_version_is_refused() -> None:
    with pytest.raises(ValueError, match="version"):
        AlertEngine.from_state({"version": 99})
    with pytest.raises(ValueError, match="malformed"):
        AlertEngine.from_state({"version": 1, "groups": [["fp"]]})


def test_next_deadline_is_when_the_earliest_flood_goes_quiet() -> None:
    engine = AlertEngine()
    assert engine.next_deadline() is None
    feed(engine, connection_burst(n=10))
    assert engine.next_deadline() == pytest.approx(T0 + 0.45 + 60)
