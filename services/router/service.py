"""The router agent: `RouterService` (gRPC) over the catalog, and its background work.

`build` is what `python -m services.router` runs (`common.agent.run(build)`).
Settings: `ROUTER_CONFIG` (see `settings`); the registry is found at
`registry_address`, else through its ready key / the config
(`registry_agent`, default `registry`).

Background work of `RouterAgent`:

- model events from NATS refresh the model they name (`events`);
- every `reconcile_interval_s`, every tracked model is refreshed from the
  registry and the loaded versions reconciled (idle ones unloaded);
- every `canary.interval_s`, canaries are judged (`canary_watch`);
- every second the health is brought in line: `degraded` while the registry is
  unreachable (the router keeps serving what it has loaded), while a version an
  alias or route still wants was refused, or while a version has too few
  healthy replicas (panic mode);
  `healthy` otherwise. An `unhealthy` status belongs to the runtime (starting,
  draining) and is left alone.

How the wire maps onto the core:

- Infer: `inference.InferenceRouter` (the errors it raises become the codes
  the contract names).
- GetRoutes: every alias the router knows of each model it tracks (a model
  named in the request is read from the registry first), explicit routes
  with their actor and reason, implicit ones (`explicit = false`) as one target
  of weight 1.
- SetRoute: the model must exist and every target version too (NOT_FOUND
  naming `targets[i].version`); the versions start loading at once; empty
  targets clear the route. Routes live in the router's memory.
- GetStats: per loaded version and per replica, over `stats_window_s`; a
  version's `traffic_share[alias]` is its share of the alias's route among the
  versions that can serve now (ejected or loading ones get 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import grpc
import torch
from google.protobuf.timestamp_pb2 import Timestamp

from common.agent import AgentContext, run_every
from common.bus import ErrorBus, Severity
from common.errors import ConfigError, GraftmeshError, NotFoundError
from common.grpc_server import Context
from common.health import HealthState
from common.logging import get_logger
from common.ready import resolve_address
from common.stubs import common_pb2, router_pb2, router_pb2_grpc
from services.router.canary_watch import CanaryWatch
from services.router.catalog import Catalog
from services.router.drift_watch import DriftWatch
from services.router.events import ModelEvents
from services.router.inference import InferenceRouter, check_alias, check_model_name
from services.router.registry_client import RegistryClient
from services.router.routing import RouteTarget, normalise_targets, shares
from services.router.serving import ServedVersion
from services.router.settings import RouterSettings, settings_from_environ
from services.router.window import WindowSummary

__all__ = [
    "SERVICE_NAME",
    "RouterAgent",
    "RouterService",
    "build",
    "health_issues",
    "registry_address",
]

SERVICE_NAME = router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name
_log = get_logger(__name__)
_HEALTH_INTERVAL_S = 1.0


def _timestamp(at: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(at)
    return stamp


def _serving_stats(summary: WindowSummary) -> router_pb2.ServingStats:
    return router_pb2.ServingStats(
        requests=summary.requests,
        errors=summary.errors,
        latency_p50_us=summary.latency_p50_us,
        latency_p99_us=summary.latency_p99_us,
        cost=summary.cost,
    )


class RouterService(router_pb2_grpc.RouterServiceServicer):
    """`graftmesh.v1.RouterService` over a `Catalog` (rules: module docstring)."""

    def __init__(
        self,
        catalog: Catalog,
        router: InferenceRouter,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._catalog = catalog
        self._router = router
        self._clock = clock

    async def Infer(
        self, request: router_pb2.InferRequest, context: Context
    ) -> router_pb2.InferResponse:
        """Run one inference on the version the route and the policy choose."""
        return await self._router.infer(request, context.time_remaining())

    async def GetRoutes(
        self, request: router_pb2.GetRoutesRequest, context: Context
    ) -> router_pb2.GetRoutesResponse:
        """The routes in force, explicit and implicit."""
        catalog = self._catalog
        if request.model_name:
            check_model_name(request.model_name, "model_name")
            await catalog.track(request.model_name)
            names = [request.model_name]
        else:
            names = sorted(catalog.models)
        routes = []
        for name in names:
            entry = catalog.models.get(name)
            if entry is None:
                continue
            for alias in sorted(set(entry.aliases) | set(entry.routes)):
                routes.append(self._route(name, alias))
        return router_pb2.GetRoutesResponse(routes=routes)

    async def SetRoute(
        self, request: router_pb2.SetRouteRequest, context: Context
    ) -> router_pb2.SetRouteResponse:
        """Replace (or, with no targets, clear) the route of an alias."""
        catalog = self._catalog
        check_model_name(request.model_name, "model_name")
        check_alias(request.alias, "alias")
        targets = normalise_targets(
            [RouteTarget(int(t.version), float(t.weight)) for t in request.targets]
        )
        await catalog.track(request.model_name)
        positions = {int(t.version): i for i, t in enumerate(request.targets)}
        for target in targets:
            if (request.model_name, target.version) in catalog.served:
                continue
            try:
                await catalog.registry.get_version(request.model_name, version=target.version)
            except NotFoundError:
                raise NotFoundError(
                    f"targets[{positions[target.version]}].version: {request.model_name} has "
                    f"no version {target.version}"
                ) from None
        catalog.set_route(
            request.model_name,
            request.alias,
            targets,
            actor=request.actor,
            reason=request.reason,
        )
        _log.info(
            "route set",
            model=request.model_name,
            alias=request.alias,
            targets=[(t.version, t.weight) for t in targets],
            actor=request.actor,
        )
        return router_pb2.SetRouteResponse(route=self._route(request.model_name, request.alias))

    async def GetStats(
        self, request: router_pb2.RouterServiceGetStatsRequest, context: Context
    ) -> router_pb2.RouterServiceGetStatsResponse:
        """Serving statistics per version and replica over the stats window."""
        catalog = self._catalog
        if request.model_name:
            check_model_name(request.model_name, "model_name")
        window = catalog.settings.stats_window_s
        response = router_pb2.RouterServiceGetStatsResponse(window_s=window)
        now = self._clock()
        for key in sorted(catalog.served):
            served = catalog.served[key]
            if request.model_name and served.name != request.model_name:
                continue
            response.versions.append(
                router_pb2.VersionStats(
                    model_name=served.name,
                    version=served.version,
                    stats=_serving_stats(served.stats.summary(since=now - window)),
                    traffic_share=self._traffic_shares(served),
                )
            )
            for replica_stats in self._replica_stats(served):
                response.replicas.append(replica_stats)
        return response

    # -- helpers ---------------------------------------------------------------------

    def _route(self, name: str, alias: str) -> router_pb2.Route:
        targets, explicit = self._catalog.route(name, alias)
        route = router_pb2.Route(
            model_name=name,
            alias=alias,
            targets=[router_pb2.RouteTarget(version=t.version, weight=t.weight) for t in targets],
            explicit=explicit is not None,
        )
        if explicit is not None:
            route.updated_at.CopyFrom(_timestamp(explicit.updated_at))
            route.actor = explicit.actor
            route.reason = explicit.reason
        else:
            entry = self._catalog.models.get(name)
            view = entry.aliases.get(alias) if entry else None
            if view is not None:
                route.updated_at.CopyFrom(_timestamp(view.updated_at))
                route.reason = f"implicit: alias {alias} points at v{view.version}"
        return route

    def _traffic_shares(self, served: ServedVersion) -> dict[str, float]:
        catalog = self._catalog
        entry = catalog.models.get(served.name)
        if entry is None:
            return {}
        found: dict[str, float] = {}
        for alias in set(entry.aliases) | set(entry.routes):
            targets, _ = catalog.route(served.name, alias)
            if served.version not in {t.version for t in targets}:
                continue
            views = {
                v.version: v for v in catalog.views(served.name, [t.version for t in targets], None)
            }
            live = [t for t in targets if views[t.version].available]
            found[alias] = shares(live).get(served.version, 0.0)
        return found

    def _replica_stats(self, served: ServedVersion) -> list[router_pb2.ReplicaStats]:
        found = []
        panic = served.detector.in_panic()
        wall_offset = time.time() - self._clock()
        for replica_id, replica in served.replicas.items():
            state = served.detector.state(replica_id)
            ejected = state.ejected_until is not None
            if ejected and not panic:
                health = common_pb2.HEALTH_STATUS_UNHEALTHY
            elif ejected or state.consecutive_failures or state.on_probation:
                health = common_pb2.HEALTH_STATUS_DEGRADED
            else:
                health = common_pb2.HEALTH_STATUS_HEALTHY
            stats = router_pb2.ReplicaStats(
                replica_id=replica_id,
                model_name=served.name,
                version=served.version,
                device=replica.device,
                stats=_serving_stats(replica.stats.summary()),
                health=health,
                ejected=ejected,
                in_flight=replica.in_flight_requests,
                cost_per_request=replica.cost.value or 0.0,
            )
            if state.ejected_until is not None:
                stats.ejected_until.CopyFrom(
                    _timestamp(datetime.fromtimestamp(state.ejected_until + wall_offset, UTC))
                )
            found.append(stats)
        return found


def health_issues(catalog: Catalog) -> list[str]:
    """What makes the router `degraded` now (empty: healthy)."""
    issues: list[str] = []
    registry = catalog.registry
    if not registry.reachable:
        issues.append(
            f"registry unreachable ({registry.last_error}); serving the "
            f"{len(catalog.served)} version(s) loaded"
        )
    for (name, version), why in sorted(catalog.refused.items()):
        # A refused version stops mattering once nothing routes to it any more.
        if version in catalog.desired_versions(name):
            issues.append(f"{name} v{version} refused: {why}")
    for (name, version), served in sorted(catalog.served.items()):
        if served.replicas and served.detector.in_panic():
            issues.append(f"{name} v{version}: too few healthy replicas (panic mode)")
    return issues


class RouterAgent:
    """The router's gRPC service and its background loops (read the module docstring)."""

    service_names: Sequence[str] = (SERVICE_NAME,)

    def __init__(
        self,
        settings: RouterSettings,
        registry: RegistryClient,
        *,
        agent: str,
        health: HealthState,
        bus: ErrorBus | None = None,
        nats_url: str | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self._health = health
        self._bus = bus
        self._agent = agent
        self._registry = registry
        rng = rng or random.Random()
        self.drift = DriftWatch(settings.drift, agent=agent, publish=self._publish)
        self.catalog = Catalog(
            settings,
            registry,
            rng=rng,
            on_problem=self._report_problem,
            on_drift=self.drift.on_report,
        )
        self.router = InferenceRouter(self.catalog, rng=rng)
        self.servicer = RouterService(self.catalog, self.router)
        self.canary = CanaryWatch(self.catalog, settings.canary, agent=agent, publish=self._publish)
        self._events = (
            ModelEvents(nats_url, self._on_model_event, agent=agent) if nats_url else None
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._pending_preload = dict(settings.preload)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        router_pb2_grpc.add_RouterServiceServicer_to_server(self.servicer, server)

    async def start(self) -> None:
        """Listen for model events, preload (without waiting for the registry), start loops."""
        if self._events is not None:
            await self._events.start()
        await self._preload()
        loops: list[tuple[str, float, Callable[[], Awaitable[None]]]] = [
            ("reconcile", self.settings.reconcile_interval_s, self._reconcile_once),
            ("health", _HEALTH_INTERVAL_S, self._health_once),
        ]
        if self.settings.canary.enabled:
            loops.append(("canary", self.settings.canary.interval_s, self._canary_once))
        for name, interval, step in loops:
            self._tasks.append(
                asyncio.create_task(
                    run_every(interval, step, what=f"router {name} loop", bus=self._bus),
                    name=f"router-{name}",
                )
            )

    async def stop(self) -> None:
        """Stop the loops and the event listener, finish queued requests, close the registry."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._events is not None:
            await self._events.stop()
        await self.catalog.close()
        await self._registry.close()

    def _on_model_event(self, name: str) -> None:
        if name in self.catalog.models:
            self.catalog.request_refresh(name)

    async def _preload(self) -> None:
        for name, aliases in list(self._pending_preload.items()):
            try:
                for alias in aliases:
                    await self.catalog.track(name, alias)
            except NotFoundError as exc:
                _log.warning("preload: unknown model", model=name, error=str(exc))
            except GraftmeshError as exc:
                _log.warning("preload: registry not ready; will retry", model=name, error=str(exc))
                continue
            del self._pending_preload[name]

    async def _reconcile_once(self) -> None:
        if self._pending_preload:
            await self._preload()
        try:
            if self.catalog.models:
                await self.catalog.refresh_all()
            else:
                await self._registry.ping()
        except GraftmeshError as exc:
            _log.warning("registry refresh failed", error=str(exc))
        self.catalog.reconcile()
        await self._health_once()

    async def _canary_once(self) -> None:
        await self.canary.check_all()

    async def _health_once(self) -> None:
        now = self._health.snapshot()
        self._health.update_details(
            versions=[f"{n} v{v}" for n, v in sorted(self.catalog.served)],
            registry_reachable=self._registry.reachable,
            drift_psi={f"{n} v{v}": round(p, 4) for (n, v), p in self.drift.latest.items()},
        )
        if now["status"] == "unhealthy":
            return
        issues = health_issues(self.catalog)
        if issues:
            if now["status"] != "degraded" or now["issues"] != issues:
                self._health.set("degraded", issues)
        elif now["status"] != "healthy" or now["issues"]:
            self._health.set("healthy")

    def _report_problem(self, what: str, exc: BaseException) -> None:
        if self._bus is not None:
            self._bus.report_error(what, severity=Severity.ERROR, exc=exc)

    async def _publish(self, subject: str, payload: Mapping[str, Any]) -> None:
        if self._bus is not None:
            await self._bus.publish_event(subject, payload)


def registry_address(settings: RouterSettings, ctx: AgentContext) -> Callable[[], Awaitable[str]]:
    """Where the registry is, looked up each time the router (re)connects."""
    if settings.registry_address:
        fixed = settings.registry_address

        async def configured() -> str:
            return fixed

        return configured
    config = ctx.config
    if config is None:
        raise ConfigError(
            [
                "the router cannot find the registry: set registry_address in ROUTER_CONFIG, "
                "or run it under a config (GRAFTMESH_CONFIG) that names the registry agent"
            ]
        )

    async def discovered() -> str:
        host, port = await resolve_address(config, settings.registry_agent, ctx.env.redis_url)
        return f"{host}:{port}"

    return discovered


def build(ctx: AgentContext, environ: Mapping[str, str] | None = None) -> RouterAgent:
    """The router agent for `common.agent.run`."""
    settings = settings_from_environ(os.environ if environ is None else environ)
    if settings.torch_threads is not None:
        torch.set_num_threads(settings.torch_threads)
    registry = RegistryClient(
        registry_address(settings, ctx), timeout_s=settings.registry_timeout_s
    )
    return RouterAgent(
        settings,
        registry,
        agent=ctx.env.agent,
        health=ctx.health,
        bus=ctx.bus,
        nats_url=ctx.env.nats_url,
    )
