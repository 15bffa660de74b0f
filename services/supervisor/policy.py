"""Pure supervision decisions: agent states, when to restart, and how long to wait first."""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import StrEnum

from common.config import RestartSettings
from common.retry import backoff_delay


class AgentState(StrEnum):
    """What `graftmesh status` shows for an agent (names are the public contract)."""

    PENDING = "PENDING"  # not started yet: waiting for its dependencies
    STARTING = "STARTING"  # process started, health gate not passed yet
    HEALTHY = "HEALTHY"
    DEGRADED = "DEGRADED"  # up, but its health reply lists issues
    UNHEALTHY = "UNHEALTHY"  # up, failing liveness checks (not yet `retries` in a row)
    BACKOFF = "BACKOFF"  # exited or killed; waiting to be restarted
    FAILED = "FAILED"  # given up: never ready, restart policy says no, or breaker open
    SKIPPED = "SKIPPED"  # not started because a dependency failed
    EXTERNAL = "EXTERNAL"  # of another group: checked, never started here
    STOPPED = "STOPPED"


# States in which dependents may start and be served.
READY_STATES = frozenset({AgentState.HEALTHY, AgentState.DEGRADED})


class ExitCause(StrEnum):
    EXITED = "exited"
    UNHEALTHY = "unhealthy"  # `retries` failed liveness checks in a row: we killed it


# Half of each backoff is random: restarts of many agents spread out, and none
# comes almost at once after a crash, as it could with full jitter.
RESTART_JITTER = 0.5


@dataclass(frozen=True)
class RestartDecision:
    restart: bool
    delay_s: float
    reason: str


def decide_restart(
    settings: RestartSettings,
    cause: ExitCause,
    exit_code: int | None,
    attempt: int,
    rng: random.Random,
) -> RestartDecision:
    """Whether to restart an agent that went down, and after which backoff.

    `attempt` counts restarts since the agent last ran stably (0 for the first).
    `on-failure` restarts unless the process exited by itself with code 0;
    `always` restarts on any exit; `never` never restarts.
    """
    clean_exit = cause is ExitCause.EXITED and exit_code == 0
    if settings.policy == "never":
        return RestartDecision(False, 0.0, "restart policy is 'never'")
    if settings.policy == "on-failure" and clean_exit:
        return RestartDecision(False, 0.0, "exited with code 0 (policy 'on-failure')")
    delay = backoff_delay(
        attempt + 1, settings.backoff_initial_s, settings.backoff_max_s, rng, jitter=RESTART_JITTER
    )
    what = "unhealthy" if cause is ExitCause.UNHEALTHY else f"exited with code {exit_code}"
    return RestartDecision(True, delay, f"{what}; restart #{attempt + 1} in {delay:.2f}s")


def state_from_health(healthy: bool, degraded: bool) -> AgentState:
    if degraded:
        return AgentState.DEGRADED
    return AgentState.HEALTHY if healthy else AgentState.UNHEALTHY
