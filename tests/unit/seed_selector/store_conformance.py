"""The behaviour every `SelectorStore` must show, run against each implementation.

Subclass `SelectorStoreConformance` in a `Test...` class that provides a `store`
fixture (a fresh, empty store); pytest then runs every test below against it.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from services.seed_selector import SelectorStore, StoreWrite


async def _wait_for_decision_gone(
    store: SelectorStore, decision_id: str, deadline_s: float
) -> None:
    deadline = time.monotonic() + deadline_s
    last: str | None = None
    while time.monotonic() < deadline:
        last = await store.get_decision(decision_id)
        if last is None:
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"decision {decision_id} still stored after {deadline_s} s: {last!r}")


class SelectorStoreConformance:
    """Tests shared by every `SelectorStore`; needs a `store` fixture."""

    async def test_unknown_job_and_decision_are_none(self, store: SelectorStore) -> None:
        assert await store.load_job("no-such-job") is None
        assert await store.get_decision("no-such-decision") is None

    async def test_job_and_arm_documents_round_trip(self, store: SelectorStore) -> None:
        await store.apply(
            StoreWrite(
                jobs={"j1": '{"job": 1}'},
                arms={("j1", "s0", "bp0"): '{"arm": 0}', ("j1", "s1", "bp0"): '{"arm": 1}'},
            )
        )
        stored = await store.load_job("j1")
        assert stored is not None
        assert stored.job == '{"job": 1}'
        assert sorted(stored.arms) == ['{"arm": 0}', '{"arm": 1}']

    async def test_putting_a_document_again_replaces_it(self, store: SelectorStore) -> None:
        await store.apply(StoreWrite(jobs={"j": "old"}, arms={("j", "s", "b"): "old-arm"}))
        await store.apply(StoreWrite(jobs={"j": "new"}, arms={("j", "s", "b"): "new-arm"}))
        stored = await store.load_job("j")
        assert stored is not None
        assert (stored.job, stored.arms) == ("new", ["new-arm"])

    async def test_ids_with_separators_do_not_collide(self, store: SelectorStore) -> None:
        await store.apply(
            StoreWrite(
                jobs={"a:b": "job a:b", "a": "job a"},
                arms={("a:b", "c", "bp"): "arm of a:b", ("a", "b:c", "bp"): "arm of a"},
            )
        )
        first, second = await store.load_job("a:b"), await store.load_job("a")
        assert first is not None and second is not None
        assert first.arms == ["arm of a:b"]
        assert second.arms == ["arm of a"]

    async def test_deleting_a_job_leaves_other_jobs(self, store: SelectorStore) -> None:
        await store.apply(
            StoreWrite(
                jobs={"gone": "g", "kept": "k"},
                arms={("gone", "s", "b"): "ga", ("kept", "s", "b"): "ka"},
            )
        )
        await store.apply(StoreWrite(delete_jobs={"gone"}))
        assert await store.load_job("gone") is None
        kept = await store.load_job("kept")
        assert kept is not None and kept.arms == ["ka"]

    async def test_deleted_job_comes_back_without_its_old_arms(self, store: SelectorStore) -> None:
        await store.apply(StoreWrite(jobs={"j": "v1"}, arms={("j", "old", "b"): "old-arm"}))
        await store.apply(
            StoreWrite(delete_jobs={"j"}, jobs={"j": "v2"}, arms={("j", "new", "b"): "new-arm"})
        )
        stored = await store.load_job("j")
        assert stored is not None
        assert (stored.job, stored.arms) == ("v2", ["new-arm"])

    async def test_delete_all_then_put_in_one_batch_keeps_the_puts(
        self, store: SelectorStore
    ) -> None:
        await store.apply(StoreWrite(jobs={"a": "a", "b": "b"}, arms={("a", "s", "x"): "aa"}))
        await store.apply(StoreWrite(delete_all_jobs=True, jobs={"c": "c"}))
        assert await store.load_job("a") is None
        assert await store.load_job("b") is None
        stored = await store.load_job("c")
        assert stored is not None and stored.job == "c"

    async def test_decisions_survive_job_deletion(self, store: SelectorStore) -> None:
        await store.apply(StoreWrite(jobs={"j": "j"}, decisions={"d1": "decision"}))
        await store.apply(StoreWrite(delete_all_jobs=True))
        assert await store.get_decision("d1") == "decision"

    async def test_decision_expires_after_its_ttl(self, store: SelectorStore) -> None:
        await store.apply(StoreWrite(decisions={"long": "L"}, decision_ttl_s=60.0))
        await store.apply(StoreWrite(decisions={"short": "S"}, decision_ttl_s=0.05))
        await _wait_for_decision_gone(store, "short", deadline_s=5.0)
        assert await store.get_decision("long") == "L"

    async def test_putting_a_decision_again_replaces_it(self, store: SelectorStore) -> None:
        await store.apply(StoreWrite(decisions={"d": "pending"}))
        await store.apply(StoreWrite(decisions={"d": "reported"}))
        assert await store.get_decision("d") == "reported"
