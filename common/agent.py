"""The runtime every agent runs on.

An agent's `__main__.py` is one line, `run(build)`, where `build` makes the
agent's own `AgentService` from an `AgentContext`. The runtime reads the
`GRAFTMESH_*` environment the supervisor hands over, then, in order:

1. starts the ZMQ health responder at once (reporting `unhealthy: starting`), so
   the supervisor sees a live process while the agent loads;
2. connects the error bus (in the background: NATS may come later);
3. builds the service, starts the gRPC server (health, reflection, tracing,
   metrics, error mapping) and the service itself;
4. starts the Redis ready heartbeat and reports `healthy`;
5. on SIGTERM/SIGINT drains: health says `unhealthy: draining`, the ready key is
   removed, the server stops accepting and in-flight calls get the grace period,
   the service stops, the bus is flushed, exit 0.

An exception that escapes (during start, from a background task or a thread)
is reported to the error bus as `critical` before the process exits 1.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import os
import signal
import socket
import sys
import threading
import traceback
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc

from common import security, telemetry
from common.allocator import tune_allocator
from common.bus import ErrorBus, Severity
from common.config import StartupConfig, load_config
from common.errors import ConfigError
from common.grpc_server import GrpcServer
from common.health import HealthResponder, HealthState
from common.logging import get_logger, setup_logging
from common.process import parent_is
from common.ready import ReadyHeartbeat

_log = get_logger(__name__)

# The agent finishes draining a little before the supervisor's SIGKILL deadline.
_GRACE_SHARE = 0.8
DEFAULT_STOP_GRACE_S = 10.0


def _int_env(environ: Mapping[str, str], key: str, required: bool = False) -> int | None:
    raw = environ.get(key)
    if raw in (None, ""):
        if required:
            raise ConfigError([f"{key} is not set (the supervisor sets it for every agent)"])
        return None
    try:
        return int(raw)
    except ValueError:
        raise ConfigError([f"{key}={raw!r} is not a port number"]) from None


def env_number(
    environ: Mapping[str, str], key: str, default: float, minimum: float, problems: list[str]
) -> float:
    """An agent setting read from `environ[key]`: `default` when unset; a value that is not
    a number, or is below `minimum`, adds a line to `problems` and gives `default`."""
    raw = environ.get(key, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):  # "nan" and "inf" parse, but are no setting
        problems.append(f"{key}={raw!r}: not a number")
        return default
    if value < minimum:
        problems.append(f"{key}={raw!r}: must be >= {minimum:g}")
        return default
    return value


async def run_every(
    interval_s: float,
    step: Callable[[], Awaitable[None] | None],
    *,
    what: str,
    bus: ErrorBus | None = None,
) -> None:
    """Run `step` every `interval_s` seconds until cancelled.

    A round that raises is logged (and reported to `bus`, when given) as
    "`what` failed", and the next round comes all the same.
    """
    while True:
        await asyncio.sleep(interval_s)
        try:
            result = step()
            if result is not None:
                await result
        except Exception as exc:
            _log.exception(f"{what} failed")
            if bus is not None:
                bus.report_error(f"{what} failed", exc=exc)


@dataclass(frozen=True)
class AgentEnv:
    """The `GRAFTMESH_*` environment the supervisor hands to every agent."""

    agent: str
    group: str
    machine: str
    host: str
    port: int | None
    health_port: int
    metrics_port: int | None
    nats_url: str
    redis_url: str
    config_path: Path | None
    run_dir: Path
    # Where to listen; `host` is where others reach it (they differ behind NAT or in a pod).
    bind_host: str = ""

    @property
    def listen_host(self) -> str:
        return self.bind_host or self.host

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> AgentEnv:
        env = os.environ if environ is None else environ
        agent = env.get("GRAFTMESH_AGENT")
        if not agent:
            raise ConfigError(
                ["GRAFTMESH_AGENT is not set (the supervisor sets it for every agent)"]
            )
        health_port = _int_env(env, "GRAFTMESH_HEALTH_PORT", required=True)
        assert health_port is not None
        config = env.get("GRAFTMESH_CONFIG")
        return cls(
            agent=agent,
            group=env.get("GRAFTMESH_GROUP", ""),
            machine=env.get("GRAFTMESH_MACHINE", "local"),
            host=env.get("GRAFTMESH_HOST", "127.0.0.1"),
            port=_int_env(env, "GRAFTMESH_PORT"),
            health_port=health_port,
            metrics_port=_int_env(env, "GRAFTMESH_METRICS_PORT"),
            nats_url=env.get("GRAFTMESH_NATS_URL", "nats://127.0.0.1:4222"),
            redis_url=env.get("GRAFTMESH_REDIS_URL", "redis://127.0.0.1:6379/0"),
            config_path=Path(config) if config else None,
            run_dir=Path(env.get("GRAFTMESH_RUN_DIR", ".graftmesh")),
            bind_host=env.get("GRAFTMESH_BIND_HOST", ""),
        )


@dataclass
class AgentContext:
    """What an agent's own code gets from the runtime."""

    env: AgentEnv
    config: StartupConfig | None
    bus: ErrorBus
    health: HealthState

    @property
    def stop_grace_s(self) -> float:
        if self.config is not None and self.env.agent in self.config.agents():
            return self.config.agent(self.env.agent).settings.stop_grace_s
        return DEFAULT_STOP_GRACE_S


