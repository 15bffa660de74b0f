"""The alerting rules: which errors alert on their own, and what counts as a flood.

Pure: the models, the defaults and `parse_rules`; reading a rules file is the
caller's business (see `services.alerts.settings`).

A rules document (YAML or JSON) looks like this; every key is optional:

```yaml
new_error_min_severity: error   # a new fingerprint alerts at this severity or worse
fingerprint_ttl_s: 3600         # a fingerprint quiet this long is new again
max_fingerprints: 10000         # fingerprints remembered (least recently seen go first)
max_flood_keys: 10000           # flood counters kept (idle ones go first)
floods:                         # checked in this order, first match wins
  gpu:                          # a new rule
    pattern: "NCCL|cudaError"
    threshold: 3
    window_s: 60
  connection:                   # a default rule: the keys given replace its own
    threshold: 20
  repeated:
    enabled: false
```

The rules a file names are checked first, in the file's order, then the defaults
it does not name, in their order (`DEFAULT_FLOOD_RULES`): critical, memory,
connection, timeout, repeated.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import cached_property
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from common.errors import ConfigError
from services.alerts.model import ErrorEvent, severity_at_least

__all__ = [
    "DEFAULT_FLOOD_RULES",
    "AlertRules",
    "FloodRule",
    "GroupBy",
    "SeverityName",
    "parse_rules",
]

SeverityName = Literal["debug", "info", "warning", "error", "critical"]
GroupBy = Literal["agent", "fingerprint", "all"]

_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")


class FloodRule(BaseModel):
    """A flood: `threshold` matching occurrences within `window_s`, counted per `group_by`.

    An error matches when its severity is `min_severity` or worse and, when a
    `pattern` is given, the pattern (a case-insensitive regular expression) is
    found in its `error_type` or its `message`. The flood ends once no matching
    error came for `quiet_s` (default: `window_s`). Its alerts have `severity`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    pattern: str | None = None
    min_severity: SeverityName = "warning"
    threshold: int = Field(ge=1)
    window_s: float = Field(gt=0)
    quiet_s: float | None = Field(None, gt=0)
    group_by: GroupBy = "agent"
    severity: SeverityName = "error"
    enabled: bool = True

    @field_validator("name")
    @classmethod
    def _name_is_a_token(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError(f"rule name {value!r} may hold only letters, digits, '_' and '-'")
        return value

    @field_validator("pattern")
    @classmethod
    def _pattern_compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as err:
                raise ValueError(f"pattern {value!r} is not a regular expression: {err}") from None
        return value

    @property
    def quiet_after_s(self) -> float:
        """How long without a matching error ends a flood."""
        return self.quiet_s if self.quiet_s is not None else self.window_s

    @cached_property
    def _regex(self) -> re.Pattern[str] | None:
        return re.compile(self.pattern, re.IGNORECASE) if self.pattern is not None else None

    def matches(self, event: ErrorEvent) -> bool:
        """Whether `event` counts towards this rule's floods."""
        if not severity_at_least(event.severity, self.min_severity):
            return False
        regex = self._regex
        if regex is None:
            return True
        return regex.search(event.error_type) is not None or regex.search(event.message) is not None

    def key(self, event: ErrorEvent) -> str:
        """Which counter `event` goes to: its agent, its fingerprint, or one for all."""
        if self.group_by == "agent":
            return event.agent
        if self.group_by == "fingerprint":
            return event.fingerprint
        return "*"


DEFAULT_FLOOD_RULES: tuple[FloodRule, ...] = (
    FloodRule(
        name="critical", min_severity="critical", threshold=5, window_s=60, severity="critical"
    ),
    FloodRule(
        name="memory",
        pattern=r"MemoryError|OutOfMemory|out of memory|\bOOM\b",
        threshold=3,
        window_s=300,
    ),
    FloodRule(
        name="connection",
        pattern=r"ConnectionError|ConnectionRefused|ConnectionReset|ECONNREFUSED|ECONNRESET"
        r"|Unavailable|NoServers",
        threshold=10,
        window_s=60,
    ),
    FloodRule(
        name="timeout",
        pattern=r"Timeout|timed out|DeadlineExceeded|deadline exceeded",
        threshold=5,
        window_s=30,
    ),
    # Anything else that repeats fast: the same error 20 times a minute.
    FloodRule(name="repeated", group_by="fingerprint", threshold=20, window_s=60),
)


class AlertRules(BaseModel):
    """Every rule of the alerts engine; the defaults are the documented ones."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    new_error_min_severity: SeverityName = "error"
    fingerprint_ttl_s: float = Field(3600.0, gt=0)
    max_fingerprints: int = Field(10_000, ge=1)
    max_flood_keys: int = Field(10_000, ge=1)
    floods: tuple[FloodRule, ...] = DEFAULT_FLOOD_RULES

    @field_validator("floods")
    @classmethod
    def _unique_names(cls, value: tuple[FloodRule, ...]) -> tuple[FloodRule, ...]:
        names = [rule.name for rule in value]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate flood rule names: {', '.join(duplicates)}")
        return value

    @cached_property
    def active_floods(self) -> tuple[FloodRule, ...]:
        """The enabled flood rules, in the order they are checked."""
        return tuple(rule for rule in self.floods if rule.enabled)

    @cached_property
    def flood_rules_by_name(self) -> dict[str, FloodRule]:
        return {rule.name: rule for rule in self.active_floods}

    def classify(self, event: ErrorEvent) -> FloodRule | None:
        """The first enabled flood rule `event` matches, or None."""
        for rule in self.active_floods:
            if rule.matches(event):
                return rule
        return None


def _problems(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            problems.append(f"{loc}: unknown key")
        elif e["type"] == "missing":
            problems.append(f"{loc}: required key is missing")
        else:
            problems.append(f"{loc}: {e['msg'].removeprefix('Value error, ')}")
    return problems


def parse_rules(data: Any, source: str = "rules") -> AlertRules:
    """`AlertRules` from a parsed rules document (None or {} gives the defaults).

    Raises ConfigError listing every problem, each prefixed with `source` and the
    path of the offending key.
    """
    if data is None:
        return AlertRules()
    if not isinstance(data, Mapping):
        raise ConfigError([f"{source}: must be a mapping of settings, not {type(data).__name__}"])
    document = dict(data)
    floods = document.pop("floods", None)
    problems: list[str] = []
    rules: list[FloodRule] | None = None
    if floods is not None:
        if not isinstance(floods, Mapping):
            raise ConfigError(
                [f"{source}: floods: must map rule names to their settings (see the defaults)"]
            )
        defaults = {rule.name: rule for rule in DEFAULT_FLOOD_RULES}
        rules = []
        for name, given in floods.items():
            where = f"{source}: floods.{name}"
            spec = {} if given is None else given
            if not isinstance(spec, Mapping):
                problems.append(f"{where}: must be a mapping of rule settings")
                continue
            if "name" in spec:
                problems.append(f"{where}.name: unknown key (the rule's key is its name)")
                continue
            base = defaults[name].model_dump() if name in defaults else {}
            try:
                rules.append(FloodRule.model_validate({**base, **spec, "name": name}))
            except ValidationError as err:
                problems.extend(f"{where}.{p}" for p in _problems(err))
        rules.extend(rule for name, rule in defaults.items() if name not in floods)
    if rules is not None:
        document["floods"] = rules
    try:
        parsed = AlertRules.model_validate(document)
    except ValidationError as err:
        problems.extend(f"{source}: {p}" for p in _problems(err))
    if problems:
        raise ConfigError(problems)
    return parsed
