"""The alerts engine: error events and supervisor events in, alerts out.

Pure: no I/O, no clock of its own. Every call is given the wall time at which
the caller handles the event (`received_at`, seconds since the epoch); an event
happened at its own `timestamp`, never later than that.

What it decides, in this order, for one error event:

1. Floods whose `quiet_s` has passed by the engine's time (the newest event time
   seen) end: one `flood` summary alert each, with the total count, first and
   last seen, and a sample.
2. `CircuitBreakerOpen` (the supervisor's report of a restart breaker that
   opened; the agent is `details["agent"]`): a `breaker_open` alert, always.
3. An error of an agent whose dependency is down (`inhibition`) is folded into
   that dependency's episode: counted, not alerted.
4. An error that matches a flood rule counts towards the flood of its key; the
   one that crosses the threshold starts the flood (one `flood` alert with the
   count so far); while a flood is on, its errors are folded into it.
5. Otherwise, grouping by fingerprint: the first occurrence of a fingerprint (or
   the first after `fingerprint_ttl_s` of silence) at `new_error_min_severity`
   or worse is an `error` alert; repeats are counted in its group.

Supervisor events: `failed` and `unhealthy` raise `agent_down` (once per episode);
`failed`, `backoff`, `unhealthy` and `stopped` start an episode that inhibits the
errors of its dependents. `healthy`/`degraded` end it: an `agent_down` alert of
severity `info` closes an episode that alerted or folded errors (its `count` is
the errors folded in), and `agent_restarted` (its `count` the supervisor's restart
count) follows a restart (previous state `backoff` or `starting`, restarts > 0).

Alert ids come from what triggered them (event ids, rule, key, episode start), so
the same events in the same order give the same alerts with the same ids: the
consumer relies on that to publish exactly once across restarts. `to_state` and
`from_state` carry the engine across restarts.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from services.alerts.flood import ActiveFlood, FloodOutcome, FloodTracker
from services.alerts.inhibition import DOWN_STATES, UP_STATES, DownEpisode, Inhibitor
from services.alerts.model import (
    AgentEvent,
    Alert,
    AlertKind,
    ErrorEvent,
    alert_id,
    format_time,
    severity_at_least,
)
from services.alerts.rules import AlertRules, FloodRule

__all__ = ["BREAKER_ERROR_TYPE", "STATE_VERSION", "AlertEngine", "EngineStats"]

BREAKER_ERROR_TYPE = "CircuitBreakerOpen"
STATE_VERSION = 1

_MESSAGE_CHARS = 500
_RESTART_PREVIOUS = frozenset({"backoff", "starting"})


@dataclass(frozen=True)
class EngineStats:
    """Counters since the engine's state began (they survive `to_state`/`from_state`)."""

    errors: int  # error events handled
    alerts: int  # alerts raised
    flood_folded: int  # occurrences folded into floods
    inhibited: int  # occurrences folded into down episodes
    active_floods: int
    fingerprints: int
    agents_down: tuple[str, ...]


@dataclass
class _Group:
    first_seen: float
    last_seen: float
    count: int


def _clip(text: str) -> str:
    return text if len(text) <= _MESSAGE_CHARS else text[: _MESSAGE_CHARS - 3] + "..."


def _folded_text(episode: DownEpisode) -> str:
    if not episode.folded:
        return "no errors of dependents were folded in"
    parts = ", ".join(f"{a}: {n}" for a, n in sorted(episode.folded_by_agent.items()))
    return f"{episode.folded} error(s) of dependents were folded in ({parts})"


