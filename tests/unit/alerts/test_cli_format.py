"""How `graftmesh alerts` prints one alert."""

from __future__ import annotations

import io

from rich.console import Console

from services.alerts.cli import format_alert
from services.alerts.model import Alert, AlertKind
from tests.unit.alerts.factories import T0


def test_alert_line_shows_time_severity_kind_agent_count_and_message() -> None:
    alert = Alert(
        id="a" * 32,
        timestamp=T0,
        kind=AlertKind.FLOOD,
        severity="critical",
        agent="trainer",
        fingerprint="f" * 32,
        count=50,
        first_seen=T0,
        last_seen=T0,
        message="connection flood from trainer [not markup]",
    )
    buffer = io.StringIO()
    Console(file=buffer, width=300, color_system=None).print(format_alert(alert))
    line = buffer.getvalue()
    assert line.startswith("2027-01-15 08:00:00  CRITICAL")
    assert "flood" in line and "trainer" in line and "x50" in line
    assert "[not markup]" in line
