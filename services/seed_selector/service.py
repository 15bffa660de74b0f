"""The seed selector agent: `SeedSelectorService` (gRPC) over `SeedSelector`, and its lifecycle.

`build` is what `python -m services.seed_selector` runs (`common.agent.run(build)`): a
`SeedSelector` on a `RedisSelectorStore` at `GRAFTMESH_REDIS_URL`, served by
`SeedSelectorService` inside a `SeedSelectorAgent`.

Settings (the agent's environment; in `startup_config.yaml`, the agent's `env:`):

- `SEED_SELECTOR_CONFIG`: a JSON object of `SelectorConfig` fields, e.g.
  `{"strategy": "thompson", "decay": {"gamma": 0.995}}`. The strategy defaults to
  `ucb1`, the default the contract names for `SELECTION_STRATEGY_UNSPECIFIED`, and
  `write_behind_s` to 0.005: Select and Report answer without waiting for Redis,
  and what they changed is written within about 5 ms, in one batch (see
  `SeedSelector` for what a crash can lose; `{"write_behind_s": 0}` writes through).
- `SEED_SELECTOR_KEY_PREFIX`: the Redis key prefix (default `graftmesh:selector:`).
  Two selectors must not share one.

How the wire maps onto the core (proto/graftmesh/v1/seed_selector.proto):

- Select: each `Arm` becomes an `ArmOffer`; its `slot_features` are the slot's context
  (the arms of one slot must not disagree on them). `param_budget`,
  `max_concurrent_seeds`/`active_seeds` become `Budget` and `Concurrency`; `rng_seed` is
  the job's seed (fixed by its first decision). A repeated arm is answered as
  `ELIGIBILITY_DUPLICATE` and only its first offer counts. Every offered arm gets an
  `ArmScore` in offer order: eligible arms their strategy score (`+inf` for an arm
  never reported, which is tried first) with `mean_reward`, `pulls` and
  `exploration_bonus = score - mean_reward`; ineligible arms score 0 and carry the
  first broken rule as their code (an embargoed slot is `SLOT_NOT_DORMANT`) and every
  broken rule in `eligibility_reason`. No eligible arm: no decision, and
  `no_decision_reason` says why; nothing is ever chosen by default.
- `strategy_params`: the selector's parameters are its configuration; a request may
  name a documented parameter of its strategy only with the value the selector runs
  with (a check, not an override). Any other key or value is INVALID_ARGUMENT.
- Report: the core's rules (NOT_FOUND for an unknown, expired or reset decision; the
  same report again is answered again and counted once; another reward is
  FAILED_PRECONDITION). A decision made before a restart still counts (after a
  crash, one made in the last few milliseconds before it may be NOT_FOUND).
- GetStats: one job (`job_id` is required: the core keeps no list of its jobs).
  `open_decisions` is decisions made minus reports counted.
- Reset: one job or all; the counts are the job's arms and open decisions (0 for all).

Bad input is INVALID_ARGUMENT whose details start with the field path
(`arms[2].slot_state: ...`).

Health: while the store cannot be reached the selector keeps deciding from memory
(see `SeedSelector`); the agent then reports `degraded` with the selector's
`degraded_reason` as its issue, and `healthy` again once the queued writes reached the
store. It checks after every call and every `poll_interval_s`, when it also retries
the queued writes, so an idle agent recovers too. An outage is noticed by the first
call that needs the store (the store has no probe of its own): an idle agent with
Redis away still says `healthy`. Each change is also reported on the error bus
(`warning` when degraded, `info` when recovered).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import grpc
from pydantic import ValidationError

from common.agent import AgentContext, run_every
from common.bus import ErrorBus, Severity
from common.errors import ConfigError, InvalidArgumentError, NotFoundError, UnavailableError
from common.grpc_server import Context
from common.health import HealthState
from common.stubs import common_pb2, seed_selector_pb2, seed_selector_pb2_grpc
from services.seed_selector.eligibility import (
    ArmOffer,
    Budget,
    Concurrency,
    IneligibleCode,
    SlotState,
)
from services.seed_selector.selector import (
    ArmSummary,
    Decision,
    JobSettings,
    SeedSelector,
    SelectorConfig,
)
from services.seed_selector.store import DEFAULT_KEY_PREFIX, RedisSelectorStore
from services.seed_selector.strategies import Strategy
from services.seed_selector.tracker import Arm

__all__ = [
    "CONFIG_ENV",
    "KEY_PREFIX_ENV",
    "SERVICE_NAME",
    "SeedSelectorAgent",
    "SeedSelectorService",
    "StoreHealth",
    "build",
    "selector_config_from_environ",
]

CONFIG_ENV = "SEED_SELECTOR_CONFIG"
KEY_PREFIX_ENV = "SEED_SELECTOR_KEY_PREFIX"
SERVICE_NAME = seed_selector_pb2.DESCRIPTOR.services_by_name["SeedSelectorService"].full_name

_pb = seed_selector_pb2
# The contract's default for SELECTION_STRATEGY_UNSPECIFIED (the core's own is Thompson).
_DEFAULT_STRATEGY = Strategy.UCB1
# A Redis round trip per call would dominate a call's latency; a crash loses at most
# this long of decisions and outcomes (a graceful stop none).
_DEFAULT_WRITE_BEHIND_S = 0.005
# A store that comes back is noticed within this long even when no call arrives.
_MIN_POLL_S = 0.1

_STRATEGY_FROM_PROTO: dict[seed_selector_pb2.SelectionStrategy.ValueType, Strategy] = {
    _pb.SELECTION_STRATEGY_UCB1: Strategy.UCB1,
    _pb.SELECTION_STRATEGY_THOMPSON: Strategy.THOMPSON,
    _pb.SELECTION_STRATEGY_EPSILON_GREEDY: Strategy.EPSILON_GREEDY,
    _pb.SELECTION_STRATEGY_LINUCB: Strategy.LINUCB,
}
_STRATEGY_TO_PROTO = {strategy: value for value, strategy in _STRATEGY_FROM_PROTO.items()}
_STATE_FROM_PROTO: dict[common_pb2.SeedState.ValueType, SlotState] = {
    common_pb2.SEED_STATE_DORMANT: SlotState.DORMANT,
    common_pb2.SEED_STATE_GERMINATED: SlotState.GERMINATED,
    common_pb2.SEED_STATE_TRAINING: SlotState.TRAINING,
    common_pb2.SEED_STATE_BLENDING: SlotState.BLENDING,
    common_pb2.SEED_STATE_HOLDING: SlotState.HOLDING,
    common_pb2.SEED_STATE_FOSSILIZED: SlotState.FOSSILIZED,
    common_pb2.SEED_STATE_CULLED: SlotState.CULLED,
    common_pb2.SEED_STATE_EMBARGOED: SlotState.EMBARGOED,
}
# The contract has no code of its own for an embargo: it counts as "not dormant".
_ELIGIBILITY_TO_PROTO: dict[IneligibleCode, seed_selector_pb2.Eligibility.ValueType] = {
    IneligibleCode.SLOT_NOT_DORMANT: _pb.ELIGIBILITY_SLOT_NOT_DORMANT,
    IneligibleCode.SLOT_EMBARGOED: _pb.ELIGIBILITY_SLOT_NOT_DORMANT,
    IneligibleCode.CONCURRENCY_CAP_REACHED: _pb.ELIGIBILITY_CONCURRENCY_CAP,
    IneligibleCode.OVER_PARAM_BUDGET: _pb.ELIGIBILITY_OVER_PARAM_BUDGET,
}


# -- settings ---------------------------------------------------------------------------


def selector_config_from_environ(environ: Mapping[str, str]) -> SelectorConfig:
    """The `SelectorConfig` that `SEED_SELECTOR_CONFIG` describes (see the module docstring).

    Raises `ConfigError` naming every bad key.
    """
    raw = environ.get(CONFIG_ENV, "").strip()
    try:
        data = json.loads(raw) if raw else {}
    except ValueError as exc:
        raise ConfigError([f"{CONFIG_ENV} is not JSON: {exc}"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{CONFIG_ENV} must be a JSON object of selector settings"])
    data.setdefault("strategy", _DEFAULT_STRATEGY.value)
    data.setdefault("write_behind_s", _DEFAULT_WRITE_BEHIND_S)
    try:
        return SelectorConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(
            [
                f"{CONFIG_ENV}.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
                for err in exc.errors()
            ]
        ) from None


# -- Select: wire to core ----------------------------------------------------------------


@dataclass(slots=True)
class _SelectInput:
    offers: list[ArmOffer]
    context: dict[str, dict[str, float]]
    first_index: dict[Arm, int]  # the request index of each arm's first offer
    duplicate_of: dict[int, int]  # request index of a repeat -> index of the first offer
    features_from: dict[str, int]  # slot id -> index of the arm its features came from
    strategy: Strategy | None
    budget: Budget
    concurrency: Concurrency


def _parse_select(request: seed_selector_pb2.SelectRequest, config: SelectorConfig) -> _SelectInput:
    if not request.arms:
        raise InvalidArgumentError("at least one arm must be offered", "arms")
    if request.strategy == _pb.SELECTION_STRATEGY_UNSPECIFIED:
        strategy = None
    else:
        found = _STRATEGY_FROM_PROTO.get(request.strategy)
        if found is None:
            raise InvalidArgumentError(f"unknown strategy {request.strategy}", "strategy")
        strategy = found
    if request.strategy_params:
        _check_strategy_params(strategy or config.strategy, request.strategy_params, config)
    remaining = request.param_budget if request.HasField("param_budget") else None
    if remaining is not None and remaining < 0:
        raise InvalidArgumentError(f"must be >= 0, got {remaining}", "param_budget")
    if request.active_seeds < 0:
        raise InvalidArgumentError(f"must be >= 0, got {request.active_seeds}", "active_seeds")
    cap = request.max_concurrent_seeds if request.HasField("max_concurrent_seeds") else None
    if cap is not None and cap < 0:
        raise InvalidArgumentError(f"must be >= 0, got {cap}", "max_concurrent_seeds")
    if request.HasField("rng_seed") and request.rng_seed < 0:
        raise InvalidArgumentError(f"must be >= 0, got {request.rng_seed}", "rng_seed")

    offers: list[ArmOffer] = []
    context: dict[str, dict[str, float]] = {}
    first_index: dict[Arm, int] = {}
    duplicate_of: dict[int, int] = {}
    features_from: dict[str, int] = {}
    for i, arm in enumerate(request.arms):
        slot_id, blueprint = arm.slot_id, arm.blueprint
        if not slot_id:
            raise InvalidArgumentError("must not be empty", f"arms[{i}].slot_id")
        if not blueprint:
            raise InvalidArgumentError("must not be empty", f"arms[{i}].blueprint")
        # An `Arm` is a named tuple: a plain one finds it, and the offer makes the `Arm`.
        first = first_index.get((slot_id, blueprint))  # type: ignore[call-overload]
        if first is not None:
            duplicate_of[i] = first
            continue
        state = _STATE_FROM_PROTO.get(arm.slot_state)
        if state is None:
            raise InvalidArgumentError(
                "must be set to the slot's SeedState (SEED_STATE_DORMANT for a slot that "
                f"can grow), got {arm.slot_state}",
                f"arms[{i}].slot_state",
            )
        if arm.added_params < 0:
            raise InvalidArgumentError(
                f"must be >= 0, got {arm.added_params}", f"arms[{i}].added_params"
            )
        offer = ArmOffer(slot_id, blueprint, arm.added_params, state)
        offers.append(offer)
        first_index[offer.arm] = i
        features = arm.slot_features
        if features:
            known = context.get(slot_id)
            if known is None:
                # A comprehension, not dict(): the map's Mapping methods are pure Python.
                values = {name: features[name] for name in features}
                for name, value in values.items():
                    if not math.isfinite(value):
                        raise InvalidArgumentError(
                            f"must be finite, got {value}", f"arms[{i}].slot_features[{name}]"
                        )
                context[slot_id] = values
                features_from[slot_id] = i
            # Equal to features found finite, so finite too (NaN equals nothing).
            elif len(features) != len(known) or any(
                features.get(name) != value for name, value in known.items()
            ):
                raise InvalidArgumentError(
                    f"differ from arms[{features_from[slot_id]}].slot_features of the same "
                    "slot; a slot has one set of features",
                    f"arms[{i}].slot_features",
                )
    return _SelectInput(
        offers,
        context,
        first_index,
        duplicate_of,
        features_from,
        strategy,
        Budget(remaining),
        Concurrency(request.active_seeds, cap),
    )


def _effective_params(strategy: Strategy, config: SelectorConfig) -> dict[str, float | None]:
    """The contract's parameter names of `strategy`, with the value this selector uses.

    None: the parameter has no counterpart in this selector's strategy.
    """
    p = config.params
    if strategy is Strategy.UCB1:
        # The contract's bound is mean + c sqrt(ln N / n); the core's
        # mean + ucb_alpha sqrt(2 ln N / n), so c = ucb_alpha sqrt(2).
        return {"c": p.ucb_alpha * math.sqrt(2.0)}
    if strategy is Strategy.THOMPSON:
        return {"prior_mean": None, "prior_std": None}
    if strategy is Strategy.EPSILON_GREEDY:
        constant = p.epsilon_decay == 1.0 or p.epsilon0 <= p.epsilon_min
        return {"epsilon": max(p.epsilon0, p.epsilon_min) if constant else None}
    return {"alpha": p.linucb_alpha, "ridge": config.linucb_ridge}


def _check_strategy_params(
    strategy: Strategy, params: Mapping[str, float], config: SelectorConfig
) -> None:
    effective = _effective_params(strategy, config)
    for name, value in params.items():
        path = f"strategy_params[{name}]"
        if name not in effective:
            raise InvalidArgumentError(
                f"unknown parameter of {strategy.value}; it takes {sorted(effective)}", path
            )
        if not math.isfinite(value):
            raise InvalidArgumentError(f"must be finite, got {value}", path)
        setting = effective[name]
        if setting is None:
            raise InvalidArgumentError(
                f"this selector's {strategy.value} has no such parameter (see {CONFIG_ENV})",
                path,
            )
        if not math.isclose(value, setting, rel_tol=1e-9, abs_tol=1e-12):
            raise InvalidArgumentError(
                f"{value:.6g} differs from this selector's {setting:.6g}; parameters are set "
                f"in the selector's configuration ({CONFIG_ENV}), not per request",
                path,
            )


def _on_request_path(exc: InvalidArgumentError, parsed: _SelectInput) -> InvalidArgumentError:
    """The core's error about `context[<slot>]`, named by the request field it came from."""
    field = exc.field
    if not (field.startswith("context[") and field.endswith("]")):
        return exc
    index = parsed.features_from.get(field[len("context[") : -1])
    if index is None:
        return exc
    message = str(exc).removeprefix(f"{field}: ")
    return InvalidArgumentError(message, f"arms[{index}].slot_features")


