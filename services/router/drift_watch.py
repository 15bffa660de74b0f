"""Turning drift reports into `drift` alerts, at most one per version per cooldown.

A version's `DriftAccumulator` hands over a report per window of observed rows
(see `drift`); every feature whose PSI is over `psi_threshold` is named in one
`drift` alert (severity warning) for that version, unless the version raised
one less than `alert_cooldown_s` ago. The latest report of each version is kept
for the health details.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from common.logging import get_logger
from services.router.alerts import alert_subject, make_alert
from services.router.drift import DriftReport
from services.router.serving import ServedVersion
from services.router.settings import DriftSettings

__all__ = ["DriftWatch"]

_log = get_logger(__name__)

Publish = Callable[[str, Mapping[str, Any]], Awaitable[None]]


class DriftWatch:
    """Receives drift reports on the event loop and publishes the alerts."""

    def __init__(
        self,
        settings: DriftSettings,
        *,
        agent: str,
        publish: Publish,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._agent = agent
        self._publish = publish
        self._clock = clock
        self._last_alert: dict[tuple[str, int], float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.latest: dict[tuple[str, int], float] = {}

    def on_report(self, served: ServedVersion, report: DriftReport) -> None:
        """A version finished a drift window (called on the event loop)."""
        key = served.key
        worst = max((v for values in report.psi.values() for v in values), default=0.0)
        self.latest[key] = worst
        over = report.over(self._settings.psi_threshold)
        if not over:
            return
        now = self._clock()
        last = self._last_alert.get(key)
        if last is not None and now - last < self._settings.alert_cooldown_s:
            return
        self._last_alert[key] = now
        features = [
            {"input": name, "feature": feature, "psi": round(value, 4)}
            for name, feature, value in sorted(over, key=lambda o: -o[2])
        ]
        top = features[0]
        message = (
            f"{served.name} v{served.version}: input drift on {len(features)} feature(s), "
            f"worst {top['input']}[{top['feature']}] PSI {top['psi']} "
            f"(threshold {self._settings.psi_threshold:g}, {report.rows} rows)"
        )
        alert = make_alert(
            "drift",
            "warning",
            agent=self._agent,
            about=f"{served.name}:{served.version}",
            message=message,
            sample={
                "model": served.name,
                "version": served.version,
                "rows": report.rows,
                "threshold": self._settings.psi_threshold,
                "features": features[:20],
            },
        )
        _log.warning("input drift", model=served.name, version=served.version, psi=top["psi"])
        task = asyncio.create_task(self._send(alert), name="router-drift-alert")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, alert: Mapping[str, Any]) -> None:
        await self._publish(alert_subject("warning", self._agent), alert)
