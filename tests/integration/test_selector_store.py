"""The seed selector over real Redis: store conformance, restarts, and Redis outages."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from common.errors import UnavailableError
from common.infra import EmbeddedServer
from services.seed_selector import (
    Arm,
    ArmOffer,
    DecayConfig,
    InMemorySelectorStore,
    RedisSelectorStore,
    SeedSelector,
    SelectorConfig,
    Strategy,
)
from tests.ports import free_port
from tests.unit.seed_selector.store_conformance import SelectorStoreConformance

pytestmark = pytest.mark.integration

OFFERS = [ArmOffer(f"slot{s}", f"bp{b}", added_params=100) for s in range(3) for b in range(2)]
CONFIG = SelectorConfig(strategy=Strategy.THOMPSON, seed=11, store_retry_interval_s=0.0)


def _reward(arm: Arm) -> float:
    # Deterministic and arm-dependent, so a decision sequence depends on the evidence.
    return 1.0 if arm.blueprint == "bp1" and arm.slot_id != "slot0" else 0.0


async def _delete_prefix(url: str, prefix: str) -> None:
    client = aioredis.Redis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=500)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture
def prefix(unique_name: str) -> str:
    return f"graftmesh:test:{unique_name}:selector:"


@pytest.fixture
async def clean_prefix(redis_url: str, prefix: str) -> AsyncIterator[str]:
    yield prefix
    await _delete_prefix(redis_url, prefix)


class TestRedisSelectorStore(SelectorStoreConformance):
    @pytest.fixture
    async def store(self, redis_url: str, clean_prefix: str) -> AsyncIterator[RedisSelectorStore]:
        store = RedisSelectorStore.from_url(redis_url, prefix=clean_prefix)
        yield store
        await store.aclose()


async def test_keys_live_under_the_prefix(redis_url: str, clean_prefix: str) -> None:
    selector = SeedSelector(RedisSelectorStore.from_url(redis_url, prefix=clean_prefix), CONFIG)
    decision = await selector.select("job-1", OFFERS)
    await selector.report(decision.decision_id, 1.0)
    await selector.aclose()
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        keys = {key async for key in client.scan_iter(match=f"{clean_prefix}*")}
        ttl = await client.pttl(f"{clean_prefix}decision:{decision.decision_id}")
    finally:
        await client.aclose()
    assert decision.arm is not None
    arm_key = f"{clean_prefix}arm:job-1:{decision.arm.slot_id}:{decision.arm.blueprint}"
    assert {
        f"{clean_prefix}jobs",
        f"{clean_prefix}job:job-1",
        f"{clean_prefix}arms:job-1",
        arm_key,
        f"{clean_prefix}decision:{decision.decision_id}",
    } == keys
    assert 0 < ttl <= CONFIG.decision_ttl_s * 1000


async def test_report_made_after_restart_counts_and_stats_continue(
    redis_url: str, clean_prefix: str
) -> None:
    first = SeedSelector(RedisSelectorStore.from_url(redis_url, prefix=clean_prefix), CONFIG)
    reported = await first.select("job-1", OFFERS)
    await first.report(reported.decision_id, 1.0)
    pending = await first.select("job-1", OFFERS)
    await first.aclose()

    second = SeedSelector(RedisSelectorStore.from_url(redis_url, prefix=clean_prefix), CONFIG)
    try:
        outcome = await second.report(pending.decision_id, 0.0)
        assert (outcome.arm, outcome.duplicate) == (pending.arm, False)
        stats = await second.stats("job-1")
        assert (stats.decisions, stats.reports) == (2, 2)
        assert sum(arm.pulls for arm in stats.arms) == 2
        again = await second.report(reported.decision_id, 1.0)
        assert again.duplicate
        await second.select("job-1", OFFERS)
        stats = await second.stats("job-1")
        assert (stats.decisions, stats.reports) == (3, 2)
    finally:
        await second.aclose()


async def test_restart_continues_the_decisions_an_uninterrupted_selector_makes(
    redis_url: str, clean_prefix: str
) -> None:
    async def run(selector: SeedSelector, n: int) -> list[Arm]:
        arms = []
        for _ in range(n):
            decision = await selector.select("job-r", OFFERS)
            assert decision.arm is not None
            arms.append(decision.arm)
            await selector.report(decision.decision_id, _reward(decision.arm))
        return arms

    uninterrupted = SeedSelector(InMemorySelectorStore(), CONFIG)
    expected = await run(uninterrupted, 16)
    await uninterrupted.aclose()

    seen = []
    for _ in range(2):
        selector = SeedSelector(RedisSelectorStore.from_url(redis_url, prefix=clean_prefix), CONFIG)
        seen += await run(selector, 8)
        await selector.aclose()
    assert seen == expected


async def test_selector_decides_from_memory_while_redis_is_down(unique_name: str) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    selector = SeedSelector(
        RedisSelectorStore.from_url(url, prefix=f"{unique_name}:", timeout_s=0.5), CONFIG
    )
    try:
        decision = await selector.select("job-down", OFFERS)
        assert decision.arm is not None
        reason = selector.degraded_reason
        assert reason is not None and "unavailable" in reason, reason
        outcome = await selector.report(decision.decision_id, 1.0)
        assert not outcome.duplicate
        stats = await selector.stats("job-down")
        assert (stats.decisions, stats.reports) == (1, 1)
        with pytest.raises(UnavailableError):
            await selector.report("made-before-a-restart-maybe", 1.0)
        assert not await selector.flush()
    finally:
        await selector.aclose()


async def test_writes_queued_during_an_outage_reach_redis_after_it_returns(
    tmp_path: Path, unique_name: str
) -> None:
    port = free_port()
    server = EmbeddedServer.redis("127.0.0.1", port, tmp_path)
    url = f"redis://127.0.0.1:{port}/0"
    prefix = f"{unique_name}:"
    config = SelectorConfig(decay=DecayConfig(gamma=1.0), seed=3, store_retry_interval_s=0.0)
    await server.start()
    try:
        before = SeedSelector(RedisSelectorStore.from_url(url, prefix=prefix), config)
        first = await before.select("job-o", OFFERS)
        await before.report(first.decision_id, 1.0)
        made_before_outage = await before.select("job-o", OFFERS)
        await before.aclose()

        await server.stop()
        # Restarted while Redis is away: the job starts empty and journals its outcomes.
        during = SeedSelector(RedisSelectorStore.from_url(url, prefix=prefix), config)
        local = await during.select("job-o", OFFERS)
        await during.report(local.decision_id, 0.0)
        assert during.degraded_reason is not None

        await server.start()
        assert await during.flush(), during.degraded_reason
        assert during.degraded_reason is None
        # The decision made before the outage is still known and counts.
        await during.report(made_before_outage.decision_id, 1.0)
        await during.aclose()

        after = SeedSelector(RedisSelectorStore.from_url(url, prefix=prefix), config)
        stats = await after.stats("job-o")
        await after.aclose()
        assert (stats.decisions, stats.reports) == (3, 3)
        assert sum(arm.pulls for arm in stats.arms) == 3
        assert sum(arm.successes for arm in stats.arms) == pytest.approx(2.0)
    finally:
        await server.stop()