class AlertEngine:
    """Grouping, floods, inhibition and supervisor events, turned into alerts.

    `dependencies` maps each agent to the agents it depends on (the config's
    `dependencies`); the engine follows them transitively.
    """

    def __init__(
        self,
        rules: AlertRules | None = None,
        dependencies: Mapping[str, Iterable[str]] | None = None,
    ) -> None:
        self.rules = rules or AlertRules()
        self._inhibitor = Inhibitor(dependencies)
        self._floods = FloodTracker(self.rules.max_flood_keys)
        self._groups: collections.OrderedDict[str, _Group] = collections.OrderedDict()
        self._clock = float("-inf")
        self._errors = 0
        self._alerts = 0
        self._flood_folded = 0
        self._inhibited = 0

    # ----------------------------------------------------------------- inputs

    def on_error(self, event: ErrorEvent, received_at: float) -> list[Alert]:
        """The alerts one error event raises (summaries of floods it outlived first)."""
        at = self._event_time(event.timestamp, received_at)
        self._clock = max(self._clock, at)
        alerts = self._advance()
        self._errors += 1
        if event.error_type == BREAKER_ERROR_TYPE:
            alerts.append(self._breaker_alert(event, at))
            return self._raised(alerts)
        episode = self._inhibitor.cause(event.agent, at)
        if episode is not None:
            episode.fold(event.agent, event.occurrences, at, event.sample())
            self._inhibited += event.occurrences
            return self._raised(alerts)
        rule = self.rules.classify(event)
        if rule is not None:
            outcome, flood = self._floods.observe(rule, event, at)
            if outcome is not FloodOutcome.COUNTED:
                assert flood is not None
                self._touch(event, at)
                if outcome is FloodOutcome.STARTED:
                    alerts.append(self._flood_started(flood, rule))
                else:
                    self._flood_folded += event.occurrences
                return self._raised(alerts)
        if self._touch(event, at) and severity_at_least(
            event.severity, self.rules.new_error_min_severity
        ):
            alerts.append(self._error_alert(event, at))
        return self._raised(alerts)

    def on_agent_event(self, event: AgentEvent, received_at: float) -> list[Alert]:
        """The alerts one supervisor state change raises.

        It does not move the engine's time: these events come live, while errors
        may be handled late (after a restart), and floods end by error time.
        """
        at = self._event_time(event.timestamp, received_at)
        alerts: list[Alert] = []
        if event.state in DOWN_STATES:
            episode = self._inhibitor.went_down(event.agent, event.state, at, event.restarts)
            if event.state in ("failed", "unhealthy") and episode.alert_id is None:
                episode.alert_id = alert_id("agent_down", event.agent, repr(episode.since))
                alerts.append(self._down_alert(event, episode, at))
        elif event.state in UP_STATES:
            ended = self._inhibitor.came_up(event.agent)
            if ended is not None and (ended.alert_id is not None or ended.folded):
                alerts.append(self._recovered_alert(event, ended, at))
            if event.previous in _RESTART_PREVIOUS and event.restarts > 0:
                alerts.append(self._restarted_alert(event, ended, at))
        return self._raised(alerts)

    def tick(self, now: float) -> list[Alert]:
        """Move the engine's time to `now` (wall time, when no events are waiting): the
        summaries of floods that went quiet, and old fingerprints forgotten."""
        self._clock = max(self._clock, now)
        return self._raised(self._advance())

    # ----------------------------------------------------------------- views

    @property
    def now(self) -> float:
        """The engine's time: the newest event time seen, or the last `tick`."""
        return self._clock

    @property
    def active_floods(self) -> list[ActiveFlood]:
        return self._floods.active

    @property
    def episodes(self) -> dict[str, DownEpisode]:
        return dict(self._inhibitor.episodes)

    def next_deadline(self) -> float | None:
        """When the earliest flood in progress ends if nothing more comes (engine time)."""
        rules = self.rules.flood_rules_by_name
        ends = [
            flood.last_seen + rules[flood.rule].quiet_after_s
            for flood in self._floods.active
            if flood.rule in rules
        ]
        return min(ends) if ends else None

    @property
    def stats(self) -> EngineStats:
        return EngineStats(
            errors=self._errors,
            alerts=self._alerts,
            flood_folded=self._flood_folded,
            inhibited=self._inhibited,
            active_floods=len(self._floods.active),
            fingerprints=len(self._groups),
            agents_down=tuple(sorted(self._inhibitor.episodes)),
        )

    # ----------------------------------------------------------------- state

    def to_state(self) -> dict[str, Any]:
        """Everything the engine knows, as JSON-able data for `from_state`."""
        return {
            "version": STATE_VERSION,
            "clock": self._clock if self._clock != float("-inf") else None,
            "groups": [[fp, g.first_seen, g.last_seen, g.count] for fp, g in self._groups.items()],
            "floods": self._floods.to_state(),
            "episodes": self._inhibitor.to_state(),
            "counts": {
                "errors": self._errors,
                "alerts": self._alerts,
                "flood_folded": self._flood_folded,
                "inhibited": self._inhibited,
            },
        }

    @classmethod
    def from_state(
        cls,
        state: Mapping[str, Any],
        rules: AlertRules | None = None,
        dependencies: Mapping[str, Iterable[str]] | None = None,
    ) -> AlertEngine:
        """An engine that carries on from `to_state()`'s data, under `rules` and
        `dependencies` (which may differ from the saved engine's: floods of a rule
        that is gone end at the next event or tick).

        ValueError when `state` is of another version or malformed.
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"alerts engine state of version {state.get('version')!r}; "
                f"this engine reads version {STATE_VERSION}"
            )
        engine = cls(rules, dependencies)
        try:
            clock = state.get("clock")
            engine._clock = float(clock) if clock is not None else float("-inf")
            for fp, first, last, count in state.get("groups", ()):
                engine._groups[str(fp)] = _Group(float(first), float(last), int(count))
            while len(engine._groups) > engine.rules.max_fingerprints:
                engine._groups.popitem(last=False)
            engine._floods = FloodTracker.from_state(
                state.get("floods", {}), engine.rules.max_flood_keys
            )
            engine._inhibitor.restore(state.get("episodes", ()))
            counts = state.get("counts", {})
            engine._errors = int(counts.get("errors", 0))
            engine._alerts = int(counts.get("alerts", 0))
            engine._flood_folded = int(counts.get("flood_folded", 0))
            engine._inhibited = int(counts.get("inhibited", 0))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"malformed alerts engine state: {err!r}") from None
        return engine

    # ----------------------------------------------------------------- internals

    @staticmethod
    def _event_time(timestamp: float | None, received_at: float) -> float:
        # An event cannot have happened after it was received: a clock running ahead
        # on its machine must not end every flood early.
        return received_at if timestamp is None else min(timestamp, received_at)

    def _raised(self, alerts: list[Alert]) -> list[Alert]:
        self._alerts += len(alerts)
        return alerts

    def _advance(self) -> list[Alert]:
        now = self._clock
        alerts = [
            self._flood_ended(flood, now)
            for flood in self._floods.end_quiet(self.rules.flood_rules_by_name, now)
        ]
        ttl = self.rules.fingerprint_ttl_s
        while self._groups:
            fp, group = next(iter(self._groups.items()))
            if now - group.last_seen < ttl:
                break
            del self._groups[fp]
        return alerts

    def _touch(self, event: ErrorEvent, at: float) -> bool:
        """Count `event` in its fingerprint's group; True when the fingerprint is new."""
        fp = event.fingerprint
        group = self._groups.get(fp)
        if group is None or at - group.last_seen >= self.rules.fingerprint_ttl_s:
            if group is None and len(self._groups) >= self.rules.max_fingerprints:
                self._groups.popitem(last=False)
            self._groups[fp] = _Group(at, at, event.occurrences)
            self._groups.move_to_end(fp)
            return True
        group.count += event.occurrences
        if at >= group.last_seen:
            group.last_seen = at
            self._groups.move_to_end(fp)
        return False

    def _error_alert(self, event: ErrorEvent, at: float) -> Alert:
        first = event.first_seen
        return Alert(
            id=alert_id("error", event.id),
            timestamp=at,
            kind=AlertKind.ERROR,
            severity=event.severity,
            agent=event.agent,
            fingerprint=event.fingerprint,
            count=event.occurrences,
            first_seen=min(first, at) if first is not None else at,
            last_seen=at,
            message=_clip(f"new error in {event.agent}: {event.error_type}: {event.message}"),
            sample=event.sample(),
        )

    def _breaker_alert(self, event: ErrorEvent, at: float) -> Alert:
        target = event.details.get("agent")
        agent = target if isinstance(target, str) and target else event.agent
        return Alert(
            id=alert_id("breaker_open", event.id),
            timestamp=at,
            kind=AlertKind.BREAKER_OPEN,
            severity="critical",
            agent=agent,
            fingerprint=event.fingerprint,
            count=event.occurrences,
            first_seen=at,
            last_seen=at,
            message=_clip(event.message or f"restart circuit breaker of {agent} opened"),
            sample=event.sample(),
        )

    def _describe(self, flood: ActiveFlood) -> str:
        if flood.key in (flood.agent, "*"):
            return f"{flood.rule} flood from {flood.agent}"
        return f"{flood.rule} flood from {flood.agent} (fingerprint {flood.key})"

    def _flood_started(self, flood: ActiveFlood, rule: FloodRule) -> Alert:
        return Alert(
            id=alert_id("flood", flood.rule, flood.key, flood.trigger_id),
            timestamp=flood.started_at,
            kind=AlertKind.FLOOD,
            severity=rule.severity,
            agent=flood.agent,
            fingerprint=alert_id("flood-key", flood.rule, flood.key),
            count=flood.count,
            first_seen=flood.first_seen,
            last_seen=flood.last_seen,
            message=_clip(
                f"{self._describe(flood)}: {flood.count} errors within {rule.window_s:g}s "
                f"(threshold {rule.threshold}); further ones are counted into one summary"
            ),
            sample=flood.sample,
        )

    def _flood_ended(self, flood: ActiveFlood, now: float) -> Alert:
        rule = self.rules.flood_rules_by_name.get(flood.rule)
        quiet = f" (quiet for {rule.quiet_after_s:g}s)" if rule is not None else ""
        return Alert(
            id=alert_id("flood-end", flood.rule, flood.key, flood.trigger_id),
            timestamp=max(now, flood.last_seen),
            kind=AlertKind.FLOOD,
            severity=rule.severity if rule is not None else "error",
            agent=flood.agent,
            fingerprint=alert_id("flood-key", flood.rule, flood.key),
            count=flood.count,
            first_seen=flood.first_seen,
            last_seen=flood.last_seen,
            message=_clip(
                f"{self._describe(flood)} is over{quiet}: {flood.count} errors from "
                f"{format_time(flood.first_seen)} to {format_time(flood.last_seen)}"
            ),
            sample=flood.sample,
        )

    def _down_alert(self, event: AgentEvent, episode: DownEpisode, at: float) -> Alert:
        assert episode.alert_id is not None
        reason = f": {event.reason}" if event.reason else ""
        what = "has failed" if event.state == "failed" else f"is {event.state}"
        return Alert(
            id=episode.alert_id,
            timestamp=at,
            kind=AlertKind.AGENT_DOWN,
            severity="critical" if event.state == "failed" else "error",
            agent=event.agent,
            fingerprint=alert_id("agent_down", event.agent),
            count=episode.folded,
            first_seen=episode.since,
            last_seen=at,
            message=_clip(
                f"{event.agent} {what}{reason}; errors of the agents that depend "
                "on it are folded into this alert until it is back"
            ),
            sample=event.payload(),
        )

    def _recovered_alert(self, event: AgentEvent, episode: DownEpisode, at: float) -> Alert:
        down_for = max(0.0, at - episode.since)
        return Alert(
            id=alert_id("agent_up", event.agent, repr(episode.since)),
            timestamp=at,
            kind=AlertKind.AGENT_DOWN,
            severity="info",
            agent=event.agent,
            fingerprint=alert_id("agent_down", event.agent),
            count=episode.folded,
            first_seen=episode.since,
            last_seen=at,
            message=_clip(
                f"{event.agent} is {event.state} again after {down_for:.1f}s "
                f"({episode.state} last); {_folded_text(episode)}"
            ),
            sample=episode.sample if episode.sample is not None else event.payload(),
        )

    def _restarted_alert(self, event: AgentEvent, episode: DownEpisode | None, at: float) -> Alert:
        folded = f"; {_folded_text(episode)}" if episode is not None else ""
        return Alert(
            id=alert_id(
                "agent_restarted",
                event.agent,
                str(event.restarts),
                str(event.pid),
                event.timestamp_text,
            ),
            timestamp=at,
            kind=AlertKind.AGENT_RESTARTED,
            severity="warning",
            agent=event.agent,
            fingerprint=alert_id("agent_restarted", event.agent),
            count=event.restarts,
            first_seen=episode.since if episode is not None else at,
            last_seen=at,
            message=_clip(
                f"{event.agent} was restarted and is {event.state} again "
                f"(restart {event.restarts}){folded}"
            ),
            sample=event.payload(),
        )
