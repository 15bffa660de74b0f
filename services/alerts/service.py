"""The alerts agent: the consumer, its sinks and its health, on the agent runtime.

`build` is what `python -m services.alerts` runs (`common.agent.run(build)`). The
agent serves no gRPC of its own (leave its `port` out of the config). Settings come
from its environment (`services.alerts.settings`); the dependencies that
inhibition follows come from the mesh's config (`GRAFTMESH_CONFIG`).

Health: `healthy` while it consumes; `degraded` with the reason while it waits for
NATS, cannot publish alerts or cannot save its state. Details: `events` (error
events handled), `alerts_published`, `alerts_duplicate`, `active_floods`,
`fingerprints`, `agents_down`, `consumer_lag` (messages waiting after the last
batch), `redelivered` (messages skipped as already handled), `inhibited`,
`invalid_events`, `file`, and `webhook` (sent, failed, dropped, queued) when one
is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Sequence
from typing import Any

import grpc

from common.agent import AgentContext, run_every
from common.bus import Severity
from services.alerts.consumer import AlertConsumer
from services.alerts.model import Alert
from services.alerts.settings import AlertsSettings
from services.alerts.sinks import AlertSink, JsonlFileSink, WebhookSink

__all__ = ["AlertsAgent", "build"]


_HEALTH_REFRESH_S = 0.5


class AlertsAgent:
    """The agent's lifecycle: start the consumer and the sinks, keep health current."""

    service_names: Sequence[str] = ()

    def __init__(self, ctx: AgentContext, settings: AlertsSettings) -> None:
        self._ctx = ctx
        self.settings = settings
        dependencies: dict[str, list[str]] = {}
        if ctx.config is not None:
            dependencies = {
                name: list(agent.spec.dependencies) for name, agent in ctx.config.agents().items()
            }
        self.file_sink = JsonlFileSink(settings.file_path, max_bytes=settings.file_max_bytes)
        self.webhook: WebhookSink | None = None
        sinks: list[AlertSink] = [self.file_sink]
        if settings.webhook_url is not None:
            self.webhook = WebhookSink(settings.webhook_url, on_failure=self._webhook_failed)
            sinks.append(self.webhook)
        self.consumer = AlertConsumer(
            ctx.bus,
            sinks,
            settings.consumer,
            rules=settings.rules,
            dependencies=dependencies,
            on_issues=self._on_issues,
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    def add_to_server(self, server: grpc.aio.Server) -> None:
        return None

    async def start(self) -> None:
        if self.webhook is not None:
            self.webhook.start()
        self._tasks = [
            asyncio.create_task(self.consumer.run(), name="alerts-consumer"),
            asyncio.create_task(
                run_every(_HEALTH_REFRESH_S, self._refresh_details, what="alerts health details"),
                name="alerts-health",
            ),
        ]
        self._refresh_details()

    async def stop(self) -> None:
        self._stopping = True  # the runtime reports `unhealthy: draining` from now on
        self.consumer.stop()
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            if task.get_name() != "alerts-consumer":
                task.cancel()
        # The consumer commits the batch in hand; the runtime bounds the whole stop.
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.webhook is not None:
            await self.webhook.close(timeout_s=2.0)
        await self.file_sink.close()

    def _on_issues(self, issues: list[str]) -> None:
        if self._stopping:
            return
        if issues:
            self._ctx.health.set("degraded", issues)
        else:
            self._ctx.health.set("healthy")

    def _webhook_failed(self, alert: Alert, error: BaseException) -> None:
        self._ctx.bus.report_error(
            f"alert webhook failed: {error}",
            severity=Severity.WARNING,
            error_type="AlertWebhookFailed",
            details={"alert": alert.id, "kind": alert.kind.value},
        )

    def _refresh_details(self) -> None:
        stats = self.consumer.stats
        details: dict[str, Any] = {
            "durable": self.settings.consumer.durable,
            "consuming": stats.consuming,
            "events": stats.events,
            "alerts_published": stats.published,
            "alerts_duplicate": stats.duplicates,
            "consumer_lag": stats.lag,
            "redelivered": stats.skipped,
            "invalid_events": stats.invalid,
            "file": str(self.settings.file_path),
        }
        engine = self.consumer.engine
        if engine is not None:
            engine_stats = engine.stats
            details.update(
                active_floods=engine_stats.active_floods,
                fingerprints=engine_stats.fingerprints,
                agents_down=list(engine_stats.agents_down),
                inhibited=engine_stats.inhibited,
            )
        if self.webhook is not None:
            hook = self.webhook.stats
            details["webhook"] = {
                "sent": hook.sent,
                "failed": hook.failed,
                "dropped": hook.dropped,
                "queued": hook.queued,
            }
        self._ctx.health.update_details(**details)


def build(ctx: AgentContext) -> AlertsAgent:
    """The alerts agent of this process, its settings read from the environment."""
    return AlertsAgent(ctx, AlertsSettings.from_environ(os.environ, ctx.env.run_dir))
