"""The console agent: the web console (`services.console.web`) served by uvicorn.

`build` is what `python -m services.console` runs (`common.agent.run(build)`). The
agent serves no gRPC: its `port` in `startup_config.yaml` is its HTTP port, which
it binds itself on the machine's host. uvicorn runs inside the runtime's event
loop, so the runtime's SIGTERM drain stops it (`stop`). Settings come from the
environment (`services.console.settings`); the agents it shows from the mesh's
config (`GRAFTMESH_CONFIG`).

Health: `healthy` while it serves. Details: `http` (host:port), `sessions`,
`listeners` (open event streams), `live_feed` (subscribed to NATS), `events`,
`alerts`, `access` (`token`, `token, read-only open` or `open`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Generator, Sequence
from typing import Final

import grpc
import uvicorn

from common.agent import AgentContext, bind_address, run_every
from common.errors import ConfigError
from common.logging import get_logger
from services.console.clients import MeshClients
from services.console.feed import LiveFeed
from services.console.settings import ConsoleSettings
from services.console.web import ConsoleApp, build_app

__all__ = ["ConsoleAgent", "build"]

_log = get_logger(__name__)

_START_TIMEOUT_S: Final = 10.0
_STOP_TIMEOUT_S: Final = 5.0
_HEALTH_REFRESH_S: Final = 1.0


class _Server(uvicorn.Server):
    """uvicorn that leaves signals alone: the agent runtime owns SIGTERM and SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError as err:
        sock.close()
        raise ConfigError(
            [f"the console cannot listen on {host}:{port}: {err.strerror or err}"]
        ) from None
    return sock


class ConsoleAgent:
    """The console's lifecycle: the live feed, the HTTP server and its health."""

    service_names: Sequence[str] = ()

    def __init__(self, ctx: AgentContext, settings: ConsoleSettings) -> None:
        if ctx.env.port is None:
            raise ConfigError(["the console needs a `port` in startup_config.yaml (its HTTP port)"])
        self._ctx = ctx
        self.settings = settings
        # The runtime's listen address (GRAFTMESH_BIND_HOST, else the machine's host).
        self.host: str = bind_address(ctx.env.listen_host)
        self.port: int = ctx.env.port
        self.clients = MeshClients(ctx.config, settings)
        self.feed = LiveFeed(ctx.bus, alerts_kept=settings.alerts_kept)
        self.app = ConsoleApp(settings, self.clients, self.feed, ctx.bus, machine=ctx.env.machine)
        self._server: _Server | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def add_to_server(self, server: grpc.aio.Server) -> None:
        return None

    async def start(self) -> None:
        sock = _bind(self.host, self.port)
        config = uvicorn.Config(
            build_app(self.app),
            log_config=None,
            access_log=False,
            lifespan="off",
            server_header=False,
            proxy_headers=False,
            timeout_graceful_shutdown=1,
        )
        self._server = _Server(config)
        serve = asyncio.create_task(self._server.serve(sockets=[sock]), name="console-http")
        self._tasks = [
            serve,
            asyncio.create_task(self.feed.run(), name="console-feed"),
            asyncio.create_task(
                run_every(_HEALTH_REFRESH_S, self._refresh_details, what="console health details"),
                name="console-health",
            ),
        ]
        async with asyncio.timeout(_START_TIMEOUT_S):
            while not self._server.started:
                if serve.done():
                    serve.result()  # raises what stopped it
                    raise RuntimeError("the console's HTTP server stopped while starting")
                await asyncio.sleep(0.02)
        self._refresh_details()
        _log.info("console serving", url=f"http://{self.host}:{self.port}/")

    async def stop(self) -> None:
        self.app.stopping.set()
        self.feed.stop()
        if self._server is not None:
            self._server.should_exit = True
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            if task.get_name() == "console-health":
                task.cancel()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_STOP_TIMEOUT_S):
                for task in tasks:
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        for task in tasks:
            task.cancel()
        await self.clients.close()

    def _refresh_details(self) -> None:
        stats = self.feed.stats
        if self.settings.open_access:
            access = "open"
        elif self.settings.readonly_open:
            access = "token, read-only open"
        else:
            access = "token"
        self._ctx.health.update_details(
            http=f"{self.host}:{self.port}",
            access=access,
            sessions=len(self.app.sessions),
            listeners=self.feed.listeners,
            live_feed=stats.subscribed,
            events=stats.events,
            alerts=stats.alerts,
        )
        if self._tasks and self._tasks[0].done():
            self._ctx.health.set("unhealthy", ["the HTTP server stopped"])


def build(ctx: AgentContext) -> ConsoleAgent:
    """The console agent of this process, its settings read from the environment."""
    return ConsoleAgent(ctx, ConsoleSettings.from_environ(os.environ))
