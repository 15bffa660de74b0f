"""The alerts agent as a real process on the system NATS (JetStream) and Redis.

Each agent reads only the errors of its own machine token (`errors.<machine>.>`),
which no other test uses, under a durable consumer name of its own; the tests
publish with the real `ErrorBus` and supervisor-style events on core NATS, and
look at what arrives on `alerts.>`, in the `ALERTS` stream, in the file sink and
at a real local webhook.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats
import pytest
import yaml
from nats.aio.client import Client
from nats.js.api import ConsumerConfig, DeliverPolicy
from rich.console import Console

from common.bus import ALERTS_STREAM, ERRORS_STREAM, ErrorBus
from common.health import check_health
from services.alerts.cli import EXIT_INFRA, EXIT_OK, follow_alerts
from services.alerts.model import Alert, AlertKind, alert_id
from services.alerts.state_store import DEFAULT_STATE_BUCKET
from tests.integration.mesh import ROOT
from tests.ports import free_port
from tests.unit.alerts.webhook_server import WebhookServer
from tests.wait import eventually

pytestmark = pytest.mark.integration


class AlertsAgent:
    """`python -m services.alerts` with its GRAFTMESH_* environment; stopped by PID."""

    def __init__(
        self, run_dir: Path, nats_url: str, redis_url: str, machine: str, **env: str
    ) -> None:
        self.run_dir = run_dir
        self.machine = machine
        self.health_port = free_port()
        self.log = run_dir / f"alerts-{uuid.uuid4().hex[:6]}.log"
        self.env = {
            **os.environ,
            "GRAFTMESH_AGENT": f"{machine}-alerts",
            "GRAFTMESH_GROUP": "ops",
            "GRAFTMESH_MACHINE": machine,
            "GRAFTMESH_HOST": "127.0.0.1",
            "GRAFTMESH_HEALTH_PORT": str(self.health_port),
            "GRAFTMESH_NATS_URL": nats_url,
            "GRAFTMESH_REDIS_URL": redis_url,
            "GRAFTMESH_RUN_DIR": str(run_dir),
            "GRAFTMESH_ALERTS_SUBJECT": f"errors.{machine}.>",
            "GRAFTMESH_ALERTS_START_LOOKBACK_S": "0",
            **env,
        }
        for key in ("GRAFTMESH_PORT", "GRAFTMESH_METRICS_PORT"):
            if key not in env:
                self.env.pop(key, None)
        if "GRAFTMESH_CONFIG" not in env:
            self.env.pop("GRAFTMESH_CONFIG", None)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def file(self) -> Path:
        return self.run_dir / "alerts" / "alerts.jsonl"

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "services.alerts"],
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    async def details(self) -> dict[str, Any]:
        result = await check_health("127.0.0.1", self.health_port, 0.5)
        reply = result.reply or {}
        details: dict[str, Any] = reply.get("details") or {}
        return details

    async def wait_consuming(self) -> None:
        async def consuming() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
            return bool((await self.details()).get("consuming"))

        try:
            await eventually(consuming, 30, "alerts agent consuming")
        except AssertionError as err:
            raise AssertionError(f"{err}\n{self.log.read_text()}") from None

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise AssertionError(f"alerts agent did not stop:\n{self.log.read_text()}") from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def file_alerts(self) -> list[dict[str, Any]]:
        if not self.file.exists():
            return []
        return [json.loads(line) for line in self.file.read_text().splitlines()]


async def forget_durable(nats_url: str, durable: str) -> None:
    """Remove a test's durable consumer and saved state from the shared NATS."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        with contextlib.suppress(Exception):
            await js.delete_consumer(ERRORS_STREAM, durable)
        with contextlib.suppress(Exception):
            kv = await js.key_value(DEFAULT_STATE_BUCKET)
            await kv.purge(durable)
    finally:
        await nc.close()


