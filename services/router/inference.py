"""The request path of `Infer`: resolve the model, plan the versions, run, fall back.

1. The request's `ModelRef` names a version (that version only, routes
   ignored) or an alias (default `production`), whose route gives the targets.
2. The request's time budget is `deadline_ms` from arrival, and the gRPC
   deadline if that is sooner; the whole request runs under it
   (DEADLINE_EXCEEDED when it passes).
3. `routing.plan` orders the versions to try (weighted split, cost, deadline,
   quality floor, fallbacks). A model seen for the first time, or a route whose
   versions are all still loading, waits for a load before planning.
4. Each version is tried in turn (at most `max_versions_tried`): the inputs are
   bound to its signature (INVALID_ARGUMENT is final), then the version runs the
   request with its own replica retries. A retryable outcome (UNAVAILABLE,
   RESOURCE_EXHAUSTED) moves on to the next version of the plan; an UNAVAILABLE
   one (every attempt failed) also counts against the version's ejection record.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from common.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    GraftmeshError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from common.stubs import router_pb2
from services.router.catalog import Catalog
from services.router.routing import Constraints, Refusal, RouteTarget, plan
from services.router.serving import Served
from services.router.tensors import DecodedInputs, bind, decode_inputs

__all__ = [
    "ALIAS_PATTERN",
    "InferenceRouter",
    "Resolved",
    "check_alias",
    "check_model_name",
    "resolve_ref",
]

ALIAS_PATTERN = re.compile(r"[a-z][a-z0-9_-]{0,63}")
_MODEL_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
_RETRYABLE = (UnavailableError, ResourceExhaustedError)


def check_model_name(name: str, field: str) -> None:
    if not name:
        raise InvalidArgumentError("must not be empty", field)
    if not _MODEL_PATTERN.fullmatch(name):
        raise InvalidArgumentError(
            "must be letters, digits, '_' and '-', starting with a letter or digit", field
        )


def check_alias(alias: str, field: str) -> None:
    if not ALIAS_PATTERN.fullmatch(alias):
        raise InvalidArgumentError(
            "must be lowercase letters, digits, '-' and '_', starting with a letter", field
        )


@dataclass(frozen=True, slots=True)
class Resolved:
    """What a request's `ModelRef` names: a version, or an alias."""

    name: str
    alias: str | None
    version: int | None


def resolve_ref(request: router_pb2.InferRequest) -> Resolved:
    ref = request.model
    check_model_name(ref.name, "model.name")
    which = ref.WhichOneof("selector")
    if which == "version":
        if ref.version < 1:
            raise InvalidArgumentError(f"must be >= 1, got {ref.version}", "model.version")
        return Resolved(ref.name, None, ref.version)
    alias = ref.alias if which == "alias" else "production"
    check_alias(alias, "model.alias")
    return Resolved(ref.name, alias, None)


