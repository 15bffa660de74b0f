"""Acting on canary verdicts: alias changes through the registry, routes, and alerts.

Every `canary.interval_s` the router looks at each model whose `canary` and
`production` aliases point at two different loaded versions, and asks
`canary.judge` about their traffic since the canary appeared (at most the last
`window_s`). Then:

- **promote**: `SetAlias(production -> canary's version)`, compare-and-set on
  the production version it judged against (someone else's change in between
  wins), then `DeleteAlias(canary)`; an explicit route of `production` that only
  split traffic between the two is cleared (the promoted version now gets it
  all). Alert `canary_promoted` (info).
- **roll back**: `SetAlias(canary -> production's version)`, compare-and-set on
  the canary version it judged, then `DeleteAlias(canary)`: production takes the
  canary's traffic. The canary version is taken out of every explicit route of the
  model. Alert `canary_rolled_back` (warning).

Both verdicts change an alias only by compare-and-set on what was judged, so that
several routers judging the same canary (replicas of one Deployment) carry out a
verdict once: the others find the alias moved (FAILED_PRECONDITION), raise no
alert, and a rolled-back version still leaves their own routes. (A plain
`Rollback(canary)` from each would step the alias back once per router.)

The model is then refreshed from the registry at once, so the next check and
the traffic see the new aliases without waiting for the registry's event.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from common.errors import FailedPreconditionError, GraftmeshError
from common.logging import get_logger
from services.router.alerts import alert_subject, make_alert
from services.router.canary import CanaryDecision, CanaryPolicy, SideStats, Verdict, judge
from services.router.catalog import Catalog
from services.router.settings import CanarySettings
from services.router.window import WindowSummary

__all__ = ["CanaryOutcome", "CanaryWatch", "canary_policy"]

_log = get_logger(__name__)

Publish = Callable[[str, Mapping[str, Any]], Awaitable[None]]


def canary_policy(settings: CanarySettings) -> CanaryPolicy:
    return CanaryPolicy(
        min_requests=settings.min_requests,
        min_duration_s=settings.min_duration_s,
        max_error_rate_increase=settings.max_error_rate_increase,
        max_latency_ratio=settings.max_latency_ratio,
        latency_slack_us=settings.latency_slack_us,
        fail_fast_errors=settings.fail_fast_errors,
    )


def _side(summary: WindowSummary) -> SideStats:
    return SideStats(
        summary.requests, summary.errors, summary.latency_p50_us, summary.latency_p99_us
    )


def _figures(side: SideStats) -> dict[str, float]:
    return {
        "requests": side.requests,
        "errors": side.errors,
        "error_rate": round(side.error_rate, 6),
        "latency_p50_us": round(side.latency_p50_us, 1),
        "latency_p99_us": round(side.latency_p99_us, 1),
    }


@dataclass(frozen=True, slots=True)
class CanaryOutcome:
    """A verdict on one model's canary, and whether it was carried out."""

    model: str
    production_version: int
    canary_version: int
    decision: CanaryDecision
    applied: bool