# -- Select: core to wire ----------------------------------------------------------------


def _select_response(
    request: seed_selector_pb2.SelectRequest,
    parsed: _SelectInput,
    decision: Decision,
    evidence: Mapping[Arm, ArmSummary],
) -> seed_selector_pb2.SelectResponse:
    response = _pb.SelectResponse(strategy=_STRATEGY_TO_PROTO[decision.strategy])
    if decision.arm is None:
        response.no_decision_reason = decision.reason
    else:
        response.has_decision = True
        response.decision_id = decision.decision_id
        response.chosen.CopyFrom(request.arms[parsed.first_index[decision.arm]])
    scores = response.scores
    # Field by field: about twice as fast as add(**fields) in the upb runtime.
    offers = iter(parsed.offers)  # the first offers, in request order
    for i, offered in enumerate(request.arms):
        entry = scores.add()
        entry.slot_id = offered.slot_id
        entry.blueprint = offered.blueprint
        first = parsed.duplicate_of.get(i)
        if first is not None:
            entry.eligibility = _pb.ELIGIBILITY_DUPLICATE
            entry.eligibility_reason = f"same arm as arms[{first}]; only the first offer counts"
            continue
        arm = next(offers).arm
        summary = evidence.get(arm)
        if summary is not None:
            entry.mean_reward = mean = summary.mean
            entry.pulls = summary.pulls
        else:
            mean = 0.0
        score = decision.scores.get(arm)
        if score is not None:
            entry.eligibility = _pb.ELIGIBILITY_ELIGIBLE
            entry.score = score
            entry.exploration_bonus = score - mean
            continue
        reasons = decision.ineligible[arm]
        entry.eligibility = _ELIGIBILITY_TO_PROTO[reasons[0].code]
        entry.eligibility_reason = "; ".join(f"{r.code.value}: {r.detail}" for r in reasons)
    return response