class AlertWatch:
    """Every alert published on `alerts.>` about the given agents, as it arrives."""

    def __init__(self, nc: Client, agents: set[str]) -> None:
        self.nc = nc
        self.agents = agents
        self.alerts: list[dict[str, Any]] = []

    async def start(self) -> None:
        async def on_alert(msg: Any) -> None:
            alert = json.loads(msg.data)
            if alert.get("agent") in self.agents:
                self.alerts.append(alert)

        await self.nc.subscribe("alerts.>", cb=on_alert)

    def of(self, agent: str, kind: str | None = None) -> list[dict[str, Any]]:
        return [
            a for a in self.alerts if a["agent"] == agent and (kind is None or a["kind"] == kind)
        ]

    async def wait_for(self, agent: str, kind: str, n: int = 1, timeout_s: float = 15) -> None:
        try:
            await eventually(
                lambda: len(self.of(agent, kind)) >= n, timeout_s, f"{n} {kind} alert(s) of {agent}"
            )
        except AssertionError as err:
            seen = [(a["agent"], a["kind"], a["message"]) for a in self.alerts]
            raise AssertionError(f"{err}; saw {seen}") from None


async def stream_alerts(nc: Client, agent: str) -> list[dict[str, Any]]:
    """Every alert about `agent` stored in the ALERTS stream."""
    js = nc.jetstream()
    sub = await js.subscribe(
        f"alerts.*.{agent}",
        stream=ALERTS_STREAM,
        ordered_consumer=True,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
    )
    out: list[dict[str, Any]] = []
    try:
        info = await sub.consumer_info()
        delivered = info.delivered.consumer_seq if info.delivered is not None else 0
        more = bool(info.num_pending) or delivered > 0
        while more:
            msg = await sub.next_msg(timeout=5)
            out.append(json.loads(msg.data))
            more = msg.metadata.num_pending > 0
    finally:
        await sub.unsubscribe()
    return out


async def report(nats_url: str, machine: str, agent: str, *errors: dict[str, Any]) -> None:
    """Report `errors` (report_error keyword arguments) through a real ErrorBus, delivered."""
    bus = ErrorBus(nats_url=nats_url, machine=machine, agent=agent, collapse_window_s=0)
    await bus.start()
    try:
        for error in errors:
            bus.report_error(**error)
        await bus.flush(timeout_s=15)
    finally:
        await bus.close()


async def agent_event(nc: Client, agent: str, state: str, previous: str, restarts: int = 0) -> None:
    """What the supervisor publishes on a state change (core NATS)."""
    payload = {
        "agent": agent,
        "group": "core",
        "machine": "mainpc",
        "state": state.upper(),
        "previous": previous.upper(),
        "reason": f"test says {state}",
        "pid": 4242,
        "restarts": restarts,
        "timestamp": datetime.now(UTC).isoformat(),
    }
    await nc.publish(f"events.agent.{agent}.{state}", json.dumps(payload).encode())
    await nc.flush()


# --------------------------------------------------------------------------- a shared agent


class Mesh:
    """One alerts agent with a rules file, a config with dependencies and a webhook."""

    def __init__(self, agent: AlertsAgent, hook: WebhookServer, prefix: str) -> None:
        self.agent = agent
        self.hook = hook
        self.prefix = prefix
        self.nats_url = agent.env["GRAFTMESH_NATS_URL"]
        self.machine = agent.machine

    def name(self, suffix: str) -> str:
        return f"{self.prefix}{suffix}"


