"""The seed selector: decisions and reports, jobs, and its store at the edge."""

from __future__ import annotations

import asyncio
import math
import time
import uuid

import pytest

from common.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from services.seed_selector import (
    GLOBAL_SCOPE,
    ArmOffer,
    Budget,
    Concurrency,
    InMemorySelectorStore,
    JobSettings,
    SeedSelector,
    SelectorConfig,
    SelectorCore,
    SlotState,
    StoredJob,
    StoreWrite,
    Strategy,
)
from tests.wait import eventually

OFFERS = [ArmOffer(f"s{i}", "bp", added_params=100) for i in range(4)]


class _SwitchableStore:
    """An in-memory store that can be made unreachable, counting the calls it gets."""

    def __init__(self) -> None:
        self.inner = InMemorySelectorStore()
        self.down = False
        self.calls = 0

    def _check(self) -> None:
        self.calls += 1
        if self.down:
            raise UnavailableError("store switched off")

    async def apply(self, write: StoreWrite) -> None:
        self._check()
        await self.inner.apply(write)

    async def load_job(self, job_id: str) -> StoredJob | None:
        self._check()
        return await self.inner.load_job(job_id)

    async def get_decision(self, decision_id: str) -> str | None:
        self._check()
        return await self.inner.get_decision(decision_id)

    async def aclose(self) -> None:
        await self.inner.aclose()


# -- decisions ----------------------------------------------------------------------------


def test_no_eligible_arm_gives_no_decision_and_every_reason() -> None:
    core = SelectorCore()
    offers = [
        ArmOffer("s0", "bp", slot_state=SlotState.TRAINING),
        ArmOffer("s1", "bp", added_params=10_000),
    ]
    decision = core.decide("job", offers, budget=Budget(remaining_params=500), now=0.0)
    assert decision.arm is None
    assert decision.scores == {}
    assert "no eligible arm" in decision.reason
    assert "slot_not_dormant" in decision.reason and "over_param_budget" in decision.reason
    assert set(decision.ineligible) == {o.arm for o in offers}
    with pytest.raises(NotFoundError):
        core.record(decision.decision_id, 1.0, now=0.0)


def test_cap_reached_blocks_every_arm() -> None:
    decision = SelectorCore().decide(
        "job", OFFERS, concurrency=Concurrency(active_seeds=3, max_active_seeds=3), now=0.0
    )
    assert decision.arm is None
    assert decision.reason.endswith(f"{len(OFFERS)} x concurrency_cap_reached")


def test_decision_explains_itself_with_every_eligible_arms_score() -> None:
    core = SelectorCore(SelectorConfig(strategy=Strategy.UCB1))
    offers = [*OFFERS, ArmOffer("busy", "bp", slot_state=SlotState.TRAINING)]
    for _ in range(8):
        d = core.decide("job", offers, now=0.0)
        core.record(d.decision_id, 0.5, now=0.0)
    decision = core.decide("job", offers, now=0.0)
    assert set(decision.scores) == {o.arm for o in OFFERS}
    assert all(math.isfinite(v) for v in decision.scores.values())
    assert decision.arm is not None
    assert decision.scores[decision.arm] == max(decision.scores.values())
    assert "ucb1" in decision.reason
    assert uuid.UUID(decision.decision_id).version == 4


def test_strategy_comes_from_request_then_job_then_selector() -> None:
    core = SelectorCore(SelectorConfig(strategy=Strategy.UCB1))
    assert core.decide("a", OFFERS, now=0.0).strategy is Strategy.UCB1
    core.configure_job("a", JobSettings(strategy=Strategy.EPSILON_GREEDY))
    assert core.decide("a", OFFERS, now=0.0).strategy is Strategy.EPSILON_GREEDY
    assert core.decide("a", OFFERS, strategy=Strategy.LINUCB, now=0.0).strategy is Strategy.LINUCB
    assert core.decide("b", OFFERS, now=0.0).strategy is Strategy.UCB1


def test_features_are_fixed_by_the_first_context() -> None:
    core = SelectorCore()
    core.decide("job", OFFERS, context={"s0": {"grad_norm": 1.0, "plateau": 2.0}}, now=0.0)
    assert core.stats("job", now=0.0).features == ("grad_norm", "plateau")
    core.decide("job", OFFERS, context={"s1": {"plateau": 3.0}}, now=0.0)  # missing: 0
    with pytest.raises(InvalidArgumentError) as err:
        core.decide("job", OFFERS, context={"s2": {"loss": 1.0}}, now=0.0)
    assert err.value.field == "context[s2]"
    with pytest.raises(FailedPreconditionError):
        core.configure_job("job", JobSettings(features=("loss",)))


def test_configured_features_win_over_the_first_context() -> None:
    core = SelectorCore(SelectorConfig(features=("a", "b")))
    core.configure_job("job", JobSettings(features=("c",), seed=9))
    core.decide("job", OFFERS, context={"s0": {"c": 1.0}}, now=0.0)
    assert core.stats("job", now=0.0).features == ("c",)
    with pytest.raises(FailedPreconditionError):
        core.configure_job("job", JobSettings(seed=10))


