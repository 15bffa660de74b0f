"""The seed selector agent: which seed slot to grow, with which blueprint (a bandit).

`SeedSelector` is the entry point; the modules below it are pure (no I/O) except
`store`:

- `strategies`: UCB1, Thompson sampling, epsilon-greedy, LinUCB;
- `eligibility`: which offered arms may be chosen, and why not;
- `tracker`: per-arm evidence with exponential forgetting, JSON round trip;
- `selector`: `SelectorCore` (synchronous decisions) and `SeedSelector` (with store);
- `store`: the `SelectorStore` boundary, in memory and in Redis.

The agent around it, `service` (`SeedSelectorService`, the gRPC servicer;
`SeedSelectorAgent`; `build`, which `python -m services.seed_selector` runs), is
imported from `services.seed_selector.service` and not re-exported here, so that
in-process users of the selector do not load the gRPC agent runtime.
"""

from services.seed_selector.eligibility import (
    ArmOffer,
    Budget,
    Concurrency,
    Eligibility,
    Ineligibility,
    IneligibleCode,
    SlotState,
    check_eligibility,
)
from services.seed_selector.selector import (
    ArmSummary,
    Decision,
    JobSettings,
    JobStats,
    ReportOutcome,
    SeedSelector,
    SelectorConfig,
    SelectorCore,
)
from services.seed_selector.store import (
    DEFAULT_KEY_PREFIX,
    InMemorySelectorStore,
    RedisSelectorStore,
    SelectorStore,
    StoredJob,
    StoreWrite,
)
from services.seed_selector.strategies import (
    Choice,
    RewardModel,
    Strategy,
    StrategyParams,
    choose,
    epsilon_at,
)
from services.seed_selector.tracker import GLOBAL_SCOPE, Arm, ArmStats, DecayConfig, JobTracker

__all__ = [
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
]