def _arm_stats(job_id: str, summary: ArmSummary) -> seed_selector_pb2.ArmStats:
    # selections, reward_std, last_reward and last_selected_at are not kept by the core.
    return _pb.ArmStats(
        job_id=job_id,
        slot_id=summary.slot_id,
        blueprint=summary.blueprint,
        pulls=summary.pulls,
        mean_reward=summary.mean,
    )


# -- the servicer ------------------------------------------------------------------------


class SeedSelectorService(seed_selector_pb2_grpc.SeedSelectorServiceServicer):
    """`graftmesh.v1.SeedSelectorService` over one `SeedSelector` (rules: module docstring).

    `after_call` runs after every call, whatever its outcome (the agent checks the
    store's health there). Errors are raised as the mesh's errors; the server's
    interceptor turns them into statuses.
    """

    def __init__(
        self, selector: SeedSelector, after_call: Callable[[], None] | None = None
    ) -> None:
        self._selector = selector
        self._config = selector.core.config
        self._after_call = after_call or (lambda: None)

    async def Select(
        self, request: seed_selector_pb2.SelectRequest, context: Context
    ) -> seed_selector_pb2.SelectResponse:
        """Choose an arm for the job, or say why none is eligible."""
        try:
            parsed = _parse_select(request, self._config)
            selector = self._selector
            if request.HasField("rng_seed"):
                await selector.configure_job(request.job_id, JobSettings(seed=request.rng_seed))
            try:
                decision = await selector.select(
                    request.job_id,
                    parsed.offers,
                    strategy=parsed.strategy,
                    budget=parsed.budget,
                    concurrency=parsed.concurrency,
                    context=parsed.context,
                )
            except InvalidArgumentError as exc:
                raise _on_request_path(exc, parsed) from None
            evidence = await selector.summaries(request.job_id, parsed.first_index)
            return _select_response(request, parsed, decision, evidence)
        finally:
            self._after_call()

    async def Report(
        self, request: seed_selector_pb2.ReportRequest, context: Context
    ) -> seed_selector_pb2.ReportResponse:
        """Count a decision's reward; the arm's statistics after it."""
        try:
            if not request.decision_id:
                raise InvalidArgumentError("must not be empty", "decision_id")
            reward = request.reward
            if not math.isfinite(reward):
                raise InvalidArgumentError(f"must be finite, got {reward}", "reward")
            metrics = dict(request.metrics)
            for name, value in metrics.items():
                if not math.isfinite(value):
                    raise InvalidArgumentError(f"must be finite, got {value}", f"metrics[{name}]")
            selector = self._selector
            outcome = await selector.report(request.decision_id, reward, metrics)
            evidence = await selector.summaries(outcome.job_id, (outcome.arm,))
            arm = _arm_stats(outcome.job_id, evidence[outcome.arm])
            if not outcome.duplicate:
                arm.last_reward = outcome.reward
            return _pb.ReportResponse(arm=arm)
        finally:
            self._after_call()

    async def GetStats(
        self, request: seed_selector_pb2.SeedSelectorServiceGetStatsRequest, context: Context
    ) -> seed_selector_pb2.SeedSelectorServiceGetStatsResponse:
        """One job's per-arm statistics and decision counts."""
        try:
            if not request.job_id:
                raise InvalidArgumentError(
                    "is required: statistics are kept, and answered, per job", "job_id"
                )
            stats = await self._selector.stats(request.job_id)
            return _pb.SeedSelectorServiceGetStatsResponse(
                arms=[_arm_stats(stats.job_id, s) for s in stats.arms],
                decisions=stats.decisions,
                reports=stats.reports,
                open_decisions=max(0, stats.decisions - stats.reports),
            )
        finally:
            self._after_call()

    async def Reset(
        self, request: seed_selector_pb2.ResetRequest, context: Context
    ) -> seed_selector_pb2.ResetResponse:
        """Forget one job's statistics and open decisions, or every job's."""
        try:
            scope = request.WhichOneof("scope")
            if scope is None:
                raise InvalidArgumentError("set job_id or all", "scope")
            if scope == "all":
                if not request.all:
                    raise InvalidArgumentError("must be true when set", "all")
                await self._selector.reset(None, all_jobs=True)
                return _pb.ResetResponse()
            arms = decisions = 0
            try:
                stats = await self._selector.stats(request.job_id)
                arms = len(stats.arms)
                decisions = max(0, stats.decisions - stats.reports)
            except (NotFoundError, UnavailableError):
                pass  # unknown, or not countable now: forgotten all the same
            await self._selector.reset(request.job_id)
            return _pb.ResetResponse(arms_cleared=arms, decisions_cleared=decisions)
        finally:
            self._after_call()