def test_empty_job_id_is_the_global_scope() -> None:
    core = SelectorCore()
    decision = core.decide("", OFFERS, now=0.0)
    assert decision.job_id == GLOBAL_SCOPE
    core.record(decision.decision_id, 1.0, now=0.0)
    assert core.stats(None, now=0.0).reports == 1


# -- reports ------------------------------------------------------------------------------


def test_unknown_decision_is_not_found() -> None:
    with pytest.raises(NotFoundError):
        SelectorCore().record("no-such-decision", 1.0, now=0.0)


def test_report_counts_once_and_a_retry_is_idempotent() -> None:
    core = SelectorCore()
    decision = core.decide("job", OFFERS, now=0.0)
    first = core.record(decision.decision_id, 0.7, {"params_added": 100.0}, now=1.0)
    again = core.record(decision.decision_id, 0.7, now=2.0)
    assert (first.duplicate, again.duplicate) == (False, True)
    assert first.arm == again.arm == decision.arm
    assert core.stats("job", now=2.0).reports == 1


def test_report_again_with_another_reward_fails_precondition() -> None:
    core = SelectorCore()
    decision = core.decide("job", OFFERS, now=0.0)
    core.record(decision.decision_id, 0.7, now=0.0)
    with pytest.raises(FailedPreconditionError, match=r"0\.7"):
        core.record(decision.decision_id, 0.2, now=0.0)


def test_decision_expires_after_its_ttl() -> None:
    core = SelectorCore(SelectorConfig(decision_ttl_s=10.0))
    decision = core.decide("job", OFFERS, now=100.0)
    with pytest.raises(NotFoundError, match="expired"):
        core.record(decision.decision_id, 1.0, now=110.0)


def test_pending_decisions_are_bounded_oldest_first() -> None:
    core = SelectorCore(SelectorConfig(max_pending_decisions=3))
    decisions = [core.decide("job", OFFERS, now=0.0) for _ in range(4)]
    with pytest.raises(NotFoundError):
        core.record(decisions[0].decision_id, 1.0, now=0.0)
    core.record(decisions[1].decision_id, 1.0, now=0.0)


@pytest.mark.parametrize(
    ("reward", "metrics", "field"),
    [
        (math.nan, None, "reward"),
        (math.inf, None, "reward"),
        (1.0, {"gain": math.nan}, "metrics.gain"),
    ],
)
def test_non_finite_reward_or_metric_is_invalid(
    reward: float, metrics: dict[str, float] | None, field: str
) -> None:
    core = SelectorCore()
    decision = core.decide("job", OFFERS, now=0.0)
    with pytest.raises(InvalidArgumentError) as err:
        core.record(decision.decision_id, reward, metrics, now=0.0)
    assert err.value.field == field
    core.record(decision.decision_id, 1.0, now=0.0)  # the bad report counted nothing


def test_reset_forgets_the_job_and_its_decisions() -> None:
    core = SelectorCore()
    kept = core.decide("other", OFFERS, now=0.0)
    decision = core.decide("job", OFFERS, now=0.0)
    core.reset("job")
    with pytest.raises(NotFoundError):
        core.record(decision.decision_id, 1.0, now=0.0)
    with pytest.raises(NotFoundError):
        core.stats("job", now=0.0)
    core.record(kept.decision_id, 1.0, now=0.0)
    core.reset(None, all_jobs=True)
    with pytest.raises(NotFoundError):
        core.stats("other", now=0.0)


# -- the store at the edge ----------------------------------------------------------------


async def test_restarted_selector_continues_from_the_store() -> None:
    store = InMemorySelectorStore()
    first = SeedSelector(store)
    reported = await first.select("job", OFFERS)
    await first.report(reported.decision_id, 1.0)
    pending = await first.select("job", OFFERS)

    second = SeedSelector(store)
    outcome = await second.report(pending.decision_id, 0.0)
    assert outcome.arm == pending.arm and not outcome.duplicate
    stats = await second.stats("job")
    assert (stats.decisions, stats.reports) == (2, 2)
    with pytest.raises(NotFoundError):
        await second.report("never-made", 1.0)
    with pytest.raises(NotFoundError):
        await second.stats("never-seen-job")


async def test_reset_reaches_the_store() -> None:
    store = InMemorySelectorStore()
    first = SeedSelector(store)
    decision = await first.select("job", OFFERS)
    await first.reset("job")
    second = SeedSelector(store)
    with pytest.raises(NotFoundError):
        await second.stats("job")
    with pytest.raises(NotFoundError, match="reset"):
        await second.report(decision.decision_id, 1.0)


