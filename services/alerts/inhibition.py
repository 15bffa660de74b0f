"""Inhibition: while an agent is down, the errors of the agents that depend on it are
consequences, not news; they are folded into its down episode.

Pure: the dependency closure of the mesh's config and the episodes of down agents.

An episode starts when the supervisor reports the agent `failed`, `backoff`,
`unhealthy` or `stopped`, and ends when it reports it `healthy` or `degraded`. An
error of an agent that depends on a down agent (directly or through others) and
that happened after the episode started is folded into the episode of that
dependency (the one down longest, when several are).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DOWN_STATES",
    "UP_STATES",
    "DownEpisode",
    "Inhibitor",
    "dependency_closure",
]

DOWN_STATES = frozenset({"failed", "backoff", "unhealthy", "stopped"})
UP_STATES = frozenset({"healthy", "degraded"})


def dependency_closure(dependencies: Mapping[str, Iterable[str]]) -> dict[str, frozenset[str]]:
    """For each agent, every agent it depends on, directly or through others.

    Cycles (which a valid config does not have) and unknown names are tolerated.
    """
    direct = {agent: frozenset(deps) for agent, deps in dependencies.items()}
    closure: dict[str, frozenset[str]] = {}

    def visit(agent: str, path: frozenset[str]) -> frozenset[str]:
        if agent in closure:
            return closure[agent]
        found: set[str] = set()
        for dep in direct.get(agent, ()):
            if dep in path:
                continue
            found.add(dep)
            found |= visit(dep, path | {dep})
        result = frozenset(found - {agent})
        closure[agent] = result
        return result

    for agent in direct:
        visit(agent, frozenset({agent}))
    return closure


@dataclass
class DownEpisode:
    """One agent down: since when, in which state, what was alerted and folded."""

    agent: str
    since: float
    state: str
    restarts: int
    alert_id: str | None = None  # the agent_down alert, once one was raised
    folded: int = 0  # occurrences of dependents' errors folded in
    folded_by_agent: dict[str, int] = field(default_factory=dict)
    sample: dict[str, Any] | None = None  # the first folded error
    first_folded: float | None = None
    last_folded: float | None = None

    def fold(self, agent: str, occurrences: int, at: float, sample: dict[str, Any]) -> None:
        self.folded += occurrences
        self.folded_by_agent[agent] = self.folded_by_agent.get(agent, 0) + occurrences
        if self.sample is None:
            self.sample = sample
        self.first_folded = at if self.first_folded is None else min(self.first_folded, at)
        self.last_folded = at if self.last_folded is None else max(self.last_folded, at)

    def to_state(self) -> dict[str, Any]:
        return {
            "agent": self.agent,
            "since": self.since,
            "state": self.state,
            "restarts": self.restarts,
            "alert_id": self.alert_id,
            "folded": self.folded,
            "folded_by_agent": self.folded_by_agent,
            "sample": self.sample,
            "first_folded": self.first_folded,
            "last_folded": self.last_folded,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> DownEpisode:
        def opt_float(key: str) -> float | None:
            value = state.get(key)
            return float(value) if value is not None else None

        alert = state.get("alert_id")
        sample = state.get("sample")
        return cls(
            agent=str(state["agent"]),
            since=float(state["since"]),
            state=str(state["state"]),
            restarts=int(state.get("restarts", 0)),
            alert_id=str(alert) if alert is not None else None,
            folded=int(state.get("folded", 0)),
            folded_by_agent={str(k): int(v) for k, v in state.get("folded_by_agent", {}).items()},
            sample=dict(sample) if isinstance(sample, Mapping) else None,
            first_folded=opt_float("first_folded"),
            last_folded=opt_float("last_folded"),
        )


class Inhibitor:
    """The down episodes of the mesh's agents and who depends on whom."""

    def __init__(self, dependencies: Mapping[str, Iterable[str]] | None = None) -> None:
        self._depends_on = dependency_closure(dependencies or {})
        self._episodes: dict[str, DownEpisode] = {}

    @property
    def episodes(self) -> dict[str, DownEpisode]:
        """The agents down now, by name (read-only use)."""
        return self._episodes

    def depends_on(self, agent: str) -> frozenset[str]:
        """Every agent `agent` depends on, directly or not."""
        return self._depends_on.get(agent, frozenset())

    def went_down(self, agent: str, state: str, at: float, restarts: int) -> DownEpisode:
        """The agent's episode, started now unless one is on; its state updated."""
        episode = self._episodes.get(agent)
        if episode is None:
            episode = DownEpisode(agent=agent, since=at, state=state, restarts=restarts)
            self._episodes[agent] = episode
        episode.state = state
        return episode

    def came_up(self, agent: str) -> DownEpisode | None:
        """End the agent's episode; the episode, or None when it was not down."""
        return self._episodes.pop(agent, None)

    def cause(self, agent: str, at: float) -> DownEpisode | None:
        """The episode an error of `agent` at time `at` folds into, or None.

        That of a dependency down since `at` or before; of several, the one down
        longest (ties: by name).
        """
        if not self._episodes:
            return None
        best: DownEpisode | None = None
        for dep in self.depends_on(agent):
            episode = self._episodes.get(dep)
            if episode is None or episode.since > at:
                continue
            if best is None or (episode.since, episode.agent) < (best.since, best.agent):
                best = episode
        return best

    def to_state(self) -> list[dict[str, Any]]:
        return [episode.to_state() for episode in self._episodes.values()]

    def restore(self, state: Iterable[Mapping[str, Any]]) -> None:
        """Take the episodes of `to_state()`'s data (the dependencies stay this one's)."""
        self._episodes = {}
        for item in state:
            episode = DownEpisode.from_state(item)
            self._episodes[episode.agent] = episode