# -- health and lifecycle ----------------------------------------------------------------


class StoreHealth:
    """Mirrors `SeedSelector.degraded_reason` into the agent's health, and reports changes.

    `sync()` is cheap when nothing changed. It leaves an `unhealthy` status alone:
    that is the runtime's (starting, draining).
    """

    def __init__(
        self, selector: SeedSelector, health: HealthState, bus: ErrorBus | None = None
    ) -> None:
        self._selector = selector
        self._health = health
        self._bus = bus
        self._reported: str | None = None

    def sync(self, *, force: bool = False) -> None:
        """Bring the health status in line; `force` checks it even if nothing seems changed."""
        reason = self._selector.degraded_reason
        if reason == self._reported and not force:
            return
        now = self._health.snapshot()
        if now["status"] == "unhealthy":
            return
        if reason is None:
            if now["status"] != "healthy" or now["issues"]:
                self._health.set("healthy")
        elif now["status"] != "degraded" or now["issues"] != [reason]:
            self._health.set("degraded", [reason])
        if self._bus is not None and (reason is None) != (self._reported is None):
            if reason is not None:
                self._bus.report_error(
                    reason, severity=Severity.WARNING, error_type="SelectorStoreUnavailable"
                )
            else:
                self._bus.report_error(
                    "selector store reachable again; queued writes stored",
                    severity=Severity.INFO,
                    error_type="SelectorStoreRecovered",
                )
        self._reported = reason


