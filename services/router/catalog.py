"""What the router serves: each model's aliases and routes, and the versions loaded for them.

The registry is the source of truth for aliases; the router keeps a copy per
model (`refresh`, on every `events.model.<name>.*` event and every
`reconcile_interval_s`) and serves from that copy, so it goes on serving what
it has when the registry is away.

Desired state, per model (`desired_versions`):

- the version each *tracked* alias points at: aliases requested by clients or
  preloaded, plus `production` and, when canary analysis is on, `canary`;
- for each of those aliases but `canary`, its `keep_previous` earlier versions
  (fallbacks), read from the alias history: the versions it pointed at before,
  skipping any that a rollback moved it away from;
- every target of an explicit route;
- versions requested by number in the last `idle_unload_s`.

`reconcile` brings the loaded versions in line, in one idempotent step: it
starts loading what is desired and missing (in the background: traffic goes to
what is loaded meanwhile, the previous version included) and drains what is no
longer desired. A version whose artifacts fail their checks is refused for good
(its files never change) and reported; one that cannot be fetched now is tried
again at the next reconcile.

Routes set through `SetRoute` live in this process only; a restarted router
starts from the implicit routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from common.errors import (
    GraftmeshError,
    IntegrityError,
    NotFoundError,
    UnavailableError,
)
from common.logging import get_logger
from common.stubs import registry_pb2
from services.router.artifacts import MANIFEST_FILE, MODEL_FILE, load_model
from services.router.drift import DriftReport
from services.router.ejection import OutlierDetector
from services.router.registry_client import RegistryClient
from services.router.routing import RouteTarget, VersionView
from services.router.serving import ServedVersion, VersionState, ejection_policy
from services.router.settings import RouterSettings

__all__ = ["AliasView", "Catalog", "ExplicitRoute", "ModelEntry", "previous_versions"]

_log = get_logger(__name__)
_HISTORY_DEPTH = 20
_ALIAS_ACTION_ROLLBACK = registry_pb2.ALIAS_ACTION_ROLLBACK

ProblemHook = Callable[[str, BaseException], None]
DriftHook = Callable[[ServedVersion, DriftReport], None]


@dataclass
class AliasView:
    """Where an alias points (as last read from the registry) and where it pointed before."""

    version: int
    previous: list[int]
    # When the router saw it move here: monotonic (canary age) and wall clock (routes).
    since: float
    updated_at: datetime


@dataclass(frozen=True)
class ExplicitRoute:
    targets: tuple[RouteTarget, ...]
    updated_at: datetime
    actor: str
    reason: str


@dataclass
class ModelEntry:
    """The router's view of one model."""

    name: str
    versions: OutlierDetector
    aliases: dict[str, AliasView] = field(default_factory=dict)
    tracked: set[str] = field(default_factory=set)
    routes: dict[str, ExplicitRoute] = field(default_factory=dict)
    metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    # Version -> when it was last requested by number.
    pinned: dict[int, float] = field(default_factory=dict)


def previous_versions(
    entries: Iterable[registry_pb2.AliasHistoryEntry], current: int, keep: int
) -> list[int]:
    """The versions an alias pointed at before `current`, newest first, at most `keep`.

    `entries` are the alias's changes, newest first. A version the alias was
    rolled back away from is skipped: it is the one that was found wanting.
    """
    entries = list(entries)
    rolled_away = {e.from_version for e in entries if e.action == _ALIAS_ACTION_ROLLBACK}
    found: list[int] = []
    for entry in entries[1:]:
        version = int(entry.to_version)
        if version and version != current and version not in rolled_away and version not in found:
            found.append(version)
        if len(found) >= keep:
            break
    return found


