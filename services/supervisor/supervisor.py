"""The supervisor: one machine's share of the mesh, started in dependency order.

`Supervisor.reconcile()` is the one place that compares what should run with
what runs: it launches every agent whose dependencies are ready (within the
concurrency bound), marks agents whose dependencies failed as SKIPPED, and
brings skipped agents back to PENDING when their dependencies recover. It is
called on every state change and can be called at any time.

Agents start as soon as their own dependencies are ready, which refines
"level by level": an agent never waits for unrelated agents of its level.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common.breaker import BreakerConfig, BreakerState, CircuitBreaker
from common.config import Agent, StartupConfig
from common.errors import FailedPreconditionError, NotFoundError
from common.health import HealthResult
from common.logging import get_logger
from services.supervisor.graph import dependents, start_levels, stop_order
from services.supervisor.policy import READY_STATES, AgentState
from services.supervisor.process import agent_environment, log_path
from services.supervisor.watcher import AgentWatcher, HealthProbe, ReadyProbe, WatcherStatus

_log = get_logger(__name__)

# States from which an agent will not become ready without an operator or a restart.
_DOWN_STATES = frozenset({AgentState.FAILED, AgentState.SKIPPED, AgentState.STOPPED})


@dataclass(frozen=True)
class StateChange:
    state: AgentState
    previous: AgentState
    reason: str
    pid: int | None
    restarts: int


class EventSink:
    """Where state changes and supervision errors go (the NATS bus in production)."""

    def agent_state(self, agent: Agent, change: StateChange) -> None:
        """Called on every state change."""

    def breaker_open(self, agent: Agent, restarts: int) -> None:
        """Called when an agent's restart breaker opens."""

    def external_breaker(self, agent: Agent, opened: bool, reason: str) -> None:
        """Called when the reachability breaker of an EXTERNAL agent opens or closes again."""


def default_start_concurrency() -> int:
    """How many agents may be STARTING at once.

    An agent holds its slot until it passes its health gate, so the bound must
    let start-up waits overlap (measured with 272 agents: 16 slots start them in
    waves, 64 on 2 cores is as fast as no bound) while keeping hundreds of
    interpreters from starting on a small machine at once.
    """
    return 32 * (os.cpu_count() or 1)