class AgentService(Protocol):
    """The agent's own part: its gRPC servicers and its lifecycle.

    `service_names` are the full gRPC names it serves (for health and
    reflection); `add_to_server` registers the servicers; `start` runs after the
    server is up; `stop` runs after the server stopped accepting calls and
    finishes or hands back the work in progress.
    """

    @property
    def service_names(self) -> Sequence[str]: ...

    def add_to_server(self, server: grpc.aio.Server) -> None: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


ServiceFactory = Callable[[AgentContext], AgentService]


def bind_address(host: str) -> str:
    """`host` as an address to listen on: ZMQ binds IP addresses, not host names.

    Host names (`mainpc` in a config, mapped in /etc/hosts or DNS) are resolved to
    their IPv4 address; the wildcard `*` and IP addresses pass unchanged.
    """
    if host == "*":
        return "0.0.0.0"
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    try:
        return socket.gethostbyname(host)
    except OSError as err:
        raise ConfigError([f"cannot resolve the host {host!r} to listen on: {err}"]) from None


def _load_own_config(env: AgentEnv) -> StartupConfig | None:
    if env.config_path is None or not env.config_path.exists():
        return None
    return load_config(env.config_path, machine=env.machine)


def _install_crash_reporting(bus: ErrorBus, loop: asyncio.AbstractEventLoop) -> None:
    """Uncaught exceptions anywhere in the process reach the error bus."""

    def thread_hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_value is not None:
            bus.report_error(
                f"uncaught exception in thread {args.thread.name if args.thread else '?'}",
                severity=Severity.CRITICAL,
                exc=args.exc_value,
            )
        if args.exc_value is not None:
            sys.stderr.write("".join(traceback.format_exception(args.exc_value)))

    def loop_hook(loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        exc = context.get("exception")
        bus.report_error(
            str(context.get("message", "unhandled error in the event loop")),
            severity=Severity.ERROR,
            exc=exc if isinstance(exc, BaseException) else None,
        )
        loop.default_exception_handler(context)

    threading.excepthook = thread_hook
    loop.set_exception_handler(loop_hook)


async def serve(build: ServiceFactory, env: AgentEnv) -> int:
    """Run one agent until SIGTERM/SIGINT; the exit code (0 after a clean drain)."""
    loop = asyncio.get_running_loop()
    config = _load_own_config(env)
    health = HealthState(env.agent)
    health.set("unhealthy", ["starting"])
    listen = bind_address(env.listen_host)
    responder = HealthResponder(health, f"tcp://{listen}:{env.health_port}")
    responder.start()
    bus = ErrorBus(nats_url=env.nats_url, machine=env.machine, agent=env.agent)
    await bus.start()
    _install_crash_reporting(bus, loop)
    ctx = AgentContext(env=env, config=config, bus=bus, health=health)

    stop_requested = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)

    server: GrpcServer | None = None
    service: AgentService | None = None
    heartbeat: ReadyHeartbeat | None = None
    exit_code = 0
    try:
        service = build(ctx)
        # An agent without gRPC services (e.g. one serving HTTP) owns its port itself.
        if env.port is not None and service.service_names:
            server = GrpcServer(
                listen,
                env.port,
                on_internal_error=lambda method, exc: bus.report_error(
                    f"unhandled error in {method}", severity=Severity.ERROR, exc=exc
                ),
            )
            server.add_services(service.service_names)
            service.add_to_server(server.server)
            await server.start()
        await service.start()
        heartbeat = ReadyHeartbeat(
            env.redis_url,
            agent=env.agent,
            machine=env.machine,
            host=env.host,
            port=env.port,
            health_check_port=env.health_port,
        )
        await heartbeat.start()
        if health.snapshot()["issues"] == ["starting"]:
            health.set("healthy")
        _log.info("agent ready", port=env.port, health_port=env.health_port)
        await stop_requested.wait()
        _log.info("draining")
    except Exception as exc:
        exit_code = 1
        _log.exception("agent failed")
        bus.report_error(f"agent {env.agent} failed: {exc}", severity=Severity.CRITICAL, exc=exc)
    finally:
        health.set("unhealthy", ["draining"])
        grace = ctx.stop_grace_s * _GRACE_SHARE
        if heartbeat is not None:
            await heartbeat.stop()
        if server is not None:
            await server.stop(grace)
        if service is not None:
            try:
                await asyncio.wait_for(service.stop(), timeout=grace)
            except Exception as exc:
                exit_code = exit_code or 1
                _log.exception("service stop failed")
                bus.report_error("service stop failed", severity=Severity.ERROR, exc=exc)
        await bus.close(timeout_s=max(1.0, grace / 4))
        responder.stop()
    return exit_code


def run(build: ServiceFactory, environ: Mapping[str, str] | None = None) -> None:
    """Entry point of an agent's `__main__`: set up logging and telemetry, serve, exit."""
    tune_allocator(environ)
    try:
        env = AgentEnv.from_environ(environ)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    supervisor = (environ if environ is not None else os.environ).get("GRAFTMESH_SUPERVISOR_PID")
    if not parent_is(int(supervisor) if supervisor else None):
        print("error: the supervisor that started this agent is gone", file=sys.stderr)
        sys.exit(1)
    setup_logging(env.agent, env.machine, level=os.environ.get("GRAFTMESH_LOG_LEVEL", "INFO"))
    try:
        security.current()
        metrics_host = bind_address(env.listen_host)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    tel = telemetry.setup_telemetry(
        env.agent, env.machine, metrics_port=env.metrics_port, metrics_host=metrics_host
    )
    try:
        code = asyncio.run(serve(build, env))
    finally:
        tel.shutdown()
    sys.exit(code)
