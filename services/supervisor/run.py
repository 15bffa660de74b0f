"""`graftmesh up`: infrastructure, the supervisor, its control API, signals, the report."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import warnings
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime

import redis.asyncio as aioredis
from rich.console import Console
from rich.table import Table

from common.bus import ErrorBus, Severity
from common.config import Agent, StartupConfig
from common.grpc_server import GrpcServer
from common.health import HealthClient
from common.infra import InfraUnavailableError, ensure_infra
from common.logging import get_logger, setup_logging
from common.process import tail_lines
from common.ready import discover
from common.stubs import supervisor_pb2_grpc
from services.supervisor.control import SERVICE_NAME, SupervisorServicer
from services.supervisor.exits import EXIT_AGENT, EXIT_CONFIG, EXIT_INFRA, EXIT_OK
from services.supervisor.process import log_path
from services.supervisor.supervisor import EventSink, StartupResult, StateChange, Supervisor

_log = get_logger(__name__)

SUPERVISOR_AGENT = "supervisor"


class BusEvents(EventSink):
    """State changes as `events.agent.<agent>.<state>`; an open breaker as a critical error."""

    def __init__(self, bus: ErrorBus) -> None:
        self._bus = bus
        self._tasks: set[asyncio.Task[None]] = set()

    def agent_state(self, agent: Agent, change: StateChange) -> None:
        payload = {
            "agent": agent.name,
            "group": agent.group,
            "machine": agent.machine,
            "state": change.state.value,
            "previous": change.previous.value,
            "reason": change.reason,
            "pid": change.pid,
            "restarts": change.restarts,
            "timestamp": datetime.now(UTC).isoformat(),
        }
        subject = f"events.agent.{agent.name}.{change.state.value.lower()}"
        task = asyncio.ensure_future(self._bus.publish_event(subject, payload))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def breaker_open(self, agent: Agent, restarts: int) -> None:
        cb = agent.settings.circuit_breaker
        self._bus.report_error(
            f"restart circuit breaker of {agent.name} opened: {cb.failure_threshold} failures "
            f"within {cb.window_s:g}s; restarts paused for {cb.reset_timeout_s:g}s",
            severity=Severity.CRITICAL,
            error_type="CircuitBreakerOpen",
            details={"agent": agent.name, "group": agent.group, "restarts": restarts},
        )

    def external_breaker(self, agent: Agent, opened: bool, reason: str) -> None:
        where = f"{agent.name} on {agent.machine} ({agent.host}:{agent.spec.health_check_port})"
        details = {"agent": agent.name, "group": agent.group, "machine": agent.machine}
        if opened:
            cb = agent.settings.circuit_breaker
            self._bus.report_error(
                f"circuit breaker of external agent {where} opened: {cb.failure_threshold} "
                f"failed checks within {cb.window_s:g}s ({reason})",
                severity=Severity.CRITICAL,
                error_type="CircuitBreakerOpen",
                details=details,
            )
        else:
            self._bus.report_error(
                f"circuit breaker of external agent {where} closed: reachable again",
                severity=Severity.INFO,
                error_type="CircuitBreakerClosed",
                details=details,
            )


class RedisReady:
    """Readiness through the agent's Redis ready key (`readiness: redis|both`)."""

    def __init__(self, url: str) -> None:
        self._client = aioredis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)

    async def is_ready(self, agent: str) -> bool:
        try:
            return await discover(self._client, agent) is not None
        except InfraUnavailableError:
            return False

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._client.aclose()


def _use_pidfd_child_watcher() -> None:
    """One pidfd per child on the event loop, instead of a waiting thread per child.

    Python 3.11's default child watcher starts a thread for every child; with
    hundreds of agents that is hundreds of threads. Linux 5.3+ has pidfds.
    """
    if not sys.platform.startswith("linux"):
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            watcher = asyncio.PidfdChildWatcher()
            watcher.attach_loop(asyncio.get_running_loop())
            asyncio.set_child_watcher(watcher)
        except (AttributeError, OSError, NotImplementedError):
            pass