@pytest.fixture(scope="module")
def mesh(
    tmp_path_factory: pytest.TempPathFactory, system_nats_url: str, system_redis_url: str
) -> Iterator[Mesh]:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    machine = f"{prefix}m"
    run_dir = tmp_path_factory.mktemp("alerts-agent")
    rules = run_dir / "rules.yaml"
    # Short windows keep the test fast (quiet_s long enough that a loaded machine does not
    # split one burst in two); the production defaults are checked in unit tests.
    rules.write_text(
        yaml.safe_dump({"floods": {"connection": {"threshold": 10, "window_s": 5, "quiet_s": 6}}})
    )
    config = run_dir / "startup_config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "version": 1,
                "machine": machine,
                "machines": {machine: {"host": "127.0.0.1"}},
                "agent_groups": {
                    "core": {
                        "machine": machine,
                        "agents": {
                            f"{prefix}db": {
                                "command": ["true"],
                                "health_check_port": free_port(),
                                "metrics_port": 0,
                            },
                            f"{prefix}app": {
                                "command": ["true"],
                                "health_check_port": free_port(),
                                "metrics_port": 0,
                                "dependencies": [f"{prefix}db"],
                            },
                        },
                    }
                },
            }
        )
    )
    hook = WebhookServer(fail_once_for=f"{prefix}hook")
    agent = AlertsAgent(
        run_dir,
        system_nats_url,
        system_redis_url,
        machine,
        GRAFTMESH_ALERTS_DURABLE=f"{prefix}-alerts",
        GRAFTMESH_ALERTS_RULES=str(rules),
        GRAFTMESH_CONFIG=str(config),
        GRAFTMESH_ALERTS_WEBHOOK_URL=hook.url,
        GRAFTMESH_METRICS_PORT=str(free_port()),
    )
    agent.start()
    try:
        asyncio.run(agent.wait_consuming())
        yield Mesh(agent, hook, prefix)
        assert agent.stop() == 0, agent.log.read_text()
    finally:
        agent.kill()
        hook.close()
        asyncio.run(forget_durable(system_nats_url, f"{prefix}-alerts"))


@pytest.fixture
async def nc(system_nats_url: str) -> AsyncIterator[Client]:
    client = await nats.connect(system_nats_url)
    yield client
    await client.close()


async def test_new_error_is_published_stored_written_and_posted(mesh: Mesh, nc: Client) -> None:
    agent = mesh.name("svc")
    watch = AlertWatch(nc, {agent})
    await watch.start()
    await report(
        mesh.nats_url,
        mesh.machine,
        agent,
        {"message": "checkpoint 12 is corrupt", "error_type": "IntegrityError"},
        {"message": "just a warning", "severity": "warning", "error_type": "SlowDisk"},
    )
    await watch.wait_for(agent, "error")
    alert = watch.of(agent, "error")[0]
    assert alert["severity"] == "error" and alert["count"] == 1
    assert "IntegrityError: checkpoint 12 is corrupt" in alert["message"]
    assert alert["sample"]["error_type"] == "IntegrityError"
    await eventually(
        lambda: any(a["id"] == alert["id"] for a in mesh.agent.file_alerts()), 10, "file line"
    )
    await eventually(lambda: bool(mesh.hook.received(agent)), 10, "webhook post")
    assert [a["id"] for a in await stream_alerts(nc, agent)] == [alert["id"]]
    # The warning is grouped, never alerted on its own (new_error_min_severity: error).
    assert len(watch.of(agent)) == 1


async def test_webhook_gets_the_alert_again_after_a_500(mesh: Mesh, nc: Client) -> None:
    agent = mesh.name("hook")  # the webhook answers 500 to this agent's first alert
    await report(mesh.nats_url, mesh.machine, agent, {"message": "disk on fire"})
    await eventually(lambda: len(mesh.hook.received(agent)) >= 2, 15, "webhook retry")
    (first_status, first), (second_status, second) = mesh.hook.received(agent)[:2]
    assert (first_status, second_status) == (500, 200)
    assert first["id"] == second["id"] and first["kind"] == "error"


async def test_burst_of_connection_errors_is_one_flood_alert_and_one_summary(
    mesh: Mesh, nc: Client
) -> None:
    agent = mesh.name("burst")
    watch = AlertWatch(nc, {agent})
    await watch.start()
    await report(
        mesh.nats_url,
        mesh.machine,
        agent,
        *[
            {"message": f"cache refused after {i} tries", "error_type": "ConnectionError"}
            for i in range(50)
        ],
    )
    await watch.wait_for(agent, "flood", n=2)
    start, summary = watch.of(agent, "flood")
    assert start["count"] >= 10 and summary["count"] == 50
    assert summary["first_seen"] == start["first_seen"] and summary["id"] != start["id"]
    assert "is over" in summary["message"]
    # Besides the flood, only the first error (a new fingerprint) alerted: not 50 alerts.
    assert [a["kind"] for a in watch.of(agent)] == ["error", "flood", "flood"]
    stored = await stream_alerts(nc, agent)
    assert sorted(a["id"] for a in stored) == sorted(a["id"] for a in watch.of(agent))
    # Prometheus sees the same alerts (deploy/prometheus/alerts.yml rules watch this counter).
    url = f"http://127.0.0.1:{mesh.agent.env['GRAFTMESH_METRICS_PORT']}/metrics"
    body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    raised = {
        line.split("{")[1].split("}")[0]: float(line.rsplit(" ", 1)[1])
        for line in body.splitlines()
        if line.startswith("graftmesh_alerts_raised_total{") and f'alert_agent="{agent}"' in line
    }
    assert sum(v for labels, v in raised.items() if 'kind="flood"' in labels) == 2, raised
    assert sum(v for labels, v in raised.items() if 'kind="error"' in labels) == 1, raised


