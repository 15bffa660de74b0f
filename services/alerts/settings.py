"""The alerts agent's settings, from its environment (in `startup_config.yaml`: its `env:`).

- `GRAFTMESH_ALERTS_RULES`: path of a YAML or JSON rules file (see
  `services.alerts.rules`); unset: the default rules.
- `GRAFTMESH_ALERTS_DURABLE`: the durable consumer's name, also the key of the
  saved engine state (default `graftmesh-alerts`). Two alerts agents that must not
  share their work need different names.
- `GRAFTMESH_ALERTS_SUBJECT`: the subjects the durable consumer reads when it is
  created (default `errors.>`; e.g. `errors.pc2.>` for one machine's errors).
- `GRAFTMESH_ALERTS_START_LOOKBACK_S`: how far back in `ERRORS` a new durable
  consumer starts (default 300; 0: only errors from then on).
- `GRAFTMESH_ALERTS_STATE_BUCKET`: the key-value bucket of the state (default
  `graftmesh_alerts`).
- `GRAFTMESH_ALERTS_WEBHOOK_URL`: POST every alert's JSON there (default: no webhook).
- `GRAFTMESH_ALERTS_FILE_MAX_BYTES`: rotate `<run_dir>/alerts/alerts.jsonl` past
  this size (default 10 MiB; 3 old files are kept).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from common.agent import env_number
from common.errors import ConfigError
from services.alerts.consumer import DEFAULT_DURABLE, ConsumerSettings
from services.alerts.rules import AlertRules, parse_rules
from services.alerts.sinks import DEFAULT_FILE_MAX_BYTES
from services.alerts.state_store import DEFAULT_STATE_BUCKET

__all__ = [
    "DURABLE_ENV",
    "FILE_MAX_BYTES_ENV",
    "LOOKBACK_ENV",
    "RULES_ENV",
    "STATE_BUCKET_ENV",
    "SUBJECT_ENV",
    "WEBHOOK_ENV",
    "AlertsSettings",
    "load_rules",
]

RULES_ENV = "GRAFTMESH_ALERTS_RULES"
DURABLE_ENV = "GRAFTMESH_ALERTS_DURABLE"
SUBJECT_ENV = "GRAFTMESH_ALERTS_SUBJECT"
LOOKBACK_ENV = "GRAFTMESH_ALERTS_START_LOOKBACK_S"
STATE_BUCKET_ENV = "GRAFTMESH_ALERTS_STATE_BUCKET"
WEBHOOK_ENV = "GRAFTMESH_ALERTS_WEBHOOK_URL"
FILE_MAX_BYTES_ENV = "GRAFTMESH_ALERTS_FILE_MAX_BYTES"

_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_SUBJECT_RE = re.compile(r"^errors(\.[^\s.*>]+|\.\*)*(\.>)?$")


def load_rules(path: Path) -> AlertRules:
    """The rules of a YAML or JSON file; ConfigError naming the file and the problems."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ConfigError([f"{RULES_ENV}={path}: cannot read the rules file: {err}"]) from None
    except yaml.YAMLError as err:
        raise ConfigError([f"{RULES_ENV}={path}: not YAML or JSON: {err}"]) from None
    return parse_rules(data, source=str(path))


@dataclass(frozen=True)
class AlertsSettings:
    """Everything the agent reads from its environment, checked."""

    rules: AlertRules
    consumer: ConsumerSettings
    file_path: Path
    file_max_bytes: int = DEFAULT_FILE_MAX_BYTES
    webhook_url: str | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], run_dir: Path) -> AlertsSettings:
        """Read and check the settings; ConfigError listing every problem."""
        problems: list[str] = []

        durable = environ.get(DURABLE_ENV) or DEFAULT_DURABLE
        if not _NAME_RE.match(durable):
            problems.append(f"{DURABLE_ENV}={durable!r}: use letters, digits, '_' and '-' only")
        bucket = environ.get(STATE_BUCKET_ENV) or DEFAULT_STATE_BUCKET
        if not _NAME_RE.match(bucket):
            problems.append(f"{STATE_BUCKET_ENV}={bucket!r}: use letters, digits, '_' and '-' only")
        subject = environ.get(SUBJECT_ENV) or "errors.>"
        if not _SUBJECT_RE.match(subject):
            problems.append(
                f"{SUBJECT_ENV}={subject!r}: must be a subject under errors. (e.g. errors.pc2.>)"
            )
        lookback = env_number(environ, LOOKBACK_ENV, 300.0, 0.0, problems)
        max_bytes = int(
            env_number(environ, FILE_MAX_BYTES_ENV, DEFAULT_FILE_MAX_BYTES, 1024, problems)
        )
        webhook = environ.get(WEBHOOK_ENV) or None
        if webhook is not None and not webhook.startswith(("http://", "https://")):
            problems.append(f"{WEBHOOK_ENV}={webhook!r}: must be an http:// or https:// URL")
        rules = AlertRules()
        rules_path = environ.get(RULES_ENV)
        if rules_path:
            try:
                rules = load_rules(Path(rules_path))
            except ConfigError as err:
                problems.extend(err.problems)
        if problems:
            raise ConfigError(problems)
        return cls(
            rules=rules,
            consumer=ConsumerSettings(
                durable=durable,
                subject=subject,
                start_lookback_s=lookback,
                state_bucket=bucket,
            ),
            file_path=run_dir / "alerts" / "alerts.jsonl",
            file_max_bytes=max_bytes,
            webhook_url=webhook,
        )