class InferenceRouter:
    """Runs `Infer` requests against the catalog (read the module docstring)."""

    def __init__(
        self,
        catalog: Catalog,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.catalog = catalog
        self.settings = catalog.settings
        self._clock = clock
        self._rng = rng or random.Random()

    async def infer(
        self, request: router_pb2.InferRequest, rpc_remaining_s: float | None = None
    ) -> router_pb2.InferResponse:
        """Serve one request; errors are the mesh's errors (the server maps them to codes)."""
        arrived = self._clock()
        ref = resolve_ref(request)
        if request.deadline_ms < 0:
            raise InvalidArgumentError(f"must be >= 0, got {request.deadline_ms}", "deadline_ms")
        max_cost = request.max_cost if request.HasField("max_cost") else None
        if max_cost is not None and not (math.isfinite(max_cost) and max_cost >= 0):
            raise InvalidArgumentError(f"must be finite and >= 0, got {max_cost}", "max_cost")
        budgets = [b for b in (request.deadline_ms / 1000 or None, rpc_remaining_s) if b]
        deadline = arrived + min(budgets) if budgets else None
        decoded = decode_inputs(request.inputs, request.args)
        try:
            async with asyncio.timeout(None if deadline is None else deadline - arrived):
                served, version = await self._run(ref, decoded, deadline, max_cost)
        except TimeoutError:
            waited_ms = (self._clock() - arrived) * 1000
            raise DeadlineExceededError(
                f"the request's deadline passed after {waited_ms:.0f} ms"
            ) from None
        return router_pb2.InferResponse(
            outputs=served.wire,
            model_name=ref.name,
            version=version,
            replica_id=served.replica_id,
            latency_us=int((self._clock() - arrived) * 1e6),
            cost=served.cost,
        )

    async def _run(
        self,
        ref: Resolved,
        decoded: DecodedInputs,
        deadline: float | None,
        max_cost: float | None,
    ) -> tuple[Served, int]:
        catalog = self.catalog
        if ref.version is not None:
            catalog.pin(ref.name, ref.version)
            served = await catalog.ensure_loaded(ref.name, ref.version)
            args = bind(decoded, served.signature, ref.version)
            if max_cost is not None and (served.cost_estimate() or 0.0) > max_cost:
                raise ResourceExhaustedError(
                    f"{ref.name} v{ref.version} costs about {served.cost_estimate():.3g} per "
                    f"request, over max_cost {max_cost:g}"
                )
            result = await served.infer(args, deadline=deadline, max_cost=max_cost)
            return result, ref.version
        assert ref.alias is not None
        order = await self._plan(ref.name, ref.alias, deadline, max_cost)
        failure: GraftmeshError | None = None
        for version in order[: self.settings.max_versions_tried]:
            candidate = catalog.served.get((ref.name, version))
            if candidate is None:
                continue
            args = bind(decoded, candidate.signature, version)
            entry = catalog.models.get(ref.name)
            try:
                result = await candidate.infer(args, deadline=deadline, max_cost=max_cost)
            except _RETRYABLE as exc:
                # A full queue is load, not a fault: the next version takes the request,
                # but only failures count towards ejecting this one.
                if entry is not None and isinstance(exc, UnavailableError):
                    entry.versions.record_failure(str(version))
                failure = exc
                continue
            if entry is not None:
                entry.versions.record_success(str(version))
            return result, version
        raise failure or UnavailableError(f"no version of {ref.name} could serve the request")

    async def _plan(
        self, name: str, alias: str, deadline: float | None, max_cost: float | None
    ) -> tuple[int, ...]:
        catalog = self.catalog
        await catalog.track(name, alias)
        targets, explicit = catalog.route(name, alias)
        if not targets:
            raise NotFoundError(f"model {name!r} has no alias {alias!r} and no route for it")
        fallbacks = [
            v for v in catalog.fallbacks(name, alias) if v not in {t.version for t in targets}
        ]
        await self._wait_for_a_version(name, targets, fallbacks)
        floor = self.settings.quality_floors.get(name)
        constraints = Constraints(
            budget_us=None if deadline is None else (deadline - self._clock()) * 1e6,
            max_cost=max_cost,
            quality_min=floor.min if floor else None,
            quality_max=floor.max if floor else None,
        )
        views = catalog.views(
            name, [*(t.version for t in targets), *fallbacks], floor.metric if floor else None
        )
        chosen = plan(targets, views, constraints, self._rng.random(), fallbacks)
        if chosen.refusal is Refusal.OVER_MAX_COST:
            raise ResourceExhaustedError(f"{name}@{alias}: {chosen.reason}")
        if chosen.refusal is Refusal.BELOW_QUALITY_FLOOR:
            raise FailedPreconditionError(f"{name}@{alias}: {chosen.reason}")
        if chosen.refusal is not None:
            refused = [
                f"v{t.version}: {catalog.refused[(name, t.version)]}"
                for t in targets
                if (name, t.version) in catalog.refused
            ]
            detail = f" ({'; '.join(refused)})" if refused else ""
            kind = "explicit route" if explicit else "alias"
            raise UnavailableError(f"{name}@{alias} ({kind}): {chosen.reason}{detail}")
        return chosen.order

    async def _wait_for_a_version(
        self, name: str, targets: tuple[RouteTarget, ...], fallbacks: list[int]
    ) -> None:
        """Until one of the versions can serve, wait for the ones loading (first done wins)."""
        catalog = self.catalog
        versions = [*(t.version for t in targets if t.weight > 0), *fallbacks]
        for _ in range(len(versions) + 1):
            if any(
                (s := catalog.served.get((name, v))) is not None and s.available for v in versions
            ):
                return
            loading = [t for v in versions if (t := catalog.loading(name, v)) is not None]
            if not loading:
                return
            await asyncio.wait(
                [asyncio.shield(t) for t in loading], return_when=asyncio.FIRST_COMPLETED
            )