async def test_errors_of_dependents_fold_into_agent_down_until_it_is_back(
    mesh: Mesh, nc: Client
) -> None:
    db, app, other = mesh.name("db"), mesh.name("app"), mesh.name("other")
    watch = AlertWatch(nc, {db, app, other})
    await watch.start()
    await agent_event(nc, db, "failed", "backoff", restarts=5)
    await watch.wait_for(db, "agent_down")
    down = watch.of(db, "agent_down")[0]
    assert down["severity"] == "critical" and "failed" in down["message"]
    await report(
        mesh.nats_url,
        mesh.machine,
        app,
        *[{"message": f"registry call failed: {w}", "error_type": "RpcError"} for w in "abc"],
    )
    # An unrelated agent still alerts; its alert comes after app's errors were handled.
    await report(mesh.nats_url, mesh.machine, other, {"message": "unrelated"})
    await watch.wait_for(other, "error")
    assert watch.of(app) == []
    await agent_event(nc, db, "healthy", "starting", restarts=6)
    await watch.wait_for(db, "agent_restarted")
    recovered = [a for a in watch.of(db, "agent_down") if a["severity"] == "info"]
    assert len(recovered) == 1 and recovered[0]["count"] == 3
    assert f"{app}: 3" in recovered[0]["message"]
    assert watch.of(db, "agent_restarted")[0]["count"] == 6
    assert watch.of(app) == []


async def test_open_restart_breaker_is_a_breaker_open_alert(mesh: Mesh, nc: Client) -> None:
    crashy = mesh.name("crashy")
    watch = AlertWatch(nc, {crashy})
    await watch.start()
    await report(
        mesh.nats_url,
        mesh.machine,
        "supervisor",
        {
            "message": f"restart circuit breaker of {crashy} opened: 5 failures within 60s",
            "severity": "critical",
            "error_type": "CircuitBreakerOpen",
            "details": {"agent": crashy, "group": "core", "restarts": 5},
        },
    )
    await watch.wait_for(crashy, "breaker_open")
    alert = watch.of(crashy, "breaker_open")[0]
    assert alert["severity"] == "critical" and crashy in alert["message"]


# --------------------------------------------------------------------------- restart