class SeedSelectorAgent:
    """The agent: the servicer, the store health watch, and closing the store on stop.

    `poll_interval_s` paces the watch (retrying queued writes while degraded).
    """

    service_names: Sequence[str] = (SERVICE_NAME,)

    def __init__(
        self,
        selector: SeedSelector,
        health: HealthState,
        bus: ErrorBus | None = None,
        *,
        poll_interval_s: float = 1.0,
    ) -> None:
        self._selector = selector
        self._store_health = StoreHealth(selector, health, bus)
        self._bus = bus
        self._poll_s = max(_MIN_POLL_S, poll_interval_s)
        self._watch: asyncio.Task[None] | None = None
        self.servicer = SeedSelectorService(selector, self._store_health.sync)

    @property
    def selector(self) -> SeedSelector:
        """The selector this agent serves."""
        return self._selector

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register the servicer."""
        seed_selector_pb2_grpc.add_SeedSelectorServiceServicer_to_server(self.servicer, server)

    async def start(self) -> None:
        """Start watching the store's health."""
        # What start-up allocated (modules, gRPC, protobuf, numpy) lives as long as the
        # process: frozen, the collector stops walking it, and a full collection in the
        # middle of a call costs what the calls allocated, not tens of milliseconds.
        gc.collect()
        gc.freeze()
        self._watch = asyncio.create_task(
            run_every(
                self._poll_s,
                self._watch_store_once,
                what="seed selector store watch",
                bus=self._bus,
            ),
            name="seed-selector-store-watch",
        )

    async def stop(self) -> None:
        """Stop the watch, write what is queued (if the store answers) and close the store."""
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        await self._selector.aclose()

    async def _watch_store_once(self) -> None:
        if self._selector.degraded_reason is not None:
            await self._selector.flush()
        self._store_health.sync(force=True)


def build(ctx: AgentContext) -> SeedSelectorAgent:
    """The seed selector agent for `common.agent.run` (settings: module docstring)."""
    config = selector_config_from_environ(os.environ)
    prefix = os.environ.get(KEY_PREFIX_ENV) or DEFAULT_KEY_PREFIX
    store = RedisSelectorStore.from_url(
        ctx.env.redis_url, prefix=prefix, timeout_s=config.store_timeout_s
    )
    return SeedSelectorAgent(
        SeedSelector(store, config),
        ctx.health,
        ctx.bus,
        poll_interval_s=config.store_retry_interval_s,
    )
