"""The package exports exactly its public API."""

from __future__ import annotations

from services import seed_selector

EXPECTED = {
    "DEFAULT_KEY_PREFIX",
    "GLOBAL_SCOPE",
    "Arm",
    "ArmOffer",
    "ArmStats",
    "ArmSummary",
    "Budget",
    "Choice",
    "Concurrency",
    "DecayConfig",
    "Decision",
    "Eligibility",
    "InMemorySelectorStore",
    "Ineligibility",
    "IneligibleCode",
    "JobSettings",
    "JobStats",
    "JobTracker",
    "RedisSelectorStore",
    "ReportOutcome",
    "RewardModel",
    "SeedSelector",
    "SelectorConfig",
    "SelectorCore",
    "SelectorStore",
    "SlotState",
    "StoreWrite",
    "StoredJob",
    "Strategy",
    "StrategyParams",
    "check_eligibility",
    "choose",
    "epsilon_at",
}


def test_exports_are_the_public_api_and_all_exist() -> None:
    assert set(seed_selector.__all__) == EXPECTED
    missing = [name for name in seed_selector.__all__ if not hasattr(seed_selector, name)]
    assert missing == []
