"""The router's settings: one typed model, read from the `ROUTER_CONFIG` environment variable.

In `startup_config.yaml` they go in the router agent's `env:` as one JSON object,
e.g. `ROUTER_CONFIG: '{"replicas": 4, "batching": {"max_wait_us": 200}}'`. Every
field has a default; unknown keys are errors that name the key.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from common.errors import ConfigError

__all__ = [
    "CONFIG_ENV",
    "BatchingSettings",
    "CanarySettings",
    "DriftSettings",
    "EjectionSettings",
    "QualityFloor",
    "RouterSettings",
    "settings_from_environ",
]

CONFIG_ENV = "ROUTER_CONFIG"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BatchingSettings(_Strict):
    """Dynamic micro-batching of the requests to one version (see `batching`)."""

    # 1 turns batching off.
    max_batch_size: int = Field(32, ge=1, le=4096)
    # How long the oldest queued request may wait for company while a replica is free.
    max_wait_us: int = Field(500, ge=0, le=1_000_000)
    # Requests queued per version beyond this are refused (RESOURCE_EXHAUSTED).
    max_queue: int = Field(4096, ge=1)


class EjectionSettings(_Strict):
    """Passive outlier ejection, for replicas and for versions alike (see `ejection`)."""

    consecutive_failures: int = Field(5, ge=1)
    base_ejection_s: float = Field(5.0, gt=0)
    multiplier: float = Field(2.0, ge=1.0)
    max_ejection_s: float = Field(300.0, gt=0)
    # Each ejection lasts its nominal time times (1 +- jitter).
    jitter: float = Field(0.1, ge=0, lt=1)
    # At most this share of the members is ejected at once (at least one may be).
    max_ejected_share: float = Field(0.5, ge=0, le=1)
    # Below this share of healthy members, ejection is ignored (panic mode).
    panic_threshold: float = Field(0.5, ge=0, le=1)

    @model_validator(mode="after")
    def _ordered(self) -> EjectionSettings:
        if self.max_ejection_s < self.base_ejection_s:
            raise ValueError("max_ejection_s must be >= base_ejection_s")
        return self


class CanarySettings(_Strict):
    """Automatic canary analysis (see `canary`); `enabled: false` leaves aliases alone."""

    enabled: bool = True
    production_alias: str = "production"
    canary_alias: str = "canary"
    interval_s: float = Field(5.0, gt=0)
    # The comparison covers at most this much recent traffic of each version.
    window_s: float = Field(300.0, gt=0)
    min_requests: int = Field(100, ge=1)
    min_duration_s: float = Field(30.0, ge=0)
    max_error_rate_increase: float = Field(0.02, ge=0, le=1)
    max_latency_ratio: float = Field(1.5, ge=1.0)
    latency_slack_us: float = Field(1000.0, ge=0)
    fail_fast_errors: int = Field(10, ge=1)


class DriftSettings(_Strict):
    """Input drift against each version's reference statistics (see `drift`)."""

    enabled: bool = True
    psi_threshold: float = Field(0.2, gt=0)
    # PSI is computed over tumbling windows of this many observed rows.
    window_rows: int = Field(2000, ge=10)
    # Observe one batch in this many (1: every batch).
    sample_every: int = Field(1, ge=1)
    # One alert per version and input feature at most this often.
    alert_cooldown_s: float = Field(300.0, ge=0)


class QualityFloor(_Strict):
    """A version serves an alias's traffic only if `metrics[metric] >= min` (or `<=` max)."""

    metric: str = Field(min_length=1)
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _one_bound(self) -> QualityFloor:
        if (self.min is None) == (self.max is None):
            raise ValueError("give exactly one of 'min' (higher is better) or 'max'")
        return self


class RouterSettings(_Strict):
    """Everything the router can be told; see the README for what each part does."""

    # host:port of the registry; unset: found through its ready key, then the config.
    registry_address: str | None = None
    registry_agent: str = "registry"
    registry_timeout_s: float = Field(10.0, gt=0)
    # Model name -> aliases to load at start (others load on their first request).
    preload: dict[str, list[str]] = {}
    replicas: int = Field(2, ge=1, le=64)
    # torch devices replicas go on, round-robin (`cpu`, `cuda:0`, ...).
    devices: list[str] = Field(default_factory=lambda: ["cpu"], min_length=1)
    # Cost units per second of replica compute, by device type (`cpu`, `cuda`, ...).
    prices: dict[str, float] = Field(default_factory=lambda: {"cpu": 1.0, "cuda": 4.0})
    # process-wide torch intra-op threads; unset leaves torch's default.
    torch_threads: int | None = Field(None, ge=1)
    batching: BatchingSettings = BatchingSettings()
    ejection: EjectionSettings = EjectionSettings()
    canary: CanarySettings = CanarySettings()
    drift: DriftSettings = DriftSettings()
    # Model name -> the quality floor its routes must respect.
    quality_floors: dict[str, QualityFloor] = {}
    # A lone request may run on the event loop instead of its replica's thread when
    # that is cheaper (measured), if its replica computes in less than this; 0: never.
    inline_max_us: float = Field(1000.0, ge=0)
    # Replica attempts per request within one version (retries on other replicas).
    max_attempts: int = Field(3, ge=1, le=10)
    # Versions tried per request: the route's choice, then fallbacks.
    max_versions_tried: int = Field(3, ge=1, le=10)
    # Earlier versions of each alias kept loaded as fallbacks.
    keep_previous: int = Field(1, ge=0, le=5)
    stats_window_s: float = Field(60.0, gt=0)
    # Aliases are re-read from the registry this often, besides on events.
    reconcile_interval_s: float = Field(10.0, gt=0)
    # A draining version gets this long to finish its queued and running requests.
    drain_timeout_s: float = Field(30.0, gt=0)
    # A version loaded only for requests by version number is unloaded after this idle time.
    idle_unload_s: float = Field(600.0, gt=0)

    def price(self, device: str) -> float:
        """Cost units per compute second on `device` (by its type; 1.0 when unpriced)."""
        return self.prices.get(device.split(":", 1)[0], 1.0)


def settings_from_environ(environ: Mapping[str, str]) -> RouterSettings:
    """The settings `ROUTER_CONFIG` describes; `ConfigError` naming every bad key."""
    raw = environ.get(CONFIG_ENV, "").strip()
    try:
        data = json.loads(raw) if raw else {}
    except ValueError as exc:
        raise ConfigError([f"{CONFIG_ENV} is not JSON: {exc}"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{CONFIG_ENV} must be a JSON object of router settings"])
    try:
        return RouterSettings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(
            [
                f"{CONFIG_ENV}.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
                for err in exc.errors()
            ]
        ) from None