def async_events_at_least(agent: AlertsAgent, n: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return int((await agent.details()).get("events", 0)) >= n

    return check


def _fault(i: int) -> dict[str, Any]:
    # Distinct error types: distinct fingerprints (numbers in messages would be normalised).
    letters = chr(ord("A") + i // 26) + chr(ord("A") + i % 26)
    return {"message": "step failed", "error_type": f"Fault{letters}"}


@pytest.mark.slow
async def test_restart_mid_stream_misses_nothing_and_alerts_nothing_twice(
    tmp_path: Path, system_nats_url: str, system_redis_url: str, unique_name: str, nc: Client
) -> None:
    machine, worker = f"{unique_name}m", f"{unique_name}w"
    durable = f"{unique_name}-alerts"
    agent = AlertsAgent(
        tmp_path, system_nats_url, system_redis_url, machine, GRAFTMESH_ALERTS_DURABLE=durable
    )
    watch = AlertWatch(nc, {worker})
    await watch.start()
    try:
        agent.start()
        await agent.wait_consuming()
        await report(system_nats_url, machine, worker, *[_fault(i) for i in range(10)])
        await watch.wait_for(worker, "error", n=10)
        # Mid-stream: the next ten are on their way when the agent is told to stop.
        await report(system_nats_url, machine, worker, *[_fault(i) for i in range(10, 20)])
        assert agent.stop() == 0, agent.log.read_text()
        # While it is down: ten new errors, and repeats of five it already alerted.
        await report(
            system_nats_url,
            machine,
            worker,
            *[_fault(i) for i in range(20, 30)],
            *[_fault(i) for i in range(5)],
        )
        agent.start()
        await agent.wait_consuming()
        await watch.wait_for(worker, "error", n=30)
        await eventually(lambda: len(agent.file_alerts()) >= 30, 10, "30 lines in the file")
        # The restarted agent handled the ten new errors and the five repeats.
        await eventually(
            async_events_at_least(agent, 15), 10, "the restarted agent handled 15 events"
        )
        stored = await stream_alerts(nc, worker)
    finally:
        with contextlib.suppress(AssertionError):
            agent.stop()
        agent.kill()
        await forget_durable(system_nats_url, durable)
    types = sorted(a["sample"]["error_type"] for a in stored)
    assert types == sorted(_fault(i)["error_type"] for i in range(30))
    assert len({a["id"] for a in stored}) == 30
    assert sorted(a["id"] for a in watch.of(worker)) == sorted(a["id"] for a in stored)
    assert sorted(a["id"] for a in agent.file_alerts()) == sorted(a["id"] for a in stored)


# --------------------------------------------------------------------------- the CLI


def _alert(agent: str, severity: str, n: int) -> Alert:
    now = datetime.now(UTC).timestamp()
    return Alert(
        id=alert_id("cli-test", agent, str(n)),
        timestamp=now,
        kind=AlertKind.ERROR,
        severity=severity,
        agent=agent,
        fingerprint="f" * 32,
        count=1,
        first_seen=now,
        last_seen=now,
        message=f"{severity} alert number {n}",
    )


async def _publish(nc: Client, *alerts: Alert) -> None:
    js = nc.jetstream()
    for alert in alerts:
        await js.publish(alert.subject, alert.encode(), headers={"Nats-Msg-Id": alert.id})


def _console() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, width=250, color_system=None), buffer


async def test_alerts_command_prints_recent_alerts_at_or_above_a_severity(
    system_nats_url: str, unique_name: str, nc: Client
) -> None:
    from common.bus import ensure_streams

    await ensure_streams(nc.jetstream())
    await _publish(
        nc,
        _alert(unique_name, "warning", 1),
        _alert(unique_name, "error", 2),
        _alert(unique_name, "critical", 3),
        _alert(unique_name, "error", 4),
    )
    out, buffer = _console()
    code = await asyncio.to_thread(
        follow_alerts, system_nats_url, False, "error", out, last=2, agent=unique_name
    )
    text = buffer.getvalue()
    assert code == EXIT_OK
    assert "alert number 3" in text and "alert number 4" in text
    assert "alert number 2" not in text  # beyond the last 2
    assert "alert number 1" not in text  # below the severity


async def test_alerts_command_follows_new_alerts_until_stopped(
    system_nats_url: str, unique_name: str, nc: Client
) -> None:
    out, buffer = _console()
    stop = threading.Event()
    task = asyncio.create_task(
        asyncio.to_thread(
            follow_alerts, system_nats_url, True, None, out, agent=unique_name, stop=stop
        )
    )
    try:
        await eventually(lambda: "no alerts yet" in buffer.getvalue(), 15, "history printed")
        await _publish(nc, _alert(unique_name, "info", 7))
        await eventually(lambda: "alert number 7" in buffer.getvalue(), 15, "new alert printed")
    finally:
        stop.set()
    assert await task == EXIT_OK
    assert "INFO" in buffer.getvalue()


def test_alerts_command_says_when_nats_is_unreachable() -> None:
    out, buffer = _console()
    code = follow_alerts(f"nats://127.0.0.1:{free_port()}", False, None, out, connect_timeout_s=1.0)
    assert code == EXIT_INFRA and "NATS unavailable" in buffer.getvalue()


def test_alerts_command_refuses_an_unknown_severity() -> None:
    out, buffer = _console()
    assert follow_alerts("nats://127.0.0.1:1", False, "fatal", out) == 2
    assert "unknown severity" in buffer.getvalue()