async def test_store_outage_degrades_then_recovers_without_losing_outcomes() -> None:
    store = _SwitchableStore()
    config = SelectorConfig(store_retry_interval_s=0.0)
    before = SeedSelector(store, config)
    made_before = await before.select("job", OFFERS)
    await before.report(made_before.decision_id, 1.0)
    pending_before = await before.select("job", OFFERS)

    store.down = True
    during = SeedSelector(store, config)  # a restart while the store is away
    assert during.degraded_reason is None
    local = await during.select("job", OFFERS)
    assert local.arm is not None
    reason = during.degraded_reason
    assert reason is not None and "store switched off" in reason and "queued" in reason
    await during.report(local.decision_id, 1.0)
    local_pending = await during.select("job", OFFERS)
    with pytest.raises(UnavailableError):
        await during.report(pending_before.decision_id, 1.0)

    store.down = False
    assert await during.flush()
    assert during.degraded_reason is None
    # Decisions from both sides of the outage still count after the merge.
    await during.report(pending_before.decision_id, 0.0)
    await during.report(local_pending.decision_id, 0.0)
    stats = await during.stats("job")
    assert (stats.decisions, stats.reports) == (4, 4)
    assert sum(a.pulls for a in stats.arms) == 4

    after = SeedSelector(store, config)
    assert (await after.stats("job")).reports == 4


async def test_degraded_selector_asks_the_store_at_most_once_per_retry_interval() -> None:
    store = _SwitchableStore()
    now = [0.0]
    selector = SeedSelector(
        store, SelectorConfig(store_retry_interval_s=5.0), monotonic=lambda: now[0]
    )
    await selector.select("job", OFFERS)
    store.down = True
    d = await selector.select("job", OFFERS)
    await selector.report(d.decision_id, 1.0)
    calls = store.calls
    for _ in range(5):
        d = await selector.select("job", OFFERS)
        await selector.report(d.decision_id, 1.0)
    assert store.calls == calls
    now[0] = 6.0
    store.down = False
    await selector.select("job", OFFERS)
    assert store.calls > calls
    assert selector.degraded_reason is None


# -- write-behind -------------------------------------------------------------------------


async def test_write_behind_answers_before_the_store_and_writes_soon_after() -> None:
    store = _SwitchableStore()
    first = SeedSelector(store, SelectorConfig(write_behind_s=0.01))
    decision = await first.select("job", OFFERS)
    # Answered without a write: nothing of the decision is stored yet.
    assert await store.inner.get_decision(decision.decision_id) is None

    async def stored() -> bool:
        return await store.inner.get_decision(decision.decision_id) is not None

    await eventually(stored, 10, "the decision reaching the store")
    # A restart after the flush, without closing the first: the report still counts.
    second = SeedSelector(store)
    outcome = await second.report(decision.decision_id, 1.0)
    assert outcome.arm == decision.arm and not outcome.duplicate
    assert (await second.stats("job")).reports == 1
    await first.aclose()


async def test_write_behind_writes_right_after_a_call_once_half_the_delay_passed() -> None:
    store = InMemorySelectorStore()
    selector = SeedSelector(store, SelectorConfig(write_behind_s=4.0))
    started = time.monotonic()
    first = await selector.select("job", OFFERS)
    await asyncio.sleep(2.3)
    # Past half the delay, with no call since: the batch waits for one (or for 4 s).
    assert await store.get_decision(first.decision_id) is None
    second = await selector.select("job", OFFERS)

    async def both_stored() -> bool:
        got = [await store.get_decision(d.decision_id) for d in (first, second)]
        return None not in got

    await eventually(both_stored, 1.5, "the batch after the second call")
    assert time.monotonic() - started < 4.0, "written by the fallback, not after the call"
    await selector.aclose()


async def test_write_behind_writes_everything_on_close() -> None:
    store = InMemorySelectorStore()
    selector = SeedSelector(store, SelectorConfig(write_behind_s=30.0))
    for _ in range(10):
        decision = await selector.select("job", OFFERS)
        await selector.report(decision.decision_id, 0.5)
    pending = await selector.select("job", OFFERS)
    await selector.aclose()

    after = SeedSelector(store)
    stats = await after.stats("job")
    assert (stats.decisions, stats.reports) == (11, 10)
    assert (await after.report(pending.decision_id, 1.0)).arm == pending.arm


async def test_write_behind_notices_an_outage_in_the_background_and_recovers() -> None:
    store = _SwitchableStore()
    selector = SeedSelector(store, SelectorConfig(write_behind_s=0.005, store_retry_interval_s=0.0))
    await selector.select("job", OFFERS)
    await eventually(lambda: selector.core.queued() == 0, 10, "the first writes")
    store.down = True
    decision = await selector.select("job", OFFERS)
    assert decision.arm is not None
    await eventually(lambda: selector.degraded_reason is not None, 10, "degradation")
    reason = selector.degraded_reason
    assert reason is not None and "store switched off" in reason
    await selector.report(decision.decision_id, 1.0)  # still decided from memory

    store.down = False
    await selector.select("job", OFFERS)  # the next call's flush finds the store again
    await eventually(lambda: selector.degraded_reason is None, 10, "recovery")
    await eventually(lambda: selector.core.queued() == 0, 10, "the queued writes")
    after = SeedSelector(store)
    assert (await after.stats("job")).reports == 1
    await selector.aclose()
