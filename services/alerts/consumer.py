"""The transport around the engine: the durable consumer of `ERRORS`, the supervisor's
events, publishing alerts, and the engine's state between runs.

One loop, on the error bus's NATS connection:

1. fetch a batch from the durable pull consumer (explicit acks);
2. hand each new message to the engine (`SequenceTracker` skips what the saved
   state already holds), and, once the consumer has caught up, let the engine's
   time move to now (flood summaries);
3. publish every resulting alert to JetStream on `alerts.<severity>.<agent>` with
   `Nats-Msg-Id` = the alert id, retrying until the server took it; an alert the
   server reports as a duplicate was delivered before, so the other sinks skip it;
4. commit: save the engine's state, then acknowledge the batch.

Because acks follow the saved state, a restart (or a crash) loses nothing and
alerts nothing twice: messages not acknowledged come again and are either in the
saved state (skipped) or not (handled again, giving the same alerts with the same
ids, which the stream's duplicate window drops). Commits are batched: at most
every `commit_interval_s`, or less often when saving the state takes long (a
large state must not eat the agent's time: at most about a fifth of it goes to
saving).

Supervisor events (`events.agent.>`) are core NATS: they reach the engine while
the agent runs; those published while it is down are not seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from common import telemetry
from common.bus import ERRORS_STREAM, ErrorBus, ensure_streams
from common.logging import get_logger
from common.retry import backoff_delay
from services.alerts.engine import AlertEngine
from services.alerts.model import Alert, InvalidEventError, parse_agent_event, parse_error_event
from services.alerts.rules import AlertRules
from services.alerts.sequence import SequenceTracker
from services.alerts.sinks import AlertSink
from services.alerts.state_store import (
    DEFAULT_STATE_BUCKET,
    KvStateStore,
    StateStore,
    decode_state,
    encode_state,
)

__all__ = [
    "DEFAULT_DURABLE",
    "AlertConsumer",
    "ConsumerSettings",
    "ConsumerStats",
]

_log = get_logger(__name__)

DEFAULT_DURABLE = "graftmesh-alerts"
_STATE_VERSION = 1
_BACKOFF_S = (0.2, 5.0)
_DRAIN_WAIT_S = 0.05
# Commits come at least this many times their own cost apart.
_COMMIT_COST_FACTOR = 4.0


@dataclass(frozen=True)
class ConsumerSettings:
    """How the consumer reads, commits and publishes.

    `subject` filters the durable consumer when it is created (an existing consumer
    keeps its own). A new consumer starts `start_lookback_s` back in the stream
    (0: only errors from now on). The engine's state is saved under `durable` in
    the key-value bucket `state_bucket`.
    """

    durable: str = DEFAULT_DURABLE
    subject: str = "errors.>"
    start_lookback_s: float = 300.0
    events_subject: str = "events.agent.>"
    state_bucket: str = DEFAULT_STATE_BUCKET
    batch: int = 256
    max_fetch_wait_s: float = 1.0
    commit_interval_s: float = 0.2
    max_uncommitted: int = 2_000
    # Short: a message whose delivery was lost comes again soon, and one that comes
    # again after it was handled is recognised (SequenceTracker) and only acked.
    ack_wait_s: float = 10.0
    publish_timeout_s: float = 5.0


@dataclass(frozen=True)
class ConsumerStats:
    events: int  # error events handed to the engine
    skipped: int  # messages already in the saved state (re-deliveries)
    invalid: int  # messages that were not events
    failed: int  # events the engine raised on (a bug; logged)
    agent_events: int
    published: int  # alerts the server stored
    duplicates: int  # alerts the server had already (re-published after a restart)
    lag: int | None  # messages waiting in the consumer after the last batch
    consuming: bool


class _Stopping(Exception):
    """Raised inside the loop when a stop is requested while it cannot make progress."""


class AlertConsumer:
    """Runs the engine on the error stream until `stop()`; see the module docstring."""

    def __init__(
        self,
        bus: ErrorBus,
        sinks: Sequence[AlertSink],
        settings: ConsumerSettings | None = None,
        *,
        rules: AlertRules | None = None,
        dependencies: Mapping[str, Iterable[str]] | None = None,
        on_issues: Callable[[list[str]], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings or ConsumerSettings()
        self._bus = bus
        self._sinks = list(sinks)
        self._rules = rules or AlertRules()
        self._dependencies = dependencies
        self._on_issues = on_issues
        self._clock = clock
        self.engine: AlertEngine | None = None
        self._tracker = SequenceTracker()
        self._store: StateStore | None = None
        self._stream_created: str | None = None
        self._lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._uncommitted: list[Msg] = []
        self._dirty = False
        self._last_commit = 0.0
        self._commit_every = self.settings.commit_interval_s
        self._issues: dict[str, str] = {}
        self._events = 0
        self._skipped = 0
        self._invalid = 0
        self._failed = 0
        self._agent_events = 0
        self._published = 0
        self._duplicates = 0
        self._lag: int | None = None
        self._consuming = False
        # What Prometheus alert rules (deploy/prometheus) watch: floods, drift, canaries...
        self._raised = telemetry.meter("graftmesh.alerts").create_counter(
            "graftmesh_alerts_raised", description="Alerts published, by kind, severity and agent"
        )

    @property
    def stats(self) -> ConsumerStats:
        return ConsumerStats(
            events=self._events,
            skipped=self._skipped,
            invalid=self._invalid,
            failed=self._failed,
            agent_events=self._agent_events,
            published=self._published,
            duplicates=self._duplicates,
            lag=self._lag,
            consuming=self._consuming,
        )

    def stop(self) -> None:
        """Ask `run` to finish: the batch in hand is committed, then it returns."""
        self._stop.set()

    async def run(self) -> None:
        """Consume until `stop()`; NATS trouble is waited out, never raised."""
        attempt = 0
        while not self._stop.is_set():
            try:
                await self._session()
                attempt = 0
            except _Stopping:
                break
            except asyncio.CancelledError:
                raise
            except Exception as err:
                attempt += 1
                self._consuming = False
                self._set_issue("consumer", f"alerts consumer interrupted: {err!r}; retrying")
                _log.warning("alerts consumer interrupted; retrying", error=repr(err))
                await self._sleep(backoff_delay(attempt, *_BACKOFF_S))
        self._consuming = False
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5.0):
                async with self._lock:
                    await self._commit(force=True)

    # ----------------------------------------------------------------- session

    async def _session(self) -> None:
        js = await self._connected()
        await ensure_streams(js)
        if self._store is None:
            self._store = await KvStateStore.open(
                js, self.settings.durable, self.settings.state_bucket
            )
        info = await js.stream_info(ERRORS_STREAM)
        created = info.created.isoformat() if info.created is not None else None
        if self.engine is None:
            await self._restore(self._store, created)
        elif created != self._stream_created:
            self._tracker.reset()
        self._stream_created = created
        sub = await js.pull_subscribe(
            self.settings.subject,
            durable=self.settings.durable,
            stream=ERRORS_STREAM,
            config=self._consumer_config(),
        )
        nc = self._bus.nc
        assert nc is not None
        events: Subscription | None = await nc.subscribe(
            self.settings.events_subject, cb=self._on_agent_message
        )
        self._consuming = True
        self._clear_issue("consumer")
        _log.info("alerts consumer started", durable=self.settings.durable)
        try:
            while not self._stop.is_set():
                msgs = await self._fetch(sub)
                async with self._lock:
                    await self._handle(msgs)
            # Messages the server already sent for the last pull wait in the client's
            # queue; taken now, they are not left to come again only after the ack wait.
            msgs = await self._fetch(sub, wait_s=_DRAIN_WAIT_S)
            if msgs:
                async with self._lock:
                    await self._handle(msgs)
        finally:
            self._consuming = False
            if events is not None:
                with contextlib.suppress(Exception):
                    await events.unsubscribe()
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _connected(self) -> JetStreamContext:
        if not self._bus.connected:
            self._set_issue("consumer", "waiting for NATS")
        while not self._bus.connected:
            if self._stop.is_set():
                raise _Stopping
            await self._sleep(0.1)
        js = self._bus.js
        if js is None:
            raise nats.errors.ConnectionClosedError
        return js

    def _consumer_config(self) -> ConsumerConfig:
        lookback = self.settings.start_lookback_s
        config = ConsumerConfig(
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.settings.ack_wait_s,
            max_deliver=-1,
            max_ack_pending=max(self.settings.max_uncommitted * 2, 1_000),
            description="graftmesh alerts agent",
        )
        if lookback > 0:
            config.deliver_policy = DeliverPolicy.BY_START_TIME
            config.opt_start_time = datetime.now(UTC) - timedelta(seconds=lookback)
        else:
            config.deliver_policy = DeliverPolicy.NEW
        return config

    async def _restore(self, store: StateStore, stream_created: str | None) -> None:
        state: dict[str, Any] | None = None
        data = await store.load()
        if data is not None:
            try:
                state = decode_state(data)
                if state.get("version") != _STATE_VERSION:
                    raise ValueError(f"state version {state.get('version')!r}")
                self.engine = AlertEngine.from_state(
                    state["engine"], self._rules, self._dependencies
                )
                self._tracker = SequenceTracker.from_state(state["sequence"])
            except (KeyError, TypeError, ValueError) as err:
                _log.warning("saved alerts state unreadable; starting afresh", error=str(err))
                state = None
        if state is None:
            self.engine = AlertEngine(self._rules, self._dependencies)
            self._tracker = SequenceTracker()
        elif state.get("stream_created") != stream_created:
            # The stream was re-created: its sequences start again.
            self._tracker.reset()
        _log.info(
            "alerts state loaded" if state is not None else "alerts state new",
            last_seq=self._tracker.last,
        )

    async def _fetch(
        self, sub: JetStreamContext.PullSubscription, wait_s: float | None = None
    ) -> list[Msg]:
        wait = self.settings.max_fetch_wait_s if wait_s is None else wait_s
        engine = self.engine
        deadline = engine.next_deadline() if engine is not None else None
        if deadline is not None:
            wait = min(wait, max(deadline - self._clock(), 0.0) + 0.01)
        if self._uncommitted or self._dirty:
            due_in = self._last_commit + self._commit_every - time.monotonic()
            wait = min(wait, max(due_in, 0.0) + 0.01)
        try:
            return await sub.fetch(self.settings.batch, timeout=max(wait, 0.05))
        except TimeoutError:  # nats-py raises its own subclass, or the builtin
            return []

    # ----------------------------------------------------------------- handling

    async def _handle(self, msgs: list[Msg]) -> None:
        engine = self.engine
        assert engine is not None
        now = self._clock()
        alerts: list[Alert] = []
        for msg in msgs:
            alerts.extend(self._take(engine, msg, now))
        self._uncommitted.extend(msgs)
        pending = msgs[-1].metadata.num_pending if msgs else 0
        self._lag = pending
        # An empty fetch while disconnected says nothing about a backlog: the engine's
        # time moves to now only when the consumer is known to have caught up.
        caught_up = pending == 0 and self._bus.connected
        if caught_up:
            alerts.extend(engine.tick(now))
        if alerts:
            self._dirty = True
            await self._publish(alerts)
        await self._commit(force=len(self._uncommitted) >= self.settings.max_uncommitted)

    def _take(self, engine: AlertEngine, msg: Msg, now: float) -> list[Alert]:
        try:
            seq = msg.metadata.sequence.stream
        except Exception:
            self._invalid += 1
            return []
        if not self._tracker.admit(seq, now):
            self._skipped += 1
            return []
        self._dirty = True
        try:
            event = parse_error_event(msg.data)
        except InvalidEventError as err:
            self._invalid += 1
            _log.debug("not an error event; skipped", subject=msg.subject, error=str(err))
            return []
        self._events += 1
        try:
            return engine.on_error(event, now)
        except Exception:
            self._failed += 1
            _log.exception("alerts engine failed on an event; skipped", event_id=event.id)
            return []

    async def _on_agent_message(self, msg: Msg) -> None:
        try:
            event = parse_agent_event(msg.subject, msg.data)
        except InvalidEventError as err:
            self._invalid += 1
            _log.debug("not an agent event; skipped", subject=msg.subject, error=str(err))
            return
        self._agent_events += 1
        try:
            async with self._lock:
                engine = self.engine
                if engine is None:
                    return
                alerts = engine.on_agent_event(event, self._clock())
                self._dirty = True
                if alerts:
                    await self._publish(alerts)
                await self._commit(force=True)
        except _Stopping:
            return
        except Exception:
            _log.exception("agent event not handled", subject=msg.subject)

    # ----------------------------------------------------------------- output

    async def _publish(self, alerts: Sequence[Alert]) -> None:
        for alert in alerts:
            duplicate = await self._publish_one(alert)
            if duplicate:
                self._duplicates += 1
                continue
            self._published += 1
            # `alert_agent`: Prometheus itself labels every series with the scraped `agent`.
            self._raised.add(
                1,
                {"kind": alert.kind.value, "severity": alert.severity, "alert_agent": alert.agent},
            )
            _log.info("alert", kind=alert.kind.value, severity=alert.severity, agent=alert.agent)
            for sink in self._sinks:
                try:
                    sink.deliver(alert)
                except Exception:
                    _log.exception("alert sink failed", sink=type(sink).__name__)

    async def _publish_one(self, alert: Alert) -> bool:
        """Publish until the server took it; True when it already had it."""
        body = alert.encode()
        attempt = 0
        while True:
            js = self._bus.js
            try:
                if js is None:
                    raise nats.errors.ConnectionClosedError
                ack = await js.publish(
                    alert.subject,
                    body,
                    timeout=self.settings.publish_timeout_s,
                    headers={"Nats-Msg-Id": alert.id},
                )
                self._clear_issue("publish")
                return bool(ack.duplicate)
            except asyncio.CancelledError:
                raise
            except Exception as err:
                attempt += 1
                self._set_issue("publish", f"cannot publish alerts: {err!r}")
                if attempt == 1:
                    _log.warning("alert publish failed; retrying", error=repr(err))
                if isinstance(err, nats.errors.NoRespondersError) and js is not None:
                    # The stream is gone (a NATS restarted without its store).
                    with contextlib.suppress(Exception):
                        await ensure_streams(js)
                if self._stop.is_set():
                    raise _Stopping from err
                await self._sleep(backoff_delay(attempt, *_BACKOFF_S))

    async def _commit(self, *, force: bool) -> None:
        """Save the state, then ack what it covers; at most every `_commit_every` s
        unless `force`."""
        if not (self._uncommitted or self._dirty):
            return
        now = time.monotonic()
        if not force and now - self._last_commit < self._commit_every:
            return
        store, engine = self._store, self.engine
        if store is None or engine is None:
            return
        state = {
            "version": _STATE_VERSION,
            "stream_created": self._stream_created,
            "sequence": self._tracker.to_state(),
            "engine": engine.to_state(),
        }
        try:
            await store.save(encode_state(state))
        except nats.errors.MaxPayloadError as err:
            # Too big to keep: carry on without (a restart then starts afresh).
            self._set_issue("state", f"alerts state not saved: {err!r}")
        except Exception as err:
            self._set_issue("state", f"alerts state not saved: {err!r}; retrying")
            return  # keep the messages unacknowledged; the next commit tries again
        else:
            self._clear_issue("state")
        msgs, self._uncommitted = self._uncommitted, []
        for msg in msgs:
            with contextlib.suppress(Exception):
                await msg.ack()
        self._dirty = False
        self._last_commit = time.monotonic()
        cost = self._last_commit - now
        self._commit_every = min(
            max(self.settings.commit_interval_s, _COMMIT_COST_FACTOR * cost),
            self.settings.ack_wait_s / 2,  # acks must come well within the ack wait
        )

    # ----------------------------------------------------------------- helpers

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stop.wait()

    def _set_issue(self, key: str, text: str) -> None:
        if self._issues.get(key) != text:
            self._issues[key] = text
            self._report_issues()

    def _clear_issue(self, key: str) -> None:
        if self._issues.pop(key, None) is not None:
            self._report_issues()

    def _report_issues(self) -> None:
        if self._on_issues is not None:
            self._on_issues(list(self._issues.values()))
