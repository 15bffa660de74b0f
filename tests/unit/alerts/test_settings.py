"""The agent's settings from its environment, and the rules file."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.errors import ConfigError
from services.alerts.settings import AlertsSettings


def test_defaults_without_any_setting(tmp_path: Path) -> None:
    settings = AlertsSettings.from_environ({}, tmp_path)
    assert settings.consumer.durable == "graftmesh-alerts"
    assert settings.consumer.subject == "errors.>"
    assert settings.consumer.start_lookback_s == 300
    assert settings.file_path == tmp_path / "alerts" / "alerts.jsonl"
    assert settings.webhook_url is None


def test_settings_and_a_rules_file_are_read(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("floods:\n  connection:\n    threshold: 3\n    window_s: 2\n")
    settings = AlertsSettings.from_environ(
        {
            "GRAFTMESH_ALERTS_RULES": str(rules),
            "GRAFTMESH_ALERTS_DURABLE": "alerts-test_1",
            "GRAFTMESH_ALERTS_SUBJECT": "errors.pc2.>",
            "GRAFTMESH_ALERTS_START_LOOKBACK_S": "0",
            "GRAFTMESH_ALERTS_WEBHOOK_URL": "http://127.0.0.1:9000/hook",
            "GRAFTMESH_ALERTS_FILE_MAX_BYTES": "4096",
        },
        tmp_path,
    )
    assert settings.rules.flood_rules_by_name["connection"].threshold == 3
    assert settings.consumer.durable == "alerts-test_1"
    assert settings.consumer.subject == "errors.pc2.>"
    assert settings.consumer.start_lookback_s == 0
    assert settings.webhook_url == "http://127.0.0.1:9000/hook"
    assert settings.file_max_bytes == 4096


def test_a_json_rules_file_works_too(tmp_path: Path) -> None:
    rules = tmp_path / "rules.json"
    rules.write_text('{"new_error_min_severity": "critical"}')
    settings = AlertsSettings.from_environ({"GRAFTMESH_ALERTS_RULES": str(rules)}, tmp_path)
    assert settings.rules.new_error_min_severity == "critical"


def test_every_bad_setting_is_reported_at_once(tmp_path: Path) -> None:
    bad_rules = tmp_path / "rules.yaml"
    bad_rules.write_text("floods:\n  connection:\n    threshold: -1\n")
    with pytest.raises(ConfigError) as err:
        AlertsSettings.from_environ(
            {
                "GRAFTMESH_ALERTS_RULES": str(bad_rules),
                "GRAFTMESH_ALERTS_DURABLE": "has.dot",
                "GRAFTMESH_ALERTS_SUBJECT": "alerts.>",
                "GRAFTMESH_ALERTS_START_LOOKBACK_S": "soon",
                "GRAFTMESH_ALERTS_WEBHOOK_URL": "mailto:ops",
            },
            tmp_path,
        )
    text = "\n".join(err.value.problems)
    for key in (
        "GRAFTMESH_ALERTS_DURABLE",
        "GRAFTMESH_ALERTS_SUBJECT",
        "GRAFTMESH_ALERTS_START_LOOKBACK_S",
        "GRAFTMESH_ALERTS_WEBHOOK_URL",
        "floods.connection.threshold",
    ):
        assert key in text


def test_a_missing_rules_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the rules file"):
        AlertsSettings.from_environ({"GRAFTMESH_ALERTS_RULES": str(tmp_path / "no")}, tmp_path)