def print_report(result: StartupResult, sup: Supervisor, out: Console) -> None:
    table = Table(
        title=f"startup: {result.elapsed_s:.2f}s to all ready", box=None, header_style="bold"
    )
    for column in ("LEVEL", "AGENT", "STATE", "READY AFTER", "ATTEMPTS", "MESSAGE"):
        table.add_column(column)
    for index, level in enumerate(sup.levels()):
        for name in level:
            st = result.outcomes[name]
            table.add_row(
                str(index),
                name,
                st.state.value,
                f"{st.start_s:.2f}s" if st.start_s is not None else "-",
                str(st.restarts + 1),
                st.reason,
            )
    for ext in sup.external.values():
        table.add_row("-", ext.name, "EXTERNAL", "-", "-", ext.reason or "up")
    out.print(table)


def _print_failure(sup: Supervisor, name: str, err: Console) -> None:
    w = sup.local[name]
    err.print(f"[bold red]required agent {name} did not become ready[/]: {w.reason}")
    health = w.last_health
    if health is not None:
        err.print(
            f"  last health reply: {health.reply if health.reply else health.error}", markup=False
        )
    tail = tail_lines(log_path(sup.cfg.run_dir, name), 20)
    if tail:
        err.print(f"  last lines of its log:\n{tail}", markup=False, highlight=False)


async def supervise(
    cfg: StartupConfig,
    groups: Sequence[str] | None,
    out: Console,
    err: Console,
    *,
    stop: asyncio.Event | None = None,
    then: Callable[[Supervisor], Awaitable[int]] | None = None,
) -> int:
    """Run the mesh until `stop` (or SIGINT/SIGTERM) is set. With `then`: once the
    mesh is up, run it, shut down when it returns, and exit with its code."""
    _use_pidfd_child_watcher()
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    run_dir = cfg.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        infra = await ensure_infra(cfg.infra, run_dir)
    except InfraUnavailableError as exc:
        err.print(f"[bold red]infrastructure unavailable:[/] {exc}")
        return EXIT_INFRA
    bus = ErrorBus(nats_url=infra.nats_url, machine=cfg.machine, agent=SUPERVISOR_AGENT)
    await bus.start()
    health = HealthClient()
    ready = RedisReady(infra.redis_url)
    sup = Supervisor(
        cfg,
        groups=groups,
        nats_url=infra.nats_url,
        redis_url=infra.redis_url,
        health=health,
        ready=ready,
        events=BusEvents(bus),
    )
    control = GrpcServer(
        "127.0.0.1",
        cfg.supervisor.control_port,
        on_internal_error=lambda m, e: bus.report_error(f"control API error in {m}", exc=e),
    )
    control.add_services([SERVICE_NAME])
    supervisor_pb2_grpc.add_SupervisorServiceServicer_to_server(
        SupervisorServicer(sup, stop.set), control.server
    )
    try:
        try:
            await control.start()
        except OSError:
            err.print(
                f"[bold red]control port {cfg.supervisor.control_port} is in use[/]: is "
                "another supervisor running for this config? (`graftmesh status`)"
            )
            return EXIT_CONFIG
        out.print(
            f"graftmesh: starting {len(sup.local)} agents of groups "
            f"{', '.join(sup.groups) or '(none)'} on {cfg.machine}"
        )
        start = asyncio.create_task(sup.start())
        stopped = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({start, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if start not in done:
            out.print("interrupted during startup: stopping what was started")
            start.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await start
            return EXIT_OK
        stopped.cancel()
        result = start.result()
        print_report(result, sup, out)
        if not result.succeeded:
            assert result.failed_agent is not None
            _print_failure(sup, result.failed_agent, err)
            return EXIT_AGENT
        if then is not None:
            return await then(sup)
        out.print(
            f"mesh {sup.mesh_state()}; control API on 127.0.0.1:"
            f"{cfg.supervisor.control_port}. Ctrl-C or `graftmesh down` to stop."
        )
        await stop.wait()
        out.print("shutting down")
        return EXIT_OK
    finally:
        await sup.shutdown()
        await control.stop(1.0)
        await ready.close()
        health.close()
        await bus.close(timeout_s=2.0)
        await infra.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def run_up(
    cfg: StartupConfig,
    groups: Sequence[str] | None,
    out: Console,
    err: Console,
    then: Callable[[Supervisor], Awaitable[int]] | None = None,
) -> int:
    setup_logging(
        SUPERVISOR_AGENT,
        cfg.machine,
        log_file=cfg.run_dir / "logs" / "supervisor.log",
        stream_level="WARNING",
    )
    return asyncio.run(supervise(cfg, groups, out, err, then=then))
