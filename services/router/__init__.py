"""The inference router agent: serves registered models by alias, routed by cost, latency and
health, with canary analysis and drift alerts. README.md has the whole picture.

Pure modules (no I/O), re-exported here:

- `routing`: the version plan (weighted split, cost-aware choice, fallbacks) and
  power-of-two-choices replica picking;
- `ejection`: passive outlier ejection with growing, capped, jittered ejections
  and panic mode;
- `batching`: the dynamic micro-batching policy and queue;
- `canary`: the promote / roll back / wait verdict;
- `drift`: the reference statistics schema, PSI and its accumulator;
- `window`: sliding-window serving statistics;
- `tensors`: wire tensors and input signatures;
- `alerts`: the alert JSON.

Around them: `artifacts` (checking and loading a version's files), `replicas`
(worker threads), `serving` (one loaded version), `catalog` (models, aliases,
routes, loading and draining), `inference` (the Infer path), `registry_client`,
`events`, `canary_watch`, `drift_watch`, and `service` (`RouterService`,
`RouterAgent`, `build`), which is not re-exported so that in-process users do
not load the agent runtime.
"""

from services.router.alerts import alert_subject, make_alert
from services.router.batching import BatchDecision, BatchPolicy, BatchQueue
from services.router.canary import CanaryDecision, CanaryPolicy, SideStats, Verdict, judge
from services.router.drift import (
    DriftAccumulator,
    DriftReport,
    InputReference,
    ReferenceStatistics,
    psi,
    reference_from_moments,
    reference_from_samples,
)
from services.router.ejection import EjectionPolicy, MemberState, OutlierDetector
from services.router.routing import (
    Constraints,
    Plan,
    Refusal,
    ReplicaLoad,
    RouteTarget,
    VersionView,
    normalise_targets,
    pick_replica,
    plan,
    shares,
)
from services.router.settings import RouterSettings, settings_from_environ
from services.router.tensors import (
    Signature,
    TensorSpec,
    bind,
    decode_inputs,
    tensor_from_proto,
    tensor_to_proto,
)
from services.router.window import Ewma, SlidingWindow, WindowSummary

__all__ = [
    "BatchDecision",
    "BatchPolicy",
    "BatchQueue",
    "CanaryDecision",
    "CanaryPolicy",
    "Constraints",
    "DriftAccumulator",
    "DriftReport",
    "EjectionPolicy",
    "Ewma",
    "InputReference",
    "MemberState",
    "OutlierDetector",
    "Plan",
    "ReferenceStatistics",
    "Refusal",
    "ReplicaLoad",
    "RouteTarget",
    "RouterSettings",
    "SideStats",
    "Signature",
    "SlidingWindow",
    "TensorSpec",
    "Verdict",
    "VersionView",
    "WindowSummary",
    "alert_subject",
    "bind",
    "decode_inputs",
    "judge",
    "make_alert",
    "normalise_targets",
    "pick_replica",
    "plan",
    "psi",
    "reference_from_moments",
    "reference_from_samples",
    "settings_from_environ",
    "shares",
    "tensor_from_proto",
    "tensor_to_proto",
]
