"""The alerts agent: error events and supervisor events in, alerts out.

It reads the `ERRORS` stream through a durable consumer and the supervisor's
`events.agent.>`, and publishes alerts on `alerts.<severity>.<agent>` (stream
`ALERTS`), to `<run_dir>/alerts/alerts.jsonl` and optionally to a webhook.

Pure modules (no I/O):

- `model`: error events, supervisor events, alerts and their wire form, alert ids;
- `rules`: the rules (new errors, flood patterns and thresholds) and their file form;
- `flood`: sliding counts per rule and key, floods in progress;
- `inhibition`: dependency closure and the episodes of down agents;
- `engine`: `AlertEngine`, all of the above turned into alerts;
- `sequence`: which stream messages the saved state already holds.

Around them: `consumer` (NATS), `state_store` (NATS key-value), `sinks` (file,
webhook), `settings` (environment), `service` (the agent), `cli` (`graftmesh alerts`).
"""

from services.alerts.cli import follow_alerts, format_alert
from services.alerts.consumer import DEFAULT_DURABLE, AlertConsumer, ConsumerSettings
from services.alerts.engine import BREAKER_ERROR_TYPE, AlertEngine, EngineStats
from services.alerts.flood import ActiveFlood, FloodOutcome, FloodTracker
from services.alerts.inhibition import DownEpisode, Inhibitor, dependency_closure
from services.alerts.model import (
    AgentEvent,
    Alert,
    AlertKind,
    ErrorEvent,
    InvalidEventError,
    alert_id,
    alert_subject,
    parse_agent_event,
    parse_alert,
    parse_error_event,
)
from services.alerts.rules import DEFAULT_FLOOD_RULES, AlertRules, FloodRule, parse_rules
from services.alerts.sequence import SequenceTracker
from services.alerts.settings import AlertsSettings, load_rules
from services.alerts.sinks import JsonlFileSink, WebhookSink

__all__ = [
    "BREAKER_ERROR_TYPE",
    "DEFAULT_DURABLE",
    "DEFAULT_FLOOD_RULES",
    "ActiveFlood",
    "AgentEvent",
    "Alert",
    "AlertConsumer",
    "AlertEngine",
    "AlertKind",
    "AlertRules",
    "AlertsSettings",
    "ConsumerSettings",
    "DownEpisode",
    "EngineStats",
    "ErrorEvent",
    "FloodOutcome",
    "FloodRule",
    "FloodTracker",
    "Inhibitor",
    "InvalidEventError",
    "JsonlFileSink",
    "SequenceTracker",
    "WebhookSink",
    "alert_id",
    "alert_subject",
    "dependency_closure",
    "follow_alerts",
    "format_alert",
    "load_rules",
    "parse_agent_event",
    "parse_alert",
    "parse_error_event",
    "parse_rules",
]
