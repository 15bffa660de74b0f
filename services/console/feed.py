"""The console's live feed: what happens on the mesh's NATS subjects, fanned out to browsers.

It shares the error bus's connection and listens to `events.agent.>` (the
supervisor's state changes, core NATS), `events.job.>` (the trainer),
`events.model.>` (the registry), and the `ALERTS` stream (`alerts.>`), of which
it keeps the latest alerts for the mesh page (read back from the stream at
start, so a restarted console still shows them). Every subscriber (an SSE
response) has a bounded queue; one that does not keep up loses its oldest
messages rather than holding the others back.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from common.bus import ALERTS_STREAM, ErrorBus, ensure_streams
from common.logging import get_logger
from services.console.views import View, alert_view

__all__ = ["EVENT_SUBJECTS", "FeedStats", "LiveFeed", "Subscriber"]

_log = get_logger(__name__)

EVENT_SUBJECTS: Final = {
    "events.agent.>": "agent",
    "events.job.>": "job",
    "events.model.>": "model",
}
_QUEUE_SIZE: Final = 500
_CONNECT_POLL_S: Final = 0.2
_RETRY_S: Final = 2.0


@dataclass(eq=False)
class Subscriber:
    """One listener's queue of `(kind, data)` messages."""

    queue: asyncio.Queue[tuple[str, View]] = field(
        default_factory=lambda: asyncio.Queue(maxsize=_QUEUE_SIZE)
    )
    dropped: int = 0

    def offer(self, item: tuple[str, View]) -> None:
        if self.queue.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(item)


@dataclass
class FeedStats:
    subscribed: bool = False
    events: int = 0
    alerts: int = 0
    invalid: int = 0


class LiveFeed:
    """Subscriptions on the bus's connection, recent alerts, and the listeners."""

    def __init__(
        self,
        bus: ErrorBus,
        *,
        alerts_kept: int,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._bus = bus
        self._sleep = sleep
        self.alerts: collections.deque[View] = collections.deque(maxlen=alerts_kept)
        self._alert_ids: set[str] = set()
        self._subscribers: set[Subscriber] = set()
        self._subs: list[Subscription] = []
        self._stop = asyncio.Event()
        self.stats = FeedStats()

    @property
    def listeners(self) -> int:
        return len(self._subscribers)

    def subscribe(self) -> Subscriber:
        sub = Subscriber()
        self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self._subscribers.discard(sub)

    def _fan_out(self, kind: str, data: View) -> None:
        for sub in list(self._subscribers):
            sub.offer((kind, data))

    async def run(self) -> None:
        """Subscribe once the bus is connected (retrying until `stop`), then wait for it."""
        while not self._stop.is_set():
            while not self._bus.connected and not self._stop.is_set():
                await self._sleep(_CONNECT_POLL_S)
            if self._stop.is_set():
                break
            try:
                await self._subscribe()
            except Exception as exc:
                _log.warning("live feed not subscribed; retrying", error=repr(exc))
                await self._unsubscribe()
                await self._sleep(_RETRY_S)
                continue
            self.stats.subscribed = True
            await self._stop.wait()
        await self._unsubscribe()

    def stop(self) -> None:
        self._stop.set()
        # Wake every listener so that open event streams end now.
        self._fan_out("end", {})

    async def _subscribe(self) -> None:
        nc, js = self._bus.nc, self._bus.js
        if nc is None or js is None:
            raise ConnectionError("the bus has no connection yet")
        for subject, kind in EVENT_SUBJECTS.items():
            self._subs.append(await nc.subscribe(subject, cb=self._event_handler(kind)))
        await ensure_streams(js)
        info = await js.stream_info(ALERTS_STREAM)
        start = max(info.state.first_seq, info.state.last_seq - (self.alerts.maxlen or 1) + 1, 1)
        self._subs.append(
            await js.subscribe(
                "alerts.>",
                stream=ALERTS_STREAM,
                ordered_consumer=True,
                cb=self._on_alert,
                config=ConsumerConfig(
                    deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                    opt_start_seq=start,
                    ack_policy=AckPolicy.NONE,
                ),
            )
        )

    async def _unsubscribe(self) -> None:
        subs, self._subs = self._subs, []
        self.stats.subscribed = False
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def _event_handler(self, kind: str) -> Callable[[Msg], Awaitable[None]]:
        async def handle(msg: Msg) -> None:
            data = _json(msg.data)
            if data is None:
                self.stats.invalid += 1
                return
            self.stats.events += 1
            self._fan_out(kind, {"subject": msg.subject, **data})

        return handle

    async def _on_alert(self, msg: Msg) -> None:
        alert = alert_view(_json(msg.data))
        if alert is None:
            self.stats.invalid += 1
            return
        if alert["id"] in self._alert_ids:
            return  # an ordered consumer that was reset delivers some again
        if len(self.alerts) == self.alerts.maxlen:
            self._alert_ids.discard(self.alerts[0]["id"])
        self.alerts.append(alert)
        self._alert_ids.add(alert["id"])
        self.stats.alerts += 1
        self._fan_out("alert", alert)


def _json(data: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None
