"""The registry's model events (`events.model.<name>.<event>`), heard over NATS.

Each event makes the catalog refresh that model from the registry: the event
only says *that* something changed; the registry says what. Events travel on
core NATS (at most once), so the catalog also refreshes every model on a timer,
and a missed event only delays a change.

The listener has a connection of its own, made in the background and retried
with backoff, so a router starts, and serves, while NATS is away.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg

from common.logging import get_logger

__all__ = ["MODEL_EVENTS", "ModelEvents", "model_of"]

_log = get_logger(__name__)

MODEL_EVENTS = "events.model.*.*"
_EVENTS = frozenset({"registered", "promoted", "rolled_back"})
_BACKOFF_S = (0.2, 5.0)


def model_of(subject: str) -> str | None:
    """The model name of an `events.model.<name>.<event>` subject (None for anything else)."""
    parts = subject.split(".")
    if len(parts) != 4 or parts[:2] != ["events", "model"] or parts[3] not in _EVENTS:
        return None
    return parts[2] or None


class ModelEvents:
    """Calls `on_change(model)` for every model event; `start`/`stop` own the connection."""

    def __init__(self, nats_url: str, on_change: Callable[[str], None], *, agent: str) -> None:
        self._url = nats_url
        self._on_change = on_change
        self._agent = agent
        self._nc: Client | None = None
        self._task: asyncio.Task[None] | None = None
        self.subscribed = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._connect_loop(), name="router-model-events")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()

    async def _connect_loop(self) -> None:
        delay = _BACKOFF_S[0]
        while self._nc is None:
            try:
                nc = await nats.connect(
                    self._url,
                    name=f"graftmesh-{self._agent}-events",
                    connect_timeout=2,
                    max_reconnect_attempts=1,
                    reconnect_time_wait=0,
                )
            except Exception as exc:
                _log.debug("events: NATS not reachable; retrying", error=repr(exc), in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _BACKOFF_S[1])
                continue
            # Once connected, reconnect forever (nats-py reads these at reconnect time).
            nc.options["max_reconnect_attempts"] = -1
            nc.options["reconnect_time_wait"] = 1.0
            await nc.subscribe(MODEL_EVENTS, cb=self._on_message)
            await nc.flush()
            self._nc = nc
            self.subscribed.set()
            _log.info("listening to model events", subject=MODEL_EVENTS)

    async def _on_message(self, msg: Msg) -> None:
        name = model_of(msg.subject)
        if name is not None:
            self._on_change(name)
