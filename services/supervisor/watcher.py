"""One agent under supervision: start, health gate, liveness, restarts, breaker, stop.

A watcher owns exactly one agent and one task (`run`). The arbiter decides
*when* an agent may start (its dependencies are ready); the watcher decides
everything that concerns the agent itself, and reports each state change to
the arbiter through `on_change`.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from common.breaker import BreakerConfig, BreakerState, CircuitBreaker
from common.config import Agent
from common.health import HealthResult, HealthStatus
from common.logging import get_logger
from services.supervisor.policy import (
    READY_STATES,
    AgentState,
    ExitCause,
    decide_restart,
)
from services.supervisor.process import AgentProcess

_log = get_logger(__name__)

# While an agent starts, its health is polled this often (capped by interval_s),
# so that a fast agent is seen ready in tens of milliseconds, not after interval_s.
_STARTUP_POLL_S = 0.05
_STARTUP_POLL_MAX_S = 0.2


class HealthProbe(Protocol):
    async def check(self, host: str, port: int, timeout_s: float = 1.0) -> HealthResult: ...


class ReadyProbe(Protocol):
    async def is_ready(self, agent: str) -> bool: ...


@dataclass
class WatcherStatus:
    """A snapshot for `graftmesh status` and the control API."""

    agent: str
    group: str
    machine: str
    state: AgentState
    pid: int | None
    uptime_s: float | None
    restarts: int
    breaker: str
    health_status: str | None
    health_latency_ms: float | None
    issues: list[str] = field(default_factory=list)
    reason: str = ""
    start_s: float | None = None  # seconds from launch to ready, at the first start
    required: bool = True
    port: int | None = None
    health_check_port: int = 0
    last_exit_code: int | None = None


class AgentWatcher:
    """Supervises one local agent. Start with `launch()`; `stop()` ends it for good."""

    def __init__(
        self,
        agent: Agent,
        *,
        env: Mapping[str, str],
        cwd: Path,
        log_file: Path,
        health: HealthProbe,
        ready: ReadyProbe | None,
        on_change: Callable[[AgentWatcher, AgentState, str], None],
        on_breaker_open: Callable[[AgentWatcher], Awaitable[None]] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.agent = agent
        self.name = agent.name
        self._env = dict(env)
        self._cwd = cwd
        self._log_file = log_file
        self._health = health
        self._ready = ready
        self._on_change = on_change
        self._on_breaker_open = on_breaker_open
        self._rng = rng or random.Random()
        settings = agent.settings
        self.breaker = CircuitBreaker(
            f"agent:{agent.name}", BreakerConfig.from_settings(settings.circuit_breaker)
        )
        self.state = AgentState.PENDING
        self.reason = ""
        self.process: AgentProcess | None = None
        self.restarts = 0
        self.last_exit_code: int | None = None
        self.last_health: HealthResult | None = None
        self.first_launch_at: float | None = None
        self.first_ready_at: float | None = None
        self.ever_ready = asyncio.Event()
        # The first health gate: set once it passed (gate_ok) or failed.
        self.gate_done = asyncio.Event()
        self.gate_ok = False
        self._ready_this_life = False
        self._ready_at: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._restart_now = asyncio.Event()

    # -- state -------------------------------------------------------------------------

    @property
    def is_ready(self) -> bool:
        return self.state in READY_STATES

    def _set(self, state: AgentState, reason: str = "") -> None:
        if state == self.state and reason == self.reason:
            return
        previous = self.state
        self.state = state
        self.reason = reason
        _log.info(
            "agent state",
            agent=self.name,
            state=state.value,
            previous=previous.value,
            reason=reason,
        )
        self._on_change(self, previous, reason)

    def mark(self, state: AgentState, reason: str = "") -> None:
        """Set a state decided by the arbiter (SKIPPED, PENDING) for an agent not running."""
        self._set(state, reason)

    def status(self) -> WatcherStatus:
        proc = self.process
        uptime = None
        if proc is not None and proc.running and proc.started_at is not None:
            uptime = time.monotonic() - proc.started_at
        health = self.last_health
        start_s = None
        if self.first_launch_at is not None and self.first_ready_at is not None:
            start_s = self.first_ready_at - self.first_launch_at
        return WatcherStatus(
            agent=self.name,
            group=self.agent.group,
            machine=self.agent.machine,
            state=self.state,
            pid=proc.pid if proc is not None and proc.running else None,
            uptime_s=uptime,
            restarts=self.restarts,
            breaker=self.breaker.state.value,
            health_status=health.status.value if health else None,
            health_latency_ms=(health.latency_s * 1000.0)
            if health and health.latency_s is not None
            else None,
            issues=_issues(health),
            reason=self.reason,
            start_s=start_s,
            required=self.agent.spec.required,
            port=self.agent.spec.port,
            health_check_port=self.agent.spec.health_check_port,
            last_exit_code=self.last_exit_code,
        )

    # -- lifecycle -----------------------------------------------------------------------

    def launch(self) -> None:
        """Start supervising: spawn the agent and keep it running per its policy."""
        if self._task is None or self._task.done():
            self._stopping = False
            self._task = asyncio.create_task(self._run(), name=f"watch-{self.name}")
            self._task.add_done_callback(self._on_task_done)

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        _log.error("supervision of agent failed", agent=self.name, exc_info=exc)
        self._set(AgentState.FAILED, f"supervisor error: {type(exc).__name__}: {exc}")
        if not self.gate_done.is_set():
            self.gate_done.set()

    @property
    def launched(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        """Stop the agent (SIGTERM, grace, SIGKILL of its group) and stop supervising it."""
        self._stopping = True
        self._restart_now.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._kill_process()
        self._set(AgentState.STOPPED, "stopped")

    def request_restart(self) -> None:
        """Restart now (operator's request): no backoff, the breaker is reset, not charged."""
        self.breaker.reset()
        if not self.launched:
            self.launch()
            return
        self._restart_now.set()

    async def _kill_process(self) -> int | None:
        proc, self.process = self.process, None
        if proc is None:
            return None
        code = await proc.stop(self.agent.settings.stop_grace_s)
        self.last_exit_code = code
        return code

    async def _run(self) -> None:
        attempt = 0  # restarts since the agent last ran stably: drives the backoff
        stable_s = self.agent.settings.restart.backoff_max_s
        while not self._stopping:
            self._ready_this_life = False
            cause, code = await self._one_life()
            if self._stopping:
                return
            self.restarts += 1
            if cause is None:  # the operator asked for a restart: straight back up
                attempt = 0
                continue
            if self._ready_this_life and self._stable_for_s() >= stable_s:
                attempt = 0  # it ran long enough: this is a new incident, not a crash loop
            self.breaker.record_failure()
            if self.breaker.state is BreakerState.OPEN:
                await self._breaker_open()
                continue
            decision = decide_restart(self.agent.settings.restart, cause, code, attempt, self._rng)
            if not decision.restart:
                self.restarts -= 1
                self._set(AgentState.STOPPED if code == 0 else AgentState.FAILED, decision.reason)
                return
            self._set(AgentState.BACKOFF, decision.reason)
            await self._pause(decision.delay_s)
            attempt += 1

    async def _breaker_open(self) -> None:
        """Restarts pause until the breaker admits one trial start (half-open)."""
        reset_s = self.agent.settings.circuit_breaker.reset_timeout_s
        self._set(AgentState.FAILED, f"circuit breaker open: restarts paused for {reset_s:g}s")
        if self._on_breaker_open is not None:
            await self._on_breaker_open(self)
        await self._pause(reset_s)
        while not self._stopping and not self.breaker.allow_request():
            await self._pause(0.1)

    async def _pause(self, delay_s: float) -> None:
        """Sleep for a backoff, cut short by an operator's restart or a stop."""
        self._restart_now.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._restart_now.wait(), timeout=delay_s)

    async def _one_life(self) -> tuple[ExitCause | None, int | None]:
        """Spawn, pass the gate, watch liveness; how it ended (None: operator restart)."""
        self._restart_now.clear()
        self.process = AgentProcess(self.agent, self._env, self._cwd, self._log_file)
        self._set(AgentState.STARTING, "")
        if self.first_launch_at is None:
            self.first_launch_at = time.monotonic()
        try:
            await self.process.start()
        except OSError as err:
            self.process = None
            return ExitCause.EXITED, _spawn_failure_code(err)
        exit_wait: asyncio.Task[Any] = asyncio.create_task(
            self.process.wait(), name=f"exit-{self.name}"
        )
        restart_wait: asyncio.Task[Any] = asyncio.create_task(self._restart_now.wait())
        gate: asyncio.Task[Any] = asyncio.create_task(self._gate())
        tasks = [exit_wait, restart_wait, gate]
        try:
            await asyncio.wait({gate, exit_wait, restart_wait}, return_when=asyncio.FIRST_COMPLETED)
            if restart_wait.done():
                await self._kill_process()
                return None, None
            if exit_wait.done():
                code = self.last_exit_code = exit_wait.result()
                self.process = None
                self._note_gate_failure(f"exited with code {code} before it was ready")
                return ExitCause.EXITED, code
            if not gate.result():
                await self._kill_process()
                self._note_gate_failure(self.reason or "never became healthy")
                return ExitCause.UNHEALTHY, None
            self._became_ready()
            live: asyncio.Task[Any] = asyncio.create_task(self._liveness())
            tasks.append(live)
            await asyncio.wait({live, exit_wait, restart_wait}, return_when=asyncio.FIRST_COMPLETED)
            if restart_wait.done():
                await self._kill_process()
                return None, None
            if exit_wait.done():
                code = self.last_exit_code = exit_wait.result()
                self.process = None
                self._set(AgentState.BACKOFF, f"exited with code {code}")
                return ExitCause.EXITED, code
            await self._kill_process()
            return ExitCause.UNHEALTHY, None
        finally:
            # Also on cancellation (stop): no check of this life may outlive it.
            for task in tasks:
                task.cancel()

    def _note_gate_failure(self, reason: str) -> None:
        self._set(AgentState.FAILED if not self.ever_ready.is_set() else AgentState.BACKOFF, reason)
        if not self.gate_done.is_set():
            self.gate_ok = False
            self.gate_done.set()

    def _stable_for_s(self) -> float:
        """How long the life that just ended was ready."""
        return time.monotonic() - self._ready_at if self._ready_at is not None else 0.0

    def _became_ready(self) -> None:
        self._ready_at = time.monotonic()
        if self.first_ready_at is None:
            self.first_ready_at = self._ready_at
        self._ready_this_life = True
        self.ever_ready.set()
        if not self.gate_done.is_set():
            self.gate_ok = True
            self.gate_done.set()
        self.breaker.record_success()
        self._apply_health(self.last_health)

    def _apply_health(self, result: HealthResult | None) -> None:
        if result is None or result.status is HealthStatus.HEALTHY:
            self._set(AgentState.HEALTHY, "")
        elif result.status is HealthStatus.DEGRADED:
            self._set(AgentState.DEGRADED, "; ".join(_issues(result)) or "degraded")

    async def _check(self) -> HealthResult:
        hc = self.agent.settings.health_check
        result = await self._health.check(
            self.agent.host, self.agent.spec.health_check_port, hc.timeout_s
        )
        self.last_health = result
        return result

    async def _gate(self) -> bool:
        """The health gate: True once ready as `readiness` says; False when it gives up.

        Failures inside `start_period_s` do not count; after it, `retries`
        consecutive failed checks `interval_s` apart fail the gate.
        """
        hc = self.agent.settings.health_check
        readiness = self.agent.spec.readiness
        started = time.monotonic()
        failures = 0
        poll = min(_STARTUP_POLL_S, hc.interval_s)
        while True:
            ok = True
            if readiness in ("health", "both"):
                result = await self._check()
                ok = result.is_up
                if not ok:
                    self.reason = result.error or result.status.value
            if ok and readiness in ("redis", "both"):
                ok = self._ready is not None and await self._ready.is_ready(self.name)
                if not ok:
                    self.reason = "no ready key in Redis yet"
            if ok:
                return True
            in_start_period = time.monotonic() - started < hc.start_period_s
            if not in_start_period:
                failures += 1
                if failures >= hc.retries:
                    return False
                await asyncio.sleep(hc.interval_s)
            else:
                # Poll fast at first, backing off to at most _STARTUP_POLL_MAX_S: every
                # level of the graph waits for this detection, so it stays short.
                await asyncio.sleep(poll)
                poll = min(poll * 1.5, hc.interval_s, _STARTUP_POLL_MAX_S)

    async def _liveness(self) -> None:
        """Returns when `retries` consecutive liveness checks failed."""
        hc = self.agent.settings.health_check
        failures = 0
        while True:
            await asyncio.sleep(hc.interval_s)
            result = await self._check()
            if result.is_up:
                failures = 0
                self._apply_health(result)
                continue
            failures += 1
            if failures >= hc.retries:
                self._set(AgentState.UNHEALTHY, f"{failures} failed health checks: {result.error}")
                return
            self._set(AgentState.UNHEALTHY, f"health check failed ({failures}/{hc.retries})")


def _issues(result: HealthResult | None) -> list[str]:
    if result is None or not isinstance(result.reply, dict):
        return []
    issues: Any = result.reply.get("issues") or []
    return [str(i) for i in issues] if isinstance(issues, list) else [str(issues)]


def _spawn_failure_code(err: OSError) -> int:
    # Like a shell: 127 for a command that does not exist, 126 for one that cannot run.
    return 127 if isinstance(err, FileNotFoundError) else 126