class Catalog:
    """Models, aliases, routes and loaded versions (read the module docstring)."""

    def __init__(
        self,
        settings: RouterSettings,
        registry: RegistryClient,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        on_problem: ProblemHook | None = None,
        on_drift: DriftHook | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self._clock = clock
        self._rng = rng or random.Random()
        self._on_problem = on_problem or (lambda what, exc: None)
        self._on_drift = on_drift
        self.models: dict[str, ModelEntry] = {}
        self.served: dict[tuple[str, int], ServedVersion] = {}
        self.refused: dict[tuple[str, int], str] = {}
        self._loads: dict[tuple[str, int], asyncio.Task[ServedVersion | None]] = {}
        self._drains: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._refreshing: dict[str, asyncio.Task[None]] = {}
        self._refresh_again: set[str] = set()
        self._closed = False

    # -- the registry's view -----------------------------------------------------------

    def _entry(self, name: str) -> ModelEntry:
        entry = self.models.get(name)
        if entry is None:
            detector = OutlierDetector(ejection_policy(self.settings), self._clock, self._rng)
            entry = ModelEntry(name, detector)
            entry.tracked.add(self.settings.canary.production_alias)
            if self.settings.canary.enabled:
                entry.tracked.add(self.settings.canary.canary_alias)
            self.models[name] = entry
        return entry

    async def track(self, name: str, alias: str | None = None) -> ModelEntry:
        """The model's entry, read from the registry on first use; NotFoundError if unknown."""
        entry = self.models.get(name)
        if entry is None:
            await self.refresh(name)
            entry = self.models[name]
        if (
            alias is not None
            and alias not in entry.tracked
            and (alias in entry.aliases or alias in entry.routes)
        ):
            entry.tracked.add(alias)
            self.reconcile(name)
        return entry

    async def refresh(self, name: str) -> None:
        """Read the model's aliases from the registry, then reconcile it.

        NotFoundError for a model the registry does not know (a tracked model that
        disappeared is forgotten and its versions drained); UnavailableError when
        the registry cannot be reached.
        """
        try:
            aliases = await self.registry.aliases(name)
        except NotFoundError:
            if name in self.models:
                self.models[name].aliases.clear()
                self.models[name].routes.clear()
                self.reconcile(name)
                del self.models[name]
            raise
        entry = self._entry(name)
        for alias, version in aliases.items():
            old = entry.aliases.get(alias)
            if old is not None and old.version == version:
                continue
            previous = await self._previous(name, alias, version, old)
            entry.aliases[alias] = AliasView(version, previous, self._clock(), datetime.now(UTC))
            if old is not None:
                _log.info("alias moved", model=name, alias=alias, old=old.version, new=version)
        for alias in set(entry.aliases) - set(aliases):
            del entry.aliases[alias]
        self.reconcile(name)

    async def _previous(
        self, name: str, alias: str, current: int, old: AliasView | None
    ) -> list[int]:
        keep = self.settings.keep_previous
        if keep == 0:
            return []
        try:
            history = await self.registry.alias_history(name, alias, _HISTORY_DEPTH)
        except GraftmeshError as exc:
            _log.info("alias history unavailable", model=name, alias=alias, error=str(exc))
            if old is None:
                return []
            return [v for v in [old.version, *old.previous] if v != current][:keep]
        return previous_versions(history, current, keep)

    def request_refresh(self, name: str) -> None:
        """Refresh the model soon, in the background (events call this); one refresh at a time."""
        if self._closed:
            return
        if name in self._refreshing:
            self._refresh_again.add(name)
            return
        self._refreshing[name] = asyncio.create_task(
            self._refresh_loop(name), name=f"router-refresh-{name}"
        )

    async def _refresh_loop(self, name: str) -> None:
        try:
            while True:
                self._refresh_again.discard(name)
                try:
                    await self.refresh(name)
                except NotFoundError:
                    pass
                except GraftmeshError as exc:
                    _log.warning("refresh failed", model=name, error=str(exc))
                if name not in self._refresh_again:
                    return
        finally:
            self._refreshing.pop(name, None)

    async def refresh_all(self) -> None:
        """Refresh every tracked model; raises the first UnavailableError after trying all."""
        failure: UnavailableError | None = None
        for name in list(self.models):
            try:
                await self.refresh(name)
            except NotFoundError:
                pass
            except UnavailableError as exc:
                failure = failure or exc
        if failure is not None:
            raise failure

    # -- routes ----------------------------------------------------------------------

    def route(self, name: str, alias: str) -> tuple[tuple[RouteTarget, ...], ExplicitRoute | None]:
        """The alias's targets: its explicit route, else all traffic to the aliased version."""
        entry = self.models.get(name)
        if entry is None:
            return (), None
        explicit = entry.routes.get(alias)
        if explicit is not None:
            return explicit.targets, explicit
        view = entry.aliases.get(alias)
        return ((RouteTarget(view.version, 1.0),) if view else ()), None

    def fallbacks(self, name: str, alias: str) -> list[int]:
        """The versions to fall back to for an alias: where it points (when a route overrides
        it), then its earlier versions."""
        entry = self.models.get(name)
        view = entry.aliases.get(alias) if entry else None
        if view is None:
            return []
        return [view.version, *view.previous]

    def set_route(
        self,
        name: str,
        alias: str,
        targets: tuple[RouteTarget, ...],
        *,
        actor: str,
        reason: str,
    ) -> ExplicitRoute | None:
        """Replace the alias's route (empty targets: back to the implicit one); reconciles."""
        entry = self._entry(name)
        if targets:
            route = ExplicitRoute(targets, datetime.now(UTC), actor, reason)
            entry.routes[alias] = route
        else:
            entry.routes.pop(alias, None)
            route = None
        entry.tracked.add(alias)
        self.reconcile(name)
        return route

    # -- versions ----------------------------------------------------------------------

    def pin(self, name: str, version: int) -> None:
        """Note a request for `version` by number (keeps it loaded for `idle_unload_s`)."""
        self._entry(name).pinned[version] = self._clock()

    def desired_versions(self, name: str) -> set[int]:
        entry = self.models.get(name)
        if entry is None:
            return set()
        keep = self.settings.keep_previous
        wanted: set[int] = set()
        for alias in entry.tracked:
            view = entry.aliases.get(alias)
            if view is not None:
                wanted.add(view.version)
                # A canary falls back to production, not to earlier canaries.
                if alias != self.settings.canary.canary_alias:
                    wanted.update(view.previous[:keep])
        for route in entry.routes.values():
            wanted.update(t.version for t in route.targets)
        horizon = self._clock() - self.settings.idle_unload_s
        for version, at in list(entry.pinned.items()):
            if at >= horizon:
                wanted.add(version)
            else:
                del entry.pinned[version]
        return wanted

    def reconcile(self, name: str | None = None) -> None:
        """Load what is desired and missing, drain what is loaded and not desired."""
        if self._closed:
            return
        names = [name] if name is not None else list(self.models)
        for model in names:
            wanted = self.desired_versions(model)
            for version in wanted:
                key = (model, version)
                served = self.served.get(key)
                if served is not None:
                    if served.state is VersionState.DRAINING:
                        served.resume()
                    continue
                if key not in self._loads and key not in self.refused:
                    self._start_load(key)
            for key, served in list(self.served.items()):
                if (
                    key[0] == model
                    and key[1] not in wanted
                    and key not in self._drains
                    and served.state is VersionState.SERVING
                ):
                    self._drains[key] = asyncio.create_task(
                        self._drain(served), name=f"router-drain-{key[0]}-v{key[1]}"
                    )

    def loading(self, name: str, version: int) -> asyncio.Task[ServedVersion | None] | None:
        return self._loads.get((name, version))

    async def ensure_loaded(self, name: str, version: int) -> ServedVersion:
        """The served version, loading it (and waiting) if needed.

        NotFoundError for a version the registry does not have; UnavailableError
        for a refused version or when the registry cannot be reached.
        """
        key = (name, version)
        served = self.served.get(key)
        if served is not None and served.state is not VersionState.STOPPED:
            served.resume()
            return served
        if key in self.refused:
            raise UnavailableError(f"{name} v{version} was refused: {self.refused[key]}")
        task = self._loads.get(key) or self._start_load(key)
        result = await asyncio.shield(task)
        if result is None:
            if key in self.refused:
                raise UnavailableError(f"{name} v{version} was refused: {self.refused[key]}")
            # The load failed; ask once more in the caller's time to get the reason.
            await self.registry.get_version(name, version=version)
            raise UnavailableError(f"{name} v{version} could not be loaded")
        return result

    def _start_load(self, key: tuple[str, int]) -> asyncio.Task[ServedVersion | None]:
        task = asyncio.create_task(self._load(key), name=f"router-load-{key[0]}-v{key[1]}")
        self._loads[key] = task
        task.add_done_callback(lambda _: self._loads.pop(key, None))
        return task

    async def _load(self, key: tuple[str, int]) -> ServedVersion | None:
        name, version = key
        started = self._clock()
        try:
            record = await self.registry.get_version(name, version=version)
            files = {f.name: f.sha256 for f in record.files}
            if MODEL_FILE not in files:
                raise IntegrityError(f"{name} v{version} lists no {MODEL_FILE}")
            model_bytes = await self.registry.download(name, version, MODEL_FILE, files[MODEL_FILE])
            manifest_bytes = b"{}"
            if MANIFEST_FILE in files:
                manifest_bytes = await self.registry.download(
                    name, version, MANIFEST_FILE, files[MANIFEST_FILE]
                )
            model = await asyncio.to_thread(
                load_model, model_bytes, files[MODEL_FILE], manifest_bytes, record
            )
            served = ServedVersion(
                name,
                version,
                model,
                self.settings,
                clock=self._clock,
                rng=self._rng,
                on_drift=self._on_drift,
            )
            await served.start()
        except IntegrityError as exc:
            self.refused[key] = str(exc)
            _log.error("version refused", model=name, version=version, error=str(exc))
            self._on_problem(f"{name} v{version} refused: {exc}", exc)
            return None
        except NotFoundError as exc:
            _log.warning("version not found", model=name, version=version, error=str(exc))
            return None
        except GraftmeshError as exc:
            _log.warning(
                "version not loaded; will retry", model=name, version=version, error=str(exc)
            )
            return None
        except Exception as exc:
            # A program torch cannot run is as unusable as a corrupt one.
            self.refused[key] = f"{type(exc).__name__}: {exc}"
            _log.exception("version failed to load", model=name, version=version)
            self._on_problem(f"{name} v{version} failed to load: {exc}", exc)
            return None
        if self._closed:
            await served.stop()
            return None
        entry = self._entry(name)
        entry.metrics[version] = dict(record.metrics)
        self.served[key] = served
        entry.versions.add(str(version))
        if model.reference_problem:
            _log.warning(
                "drift reference ignored",
                model=name,
                version=version,
                problem=model.reference_problem,
            )
        _log.info(
            "version serving",
            model=name,
            version=version,
            replicas=len(served.replicas),
            batchable=served.signature.batchable,
            load_s=round(self._clock() - started, 3),
        )
        if version not in self.desired_versions(name):
            self.reconcile(name)
        return served

    async def _drain(self, served: ServedVersion) -> None:
        try:
            await served.drain(self.settings.drain_timeout_s)
        finally:
            self._drains.pop(served.key, None)
        if served.state is VersionState.STOPPED:
            if self.served.get(served.key) is served:
                del self.served[served.key]
            entry = self.models.get(served.name)
            if entry is not None:
                entry.versions.remove(str(served.version))
            _log.info("version unloaded", model=served.name, version=served.version)

    # -- what routing reads ----------------------------------------------------------

    def views(
        self, name: str, versions: Iterable[int], constraints_metric: str | None
    ) -> list[VersionView]:
        """What the routing policy needs about `versions` (unserved ones are unavailable)."""
        entry = self.models.get(name)
        routable = set(entry.versions.routable()) if entry else set()
        found: list[VersionView] = []
        for version in dict.fromkeys(versions):
            served = self.served.get((name, version))
            if served is None:
                found.append(VersionView(version, available=False))
                continue
            quality = None
            if constraints_metric is not None and entry is not None:
                quality = entry.metrics.get(version, {}).get(constraints_metric)
            found.append(
                VersionView(
                    version,
                    available=served.available and str(version) in routable,
                    latency_us=served.latency_estimate_us(),
                    cost=served.cost_estimate(),
                    quality=quality,
                )
            )
        return found

    # -- shutdown ----------------------------------------------------------------------

    async def close(self) -> None:
        """Stop loading, refreshing and serving (queued requests fail with UNAVAILABLE)."""
        self._closed = True
        tasks = [*self._loads.values(), *self._refreshing.values(), *self._drains.values()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await asyncio.gather(*(s.stop() for s in self.served.values()), return_exceptions=True)
        self.served.clear()