class ExternalAgent:
    """An agent of another group: polled through its health port, never started here.

    Once it has been up, failed checks count on a circuit breaker with the agent's
    `circuit_breaker` settings (a lost machine or link, rather than one slow
    reply): `failure_threshold` failures within `window_s` open it, which is
    reported, and checks pause for `reset_timeout_s`; then one trial check closes
    it again or reopens it.
    """

    def __init__(
        self,
        agent: Agent,
        health: HealthProbe,
        ready: ReadyProbe | None,
        on_change: Callable[[], None],
        on_breaker: Callable[[ExternalAgent, bool], None] | None = None,
    ) -> None:
        self.agent = agent
        self.name = agent.name
        self._health = health
        self._ready = ready
        self._on_change = on_change
        self._on_breaker = on_breaker
        self.breaker = CircuitBreaker(
            f"external:{agent.name}", BreakerConfig.from_settings(agent.settings.circuit_breaker)
        )
        self.breaker.add_listener(self._breaker_changed)
        self.last_health: HealthResult | None = None
        self.is_ready = False
        self.was_ready = False
        self.reason = "not checked yet"
        self._task: asyncio.Task[None] | None = None

    def _breaker_changed(
        self, old: BreakerState, new: BreakerState, breaker: CircuitBreaker
    ) -> None:
        # HALF_OPEN is only the pause ending; what counts is open, and closed again.
        if new is BreakerState.OPEN and old is BreakerState.CLOSED and self._on_breaker:
            self._on_breaker(self, True)
        elif new is BreakerState.CLOSED and self._on_breaker:
            self._on_breaker(self, False)

    def launch(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._poll(), name=f"external-{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _poll(self) -> None:
        hc = self.agent.settings.health_check
        pause = 0.05
        while True:
            if not self.breaker.allow_request():
                await asyncio.sleep(min(hc.interval_s, 1.0))
                continue
            result = await self._health.check(
                self.agent.host, self.agent.spec.health_check_port, hc.timeout_s
            )
            self.last_health = result
            ready = result.is_up
            self.reason = "" if ready else (result.error or result.status.value)
            if ready:
                self.was_ready = True
                self.breaker.record_success()
            elif self.was_ready:
                self.breaker.record_failure()
                if self.breaker.state is not BreakerState.CLOSED:
                    self.reason = f"circuit breaker open: {self.reason}"
            if ready and self.agent.spec.readiness in ("redis", "both"):
                ready = self._ready is not None and await self._ready.is_ready(self.name)
                self.reason = "" if ready else "no ready key in Redis"
            if ready != self.is_ready:
                self.is_ready = ready
                self._on_change()
            # Poll fast until it is up, then at the configured interval.
            pause = hc.interval_s if ready else min(pause * 1.5, hc.interval_s)
            await asyncio.sleep(pause)

    def status(self) -> WatcherStatus:
        health = self.last_health
        return WatcherStatus(
            agent=self.name,
            group=self.agent.group,
            machine=self.agent.machine,
            state=AgentState.EXTERNAL,
            pid=None,
            uptime_s=None,
            restarts=0,
            breaker=self.breaker.state.value,
            health_status=health.status.value if health else None,
            health_latency_ms=health.latency_s * 1000.0 if health and health.latency_s else None,
            reason=self.reason,
        )


@dataclass
class StartupResult:
    succeeded: bool
    failed_agent: str | None = None
    started_at: float = 0.0
    finished_at: float = 0.0
    outcomes: dict[str, WatcherStatus] = field(default_factory=dict)

    @property
    def elapsed_s(self) -> float:
        return self.finished_at - self.started_at


class Supervisor:
    """Runs the agents of the chosen groups of one config, and watches their dependencies."""

    def __init__(
        self,
        cfg: StartupConfig,
        *,
        groups: Sequence[str] | None,
        nats_url: str,
        redis_url: str,
        health: HealthProbe,
        ready: ReadyProbe | None,
        events: EventSink | None = None,
        max_starting: int | None = None,
        external_timeout_s: float | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.cfg = cfg
        self.groups = (
            list(groups)
            if groups
            else [name for name, g in cfg.agent_groups.items() if g.machine == cfg.machine]
        )
        self.events = events or EventSink()
        self.max_starting = max_starting or default_start_concurrency()
        self._changed = asyncio.Event()
        self.stopping = False
        agents = cfg.agents()
        self.local: dict[str, AgentWatcher] = {}
        run_dir = cfg.run_dir.resolve()
        config_path = (cfg.source or Path("startup_config.yaml")).resolve()
        cwd = config_path.parent
        for name, agent in agents.items():
            if agent.group not in self.groups:
                continue
            env = agent_environment(
                agent,
                nats_url=nats_url,
                redis_url=redis_url,
                config_path=config_path,
                run_dir=run_dir,
            )
            self.local[name] = AgentWatcher(
                agent,
                env=env,
                cwd=cwd,
                log_file=log_path(run_dir, name),
                health=health,
                ready=ready,
                on_change=self._on_watcher_change,
                on_breaker_open=self._on_breaker_open,
                rng=rng,
            )
        needed = {d for n in self.local for d in agents[n].spec.dependencies} - set(self.local)
        self.external: dict[str, ExternalAgent] = {
            name: ExternalAgent(agents[name], health, ready, self._poke, self._on_external_breaker)
            for name in sorted(needed)
        }
        self.deps = {n: list(agents[n].spec.dependencies) for n in self.local}
        self._order = [n for level in start_levels(self.deps) for n in level]
        self._external_timeout_s = external_timeout_s
        self._held: set[str] = set()  # stopped by the operator: reconcile leaves them alone
        self.startup: StartupResult | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._reconcile_scheduled = False

    # -- the one reconciling function --------------------------------------------------

    def _dep_state(self, dep: str) -> tuple[bool, str | None]:
        """(ready, why it will not be) for a dependency, local or external."""
        if dep in self.local:
            w = self.local[dep]
            if w.is_ready:
                return True, None
            if w.state in _DOWN_STATES and not w.launched:
                return False, f"dependency {dep} is {w.state.value}"
            if w.state is AgentState.FAILED and not w.ever_ready.is_set():
                return False, f"dependency {dep} is FAILED"
            return False, None
        ext = self.external[dep]
        return ext.is_ready, None

    def reconcile(self) -> None:
        """Launch what may start now; mark what cannot; called on every change."""
        if self.stopping:
            return
        # Launched but not yet running counts too: its task may not have run yet.
        starting = sum(
            1
            for w in self.local.values()
            if w.state is AgentState.STARTING or (w.launched and w.state is AgentState.PENDING)
        )
        for name in self._order:
            w = self.local[name]
            if name in self._held or w.launched:
                continue
            waiting: list[str] = []
            blocked: str | None = None
            for dep in self.deps[name]:
                ready, why = self._dep_state(dep)
                if why is not None:
                    blocked = why
                    break
                if not ready:
                    waiting.append(dep)
            if blocked is not None:
                w.mark(AgentState.SKIPPED, blocked)
            elif waiting:
                w.mark(AgentState.PENDING, "waiting for " + ", ".join(waiting))
            elif starting < self.max_starting:
                starting += 1
                w.launch()
            else:
                w.mark(AgentState.PENDING, "waiting for a start slot")

    def _poke(self) -> None:
        self._changed.set()
        # Coalesced: a state change made inside reconcile (mark -> on_change) must not
        # re-enter it, or a deep mesh nests one call per waiting agent; every change
        # of one loop iteration is handled by one pass.
        if not self._reconcile_scheduled and not self.stopping:
            self._reconcile_scheduled = True
            asyncio.get_running_loop().call_soon(self._scheduled_reconcile)

    def _scheduled_reconcile(self) -> None:
        self._reconcile_scheduled = False
        self.reconcile()

    def _on_watcher_change(self, watcher: AgentWatcher, previous: AgentState, reason: str) -> None:
        change = StateChange(
            watcher.state, previous, reason, watcher.status().pid, watcher.restarts
        )
        self.events.agent_state(watcher.agent, change)
        if (
            watcher.agent.spec.restart_dependents
            and watcher.state in READY_STATES
            and previous is AgentState.STARTING
            and watcher.restarts > 0
            and not self.stopping
        ):
            self._spawn(self._restart_dependents(watcher.name))
        self._poke()

    async def _on_breaker_open(self, watcher: AgentWatcher) -> None:
        self.events.breaker_open(watcher.agent, watcher.restarts)

    def _on_external_breaker(self, ext: ExternalAgent, opened: bool) -> None:
        _log.warning("external breaker", agent=ext.name, opened=opened, reason=ext.reason)
        self.events.external_breaker(ext.agent, opened, ext.reason)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _restart_dependents(self, name: str) -> None:
        """Restart, in start order, the agents that depend on `name`, each once ready."""
        for dep in dependents(self.deps, name):
            w = self.local.get(dep)
            if w is None or not w.launched:
                continue
            _log.info("restarting dependent", agent=dep, because=name)
            w.request_restart()
            await self._wait_for(functools.partial(_settled, w), timeout_s=_gate_budget(w.agent))

    async def _wait_for(self, condition: Callable[[], bool], timeout_s: float | None) -> bool:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not condition():
            self._changed.clear()
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=remaining)
        return True

    # -- startup and shutdown ------------------------------------------------------------

    def _startup_settled(self) -> bool:
        """Every local agent passed or failed its first gate, or was skipped; or a
        required one failed, which ends startup at once."""
        settled = True
        for w in self.local.values():
            gate_failed = w.gate_done.is_set() and not w.gate_ok
            if w.agent.spec.required and (gate_failed or w.state is AgentState.SKIPPED):
                return True
            if not (w.gate_done.is_set() or w.state is AgentState.SKIPPED):
                settled = False
        return settled

    async def start(self) -> StartupResult:
        """Bring the local agents up; returns once every one is ready, failed or skipped.

        Waiting for EXTERNAL dependencies is bounded by `external_timeout_s`
        (default: twice the longest health gate among them); a required agent
        still waiting then fails the startup.
        """
        result = StartupResult(succeeded=False, started_at=time.monotonic())
        self.startup = result
        for ext in self.external.values():
            ext.launch()
        self.reconcile()
        timeout = self._external_timeout_s
        if timeout is None and self.external:
            timeout = 2 * max(_gate_budget(e.agent) for e in self.external.values())
        await self._wait_for(self._startup_settled, timeout_s=timeout)
        result.failed_agent = next(
            (
                n
                for n in self._order
                if self.local[n].agent.spec.required and not self.local[n].gate_ok
            ),
            None,
        )
        result.succeeded = result.failed_agent is None
        result.finished_at = time.monotonic()
        result.outcomes = {name: w.status() for name, w in self.local.items()}
        return result

    async def shutdown(self) -> None:
        """Stop every local agent in reverse dependency order, each level in parallel."""
        self.stopping = True
        for task in list(self._background):
            task.cancel()
        for level in reversed(start_levels(self.deps)):
            await asyncio.gather(*(self.local[name].stop() for name in level))
        for ext in self.external.values():
            await ext.stop()

    # -- operator commands ---------------------------------------------------------------

    def watcher(self, name: str) -> AgentWatcher:
        if name in self.external:
            raise FailedPreconditionError(f"agent {name!r} is EXTERNAL: it runs in another group")
        if name not in self.local:
            raise NotFoundError(f"unknown agent {name!r}")
        return self.local[name]

    async def restart_agent(self, name: str) -> None:
        w = self.watcher(name)
        self._held.discard(name)
        w.request_restart()

    async def stop_agent(self, name: str) -> None:
        w = self.watcher(name)
        self._held.add(name)
        await w.stop()

    def levels(self) -> list[list[str]]:
        """The local agents by dependency level (for the startup report)."""
        return start_levels(self.deps)

    def stop_sequence(self) -> list[str]:
        return stop_order(self.deps)

    def statuses(self) -> list[WatcherStatus]:
        out = [self.local[n].status() for n in self._order]
        out.extend(ext.status() for ext in self.external.values())
        return out

    def mesh_state(self) -> str:
        if self.stopping:
            return "STOPPING"
        if self.startup is None or not self.startup.finished_at:
            return "STARTING"
        required = [w for w in self.local.values() if w.agent.spec.required]
        if any(w.state is AgentState.FAILED for w in required):
            return "FAILED"
        if all(w.state is AgentState.HEALTHY for w in self.local.values()):
            return "RUNNING"
        return "DEGRADED"


def _settled(w: AgentWatcher) -> bool:
    return w.is_ready or w.state in _DOWN_STATES


def _gate_budget(agent: Agent) -> float:
    hc = agent.settings.health_check
    return hc.start_period_s + hc.interval_s * hc.retries + hc.timeout_s * hc.retries
