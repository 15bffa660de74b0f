"""`InMemorySelectorStore` against the shared `SelectorStore` conformance suite."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from services.seed_selector import InMemorySelectorStore
from tests.unit.seed_selector.store_conformance import SelectorStoreConformance


class TestInMemorySelectorStore(SelectorStoreConformance):
    @pytest.fixture
    async def store(self) -> AsyncIterator[InMemorySelectorStore]:
        store = InMemorySelectorStore()
        yield store
        await store.aclose()