class CanaryWatch:
    """Judges canaries and carries out the verdicts (read the module docstring)."""

    def __init__(
        self,
        catalog: Catalog,
        settings: CanarySettings,
        *,
        agent: str,
        publish: Publish,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._catalog = catalog
        self._settings = settings
        self._policy = canary_policy(settings)
        self._agent = agent
        self._publish = publish
        self._clock = clock

    async def check_all(self) -> list[CanaryOutcome]:
        """Judge every model's canary once; the verdicts other than WAIT."""
        outcomes = []
        for name in list(self._catalog.models):
            outcome = await self.check(name)
            if outcome is not None and outcome.decision.verdict is not Verdict.WAIT:
                outcomes.append(outcome)
        return outcomes

    async def check(self, name: str) -> CanaryOutcome | None:
        """Judge one model's canary (None when it has none to judge) and act on the verdict."""
        catalog = self._catalog
        entry = catalog.models.get(name)
        if entry is None:
            return None
        production = entry.aliases.get(self._settings.production_alias)
        canary = entry.aliases.get(self._settings.canary_alias)
        if production is None or canary is None or production.version == canary.version:
            return None
        prod_served = catalog.served.get((name, production.version))
        canary_served = catalog.served.get((name, canary.version))
        if prod_served is None or canary_served is None:
            return None
        now = self._clock()
        since = max(canary.since, canary_served.loaded_at)
        start = max(since, now - self._settings.window_s)
        canary_side = _side(canary_served.stats.summary(since=start))
        prod_side = _side(prod_served.stats.summary(since=start))
        decision = judge(self._policy, canary_side, prod_side, now - since)
        if decision.verdict is Verdict.WAIT:
            return CanaryOutcome(name, production.version, canary.version, decision, False)
        sample = {
            "model": name,
            "production_version": production.version,
            "canary_version": canary.version,
            "canary": _figures(canary_side),
            "production": _figures(prod_side),
            "observed_s": round(now - since, 1),
            "reason": decision.reason,
        }
        try:
            if decision.verdict is Verdict.PROMOTE:
                await self._promote(name, production.version, canary.version, decision.reason)
            else:
                await self._roll_back(name, production.version, canary.version, decision.reason)
        except GraftmeshError as exc:
            _log.warning(
                "canary verdict not applied",
                model=name,
                verdict=decision.verdict.value,
                error=str(exc),
            )
            catalog.request_refresh(name)
            return CanaryOutcome(name, production.version, canary.version, decision, False)
        promoted = decision.verdict is Verdict.PROMOTE
        message = (
            f"{name}: canary v{canary.version} promoted to {self._settings.production_alias} "
            f"(was v{production.version}): {decision.reason}"
            if promoted
            else f"{name}: canary v{canary.version} rolled back: {decision.reason}"
        )
        alert = make_alert(
            "canary_promoted" if promoted else "canary_rolled_back",
            "info" if promoted else "warning",
            agent=self._agent,
            about=f"{name}:{canary.version}",
            message=message,
            sample=sample,
        )
        _log.info("canary verdict applied", model=name, verdict=decision.verdict.value)
        await self._publish(alert_subject(alert["severity"], self._agent), alert)
        try:
            await catalog.refresh(name)
        except GraftmeshError as exc:
            _log.warning("refresh after the canary verdict failed", model=name, error=str(exc))
        return CanaryOutcome(name, production.version, canary.version, decision, True)

    async def _promote(self, name: str, production: int, canary: int, reason: str) -> None:
        registry = self._catalog.registry
        why = f"canary analysis: {reason}"
        await registry.set_alias(
            name,
            self._settings.production_alias,
            canary,
            expected_version=production,
            actor=self._agent,
            reason=why,
        )
        await registry.delete_alias(
            name, self._settings.canary_alias, actor=self._agent, reason=why
        )
        alias = self._settings.production_alias
        _, explicit = self._catalog.route(name, alias)
        if explicit is not None and {t.version for t in explicit.targets} <= {production, canary}:
            self._catalog.set_route(
                name, alias, (), actor=self._agent, reason=f"canary v{canary} promoted"
            )

    async def _roll_back(self, name: str, production: int, canary: int, reason: str) -> None:
        registry = self._catalog.registry
        why = f"canary analysis: {reason}"
        alias = self._settings.canary_alias
        try:
            await registry.set_alias(
                name, alias, production, expected_version=canary, actor=self._agent, reason=why
            )
        except FailedPreconditionError:
            # Moved since it was judged (another router rolled it back): the version
            # this router saw fail still leaves its routes; the alias is not ours to move.
            self._drop_from_routes(name, canary)
            raise
        await registry.delete_alias(name, alias, actor=self._agent, reason=why)
        self._drop_from_routes(name, canary)

    def _drop_from_routes(self, name: str, canary: int) -> None:
        entry = self._catalog.models.get(name)
        if entry is None:
            return
        for route_alias, route in list(entry.routes.items()):
            if canary not in {t.version for t in route.targets}:
                continue
            kept = tuple(t for t in route.targets if t.version != canary)
            self._catalog.set_route(
                name,
                route_alias,
                kept if any(t.weight > 0 for t in kept) else (),
                actor=self._agent,
                reason=f"canary v{canary} rolled back",
            )
