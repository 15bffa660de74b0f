"""Flood detection: per rule and key, a sliding count of matching errors.

Pure: times are given by the caller (seconds since the epoch), nothing else.

A counter holds the occurrences of the last `window_s` for one (rule, key). When
they reach the rule's `threshold` a flood starts: from then on every matching
error of that key is folded into it (counted, not alerted) until none came for
`quiet_s`, when the flood ends. The engine turns a start and an end into one
alert each.
"""

from __future__ import annotations

import collections
import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from services.alerts.model import ErrorEvent
from services.alerts.rules import FloodRule

__all__ = ["ActiveFlood", "FloodOutcome", "FloodTracker"]


class FloodOutcome(enum.Enum):
    """What observing one error did."""

    COUNTED = "counted"  # below the threshold: the error is handled on its own
    STARTED = "started"  # it crossed the threshold: a flood starts with it
    FOLDED = "folded"  # a flood of its key is on: folded into it


@dataclass
class ActiveFlood:
    """A flood in progress: `count` occurrences from `first_seen` to `last_seen`."""

    rule: str
    key: str
    agent: str
    trigger_id: str  # the event that crossed the threshold
    started_at: float
    count: int
    first_seen: float
    last_seen: float
    sample: dict[str, Any]

    def to_state(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "key": self.key,
            "agent": self.agent,
            "trigger_id": self.trigger_id,
            "started_at": self.started_at,
            "count": self.count,
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
            "sample": self.sample,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> ActiveFlood:
        return cls(
            rule=str(state["rule"]),
            key=str(state["key"]),
            agent=str(state["agent"]),
            trigger_id=str(state["trigger_id"]),
            started_at=float(state["started_at"]),
            count=int(state["count"]),
            first_seen=float(state["first_seen"]),
            last_seen=float(state["last_seen"]),
            sample=dict(state["sample"]),
        )


@dataclass
class _Counter:
    hits: collections.deque[tuple[float, int]]  # (time, occurrences), oldest first
    total: int
    window_s: float

    @property
    def newest(self) -> float:
        return self.hits[-1][0] if self.hits else float("-inf")


def _flood_key(rule: str, key: str) -> str:
    return f"{rule}\x1f{key}"


class FloodTracker:
    """The counters and the floods in progress of every (rule, key).

    At most `max_keys` counters and as many floods are kept: the least recently
    updated counter goes first, and a counter whose newest hit left its window is
    dropped by `end_quiet`.
    """

    def __init__(self, max_keys: int = 10_000) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, not {max_keys}")
        self.max_keys = max_keys
        self._counters: collections.OrderedDict[str, _Counter] = collections.OrderedDict()
        self._floods: dict[str, ActiveFlood] = {}

    @property
    def active(self) -> list[ActiveFlood]:
        """The floods in progress, oldest first."""
        return list(self._floods.values())

    def counters(self) -> int:
        """How many (rule, key) counters are kept."""
        return len(self._counters)

    def observe(
        self, rule: FloodRule, event: ErrorEvent, at: float
    ) -> tuple[FloodOutcome, ActiveFlood | None]:
        """Count `event` (its `occurrences`, at time `at`) for `rule`.

        Returns FOLDED and the flood it went into, STARTED and the new flood, or
        COUNTED and None.
        """
        key = rule.key(event)
        name = _flood_key(rule.name, key)
        weight = event.occurrences
        flood = self._floods.get(name)
        if flood is not None:
            flood.count += weight
            flood.last_seen = max(flood.last_seen, at)
            flood.first_seen = min(flood.first_seen, at)
            return FloodOutcome.FOLDED, flood
        counter = self._counters.get(name)
        if counter is None:
            if len(self._counters) >= self.max_keys:
                self._counters.popitem(last=False)
            counter = _Counter(collections.deque(), 0, rule.window_s)
            self._counters[name] = counter
        else:
            self._counters.move_to_end(name)
        counter.window_s = rule.window_s
        reference = max(at, counter.newest)
        counter.hits.append((at, weight))
        counter.total += weight
        while counter.hits and counter.hits[0][0] <= reference - rule.window_s:
            counter.total -= counter.hits.popleft()[1]
        if counter.total < rule.threshold:
            return FloodOutcome.COUNTED, None
        first = min(t for t, _ in counter.hits)
        flood = ActiveFlood(
            rule=rule.name,
            key=key,
            agent=event.agent if rule.group_by != "all" else "mesh",
            trigger_id=event.id,
            started_at=reference,
            count=counter.total,
            first_seen=first,
            last_seen=reference,
            sample=event.sample(),
        )
        del self._counters[name]
        if len(self._floods) >= self.max_keys:
            del self._floods[next(iter(self._floods))]
        self._floods[name] = flood
        return FloodOutcome.STARTED, flood

    def end_quiet(self, rules: Mapping[str, FloodRule], now: float) -> list[ActiveFlood]:
        """End every flood with no matching error for its rule's `quiet_s` by `now`.

        Returns the ended floods, oldest first. A flood whose rule is gone from
        `rules` ends too. Counters whose hits all left their window are dropped.
        """
        ended: list[ActiveFlood] = []
        for name, flood in list(self._floods.items()):
            rule = rules.get(flood.rule)
            if rule is None or now - flood.last_seen >= rule.quiet_after_s:
                del self._floods[name]
                ended.append(flood)
        while self._counters:
            name, counter = next(iter(self._counters.items()))
            if now - counter.newest < counter.window_s:
                break
            del self._counters[name]
        return ended

    def to_state(self) -> dict[str, Any]:
        """Everything the tracker knows, as JSON-able data (see `from_state`)."""
        return {
            "counters": [
                [name, counter.window_s, [[t, w] for t, w in counter.hits]]
                for name, counter in self._counters.items()
            ],
            "floods": [flood.to_state() for flood in self._floods.values()],
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any], max_keys: int = 10_000) -> FloodTracker:
        """A tracker from `to_state()`'s data."""
        tracker = cls(max_keys)
        counters: Iterable[Any] = state.get("counters", ())
        for name, window_s, hits in counters:
            deque = collections.deque((float(t), int(w)) for t, w in hits)
            tracker._counters[str(name)] = _Counter(
                deque, sum(w for _, w in deque), float(window_s)
            )
        for flood_state in state.get("floods", ()):
            flood = ActiveFlood.from_state(flood_state)
            tracker._floods[_flood_key(flood.rule, flood.key)] = flood
        while len(tracker._counters) > max_keys:
            tracker._counters.popitem(last=False)
        return tracker
