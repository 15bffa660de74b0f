"""Flood rules: the defaults, which errors match which rule, and the rules file."""

from __future__ import annotations

import pytest

from common.errors import ConfigError
from services.alerts.rules import DEFAULT_FLOOD_RULES, AlertRules, parse_rules
from tests.unit.alerts.factories import error


def _rule(name: str) -> tuple[int, float]:
    rule = AlertRules().flood_rules_by_name[name]
    return rule.threshold, rule.window_s


def test_default_thresholds_are_the_documented_ones() -> None:
    assert _rule("connection") == (10, 60)
    assert _rule("timeout") == (5, 30)
    assert _rule("memory") == (3, 300)
    assert _rule("critical") == (5, 60)
    assert AlertRules().new_error_min_severity == "error"


@pytest.mark.parametrize(
    ("error_type", "message", "expected"),
    [
        ("ConnectionError", "peer went away", "connection"),
        ("OSError", "connect: ECONNREFUSED 127.0.0.1:6379", "connection"),
        ("UnavailableError", "registry is down", "connection"),
        ("RpcError", "StatusCode.UNAVAILABLE: connection reset", "connection"),
        ("TimeoutError", "no answer", "timeout"),
        ("RpcError", "DeadlineExceeded after 5s", "timeout"),
        ("RuntimeError", "request timed out", "timeout"),
        ("MemoryError", "", "memory"),
        ("RuntimeError", "CUDA out of memory. Tried to allocate 2.00 GiB", "memory"),
        ("OutOfMemoryError", "", "memory"),
        ("ValueError", "loss is NaN", "repeated"),
    ],
)
def test_errors_match_the_rule_of_their_type_or_message(
    error_type: str, message: str, expected: str
) -> None:
    rule = AlertRules().classify(error(error_type=error_type, message=message))
    assert rule is not None and rule.name == expected


def test_critical_errors_match_the_critical_rule_first() -> None:
    rule = AlertRules().classify(error(error_type="ConnectionError", severity="critical"))
    assert rule is not None and rule.name == "critical"


def test_info_and_debug_match_no_flood_rule() -> None:
    assert AlertRules().classify(error(error_type="ConnectionError", severity="info")) is None


def test_rules_file_overrides_defaults_by_name_and_puts_its_rules_first() -> None:
    rules = parse_rules(
        {
            "new_error_min_severity": "warning",
            "floods": {
                "gpu": {"pattern": "NCCL", "threshold": 3, "window_s": 60},
                "connection": {"threshold": 20},
                "repeated": {"enabled": False},
            },
        }
    )
    assert rules.new_error_min_severity == "warning"
    names = [rule.name for rule in rules.active_floods]
    assert names == ["gpu", "connection", "critical", "memory", "timeout"]
    connection = rules.flood_rules_by_name["connection"]
    assert connection.threshold == 20 and connection.window_s == 60
    assert connection.pattern == DEFAULT_FLOOD_RULES[2].pattern
    assert rules.classify(error(error_type="ValueError", message="x")) is None


def test_empty_rules_document_gives_the_defaults() -> None:
    assert parse_rules(None) == AlertRules()
    assert parse_rules({}) == AlertRules()


def test_rules_file_problems_are_all_named_with_their_key() -> None:
    with pytest.raises(ConfigError) as err:
        parse_rules(
            {
                "fingerprint_ttl": 5,
                "floods": {
                    "gpu": {"pattern": "(", "threshold": 3, "window_s": 60},
                    "connection": {"threshold": 0},
                    "new": {"threshold": 3},
                },
            },
            source="rules.yaml",
        )
    problems = "\n".join(err.value.problems)
    assert "rules.yaml: fingerprint_ttl: unknown key" in problems
    assert "floods.gpu.pattern" in problems and "not a regular expression" in problems
    assert "floods.connection.threshold" in problems
    assert "floods.new.window_s: required key is missing" in problems


def test_floods_must_be_a_mapping_of_names() -> None:
    with pytest.raises(ConfigError, match="floods: must map rule names"):
        parse_rules({"floods": [{"name": "x"}]})
