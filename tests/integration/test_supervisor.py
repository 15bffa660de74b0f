"""The supervisor with real processes: ordering, health gates, restarts, breaker, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import psutil
import pytest

from common.stubs import supervisor_pb2
from tests.integration.mesh import Mesh, foreign
from tests.ports import free_port
from tests.wait import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def make_mesh(tmp_path: Path, system_nats_url: str, system_redis_url: str) -> Iterator[Any]:
    meshes: list[Mesh] = []

    def make(groups: dict[str, Any], **kwargs: Any) -> Mesh:
        root = tmp_path / f"mesh{len(meshes)}"
        root.mkdir()
        mesh = Mesh(root, system_nats_url, system_redis_url, groups=groups, **kwargs)
        meshes.append(mesh)
        return mesh

    yield make
    for mesh in meshes:
        mesh.kill()


def _group(agents: dict[str, Any], machine: str = "mainpc") -> dict[str, Any]:
    return {"machine": machine, "agents": agents}


def _alive(pids: set[int]) -> set[int]:
    return {p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"}


# -- configuration errors ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda c: c["agent_groups"]["core"]["agents"]["a"]["dependencies"].append("b"),
            "dependency cycle: a -> b -> a",
        ),
        (
            lambda c: c["agent_groups"]["core"]["agents"]["b"]["dependencies"].append("zz"),
            "agent_groups.core.agents.b.dependencies: unknown dependency 'zz'",
        ),
        (
            lambda c: c["agent_groups"]["core"]["agents"]["b"].update(
                health_check_port=c["agent_groups"]["core"]["agents"]["a"]["health_check_port"]
            ),
            "agent_groups.core.agents.b.health_check_port: duplicate port",
        ),
        (
            lambda c: c["agent_groups"]["core"]["agents"]["a"].update(healthcheck={}),
            "agent_groups.core.agents.a.healthcheck: unknown key",
        ),
    ],
    ids=["cycle", "unknown-dependency", "duplicate-port", "unknown-key"],
)
def test_invalid_config_exits_2_with_the_exact_message_and_starts_nothing(
    make_mesh: Any, mutate: Any, message: str
) -> None:
    mesh = make_mesh(
        {
            "core": _group(
                {
                    "a": foreign(free_port()),
                    "b": foreign(free_port(), deps=["a"]),
                }
            )
        }
    )
    mutate(mesh.config)
    mesh.write()
    proc = mesh.up()
    assert proc.wait(timeout=30) == 2
    assert message in mesh.output()
    assert mesh.records() == []


def test_check_config_reports_every_broken_agent(make_mesh: Any, tmp_path: Path) -> None:
    pkg = tmp_path / "mesh0" / "brokenpkg"
    mesh = make_mesh(
        {
            "core": _group(
                {
                    "good": foreign(free_port()),
                    "syntax": {
                        "module": "brokenpkg.bad",
                        "health_check_port": free_port(),
                        "metrics_port": 0,
                    },
                    "missing": {
                        "module": "no_such_module_xyz",
                        "health_check_port": free_port(),
                        "metrics_port": 0,
                    },
                    "nocmd": {
                        "command": ["/nonexistent/agent"],
                        "health_check_port": free_port(),
                        "metrics_port": 0,
                    },
                }
            )
        }
    )
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "bad.py").write_text("def broken(:\n    pass\n")
    result = mesh.cli("check-config")
    assert result.returncode == 2, result.stdout + result.stderr
    err = result.stderr
    assert "3 problem(s)" in err
    assert "agent_groups.core.agents.syntax.module:" in err and "invalid syntax" in err
    assert "agent_groups.core.agents.missing.module: module 'no_such_module_xyz' not found" in err
    assert (
        "agent_groups.core.agents.nocmd.command: command '/nonexistent/agent' does not exist" in err
    )


# -- startup ordering --------------------------------------------------------------------


def test_diamond_starts_in_dependency_order_with_siblings_in_parallel(make_mesh: Any) -> None:
    mesh = make_mesh(
        {
            "core": _group(
                {
                    "top": foreign(free_port()),
                    "left": foreign(free_port(), deps=["top"], delay_s=0.4),
                    "right": foreign(free_port(), deps=["top"], delay_s=0.4),
                    "bottom": foreign(free_port(), deps=["left", "right"]),
                }
            )
        }
    )
    mesh.up()
    mesh.wait_states({n: "HEALTHY" for n in ("top", "left", "right", "bottom")})
    first = mesh.first
    assert first("ready", "top") < first("start", "left")
    assert first("ready", "top") < first("start", "right")
    # Siblings overlap: each started before the other became ready.
    assert first("start", "left") < first("ready", "right")
    assert first("start", "right") < first("ready", "left")
    assert max(first("ready", "left"), first("ready", "right")) < first("start", "bottom")
    assert mesh.stop() == 0
    out = mesh.output()
    assert "to all ready" in out  # the startup report


# -- restarts, backoff, breaker ----------------------------------------------------------


def test_sigkilled_agent_is_restarted_and_healthy_again(make_mesh: Any) -> None:
    mesh = make_mesh({"core": _group({"a": foreign(free_port())})})
    mesh.up()
    mesh.wait_states({"a": "HEALTHY"})
    before = mesh.agent("a")
    assert before is not None and before.pid > 0
    killed_at = time.monotonic()
    psutil.Process(before.pid).kill()
    wait_until(
        lambda: (s := mesh.agent("a")) and s.pid not in (0, before.pid) and s.state == 3,
        10,
        "a new healthy process",
    )  # 3: AGENT_STATE_HEALTHY
    after = mesh.agent("a")
    assert after is not None and after.restarts == 1
    assert time.monotonic() - killed_at < 10
    assert mesh.stop() == 0


def test_crash_loop_backs_off_then_opens_breaker_and_reports_it(
    make_mesh: Any, system_nats_url: str
) -> None:
    mesh = make_mesh(
        {
            "core": _group(
                {
                    "steady": foreign(free_port()),
                    "flaky": foreign(free_port(), mode="exit_now", required=False),
                }
            )
        },
        settings={
            "health_check": {
                "interval_s": 0.1,
                "timeout_s": 0.5,
                "retries": 3,
                "start_period_s": 5,
            },
            "restart": {"policy": "always", "backoff_initial_s": 0.2, "backoff_max_s": 5},
            "circuit_breaker": {"failure_threshold": 4, "window_s": 60, "reset_timeout_s": 3},
            "stop_grace_s": 2,
        },
    )
    seen: list[dict[str, Any]] = []

    async def collect() -> None:
        nc = await nats.connect(system_nats_url)
        breaker_seen = asyncio.Event()

        async def on_msg(msg: Any) -> None:
            event = {"subject": msg.subject, **json.loads(msg.data)}
            seen.append(event)
            if (
                event.get("error_type") == "CircuitBreakerOpen"
                and event["details"]["agent"] == "flaky"
            ):
                breaker_seen.set()

        await nc.subscribe("errors.mainpc.critical.supervisor", cb=on_msg)
        await nc.subscribe("events.agent.flaky.*", cb=on_msg)
        mesh.up()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(breaker_seen.wait(), timeout=40)
        await nc.drain()

    asyncio.run(collect())
    breaker_events = [e for e in seen if e.get("error_type") == "CircuitBreakerOpen"]
    assert breaker_events, f"no breaker error seen; got {seen!r}\n{mesh.output()}"
    status = mesh.agent("flaky")
    assert status is not None
    assert status.state == 7 and status.breaker_state == 2, status  # FAILED, OPEN
    assert "circuit breaker open" in status.message
    assert mesh.count("start", "flaky") == 4  # threshold reached: no fifth start while open
    # The backoffs the supervisor announced grow: restart k waits within
    # [0.5, 1] x 0.2 s x 2^(k-1) (half jitter), so the third exceeds the first.
    delays = [
        float(re.search(r"in ([0-9.]+)s", e["reason"]).group(1))  # type: ignore[union-attr]
        for e in seen
        if e["subject"] == "events.agent.flaky.backoff"
    ]
    assert len(delays) == 3, delays
    for k, delay in enumerate(delays, start=1):
        assert 0.1 * 2 ** (k - 1) <= delay <= 0.2 * 2 ** (k - 1), delays
    failed_events = [e for e in seen if e["subject"] == "events.agent.flaky.failed"]
    assert failed_events
    # After the reset timeout one trial start happens (half-open).
    wait_until(lambda: mesh.count("start", "flaky") >= 5, 15, "the half-open trial start")
    states = mesh.states()
    assert states["steady"] == "HEALTHY"
    assert mesh.stop() == 0


# -- health gates ------------------------------------------------------------------------


def test_required_agent_that_never_answers_fails_startup_with_exit_3(make_mesh: Any) -> None:
    mesh = make_mesh(
        {
            "core": _group(
                {
                    "base": foreign(free_port()),
                    "mute": foreign(free_port(), mode="silent", deps=["base"]),
                }
            )
        },
        settings={
            "health_check": {
                "interval_s": 0.1,
                "timeout_s": 0.2,
                "retries": 2,
                "start_period_s": 0.5,
            },
            "stop_grace_s": 1,
        },
    )
    proc = mesh.up()
    assert proc.wait(timeout=60) == 3
    out = mesh.output()
    assert "required agent mute did not become ready" in out
    assert "last lines of its log" in out
    assert not _alive(mesh.agent_pids())


def test_optional_agent_that_never_answers_is_failed_and_its_dependents_skipped(
    make_mesh: Any,
) -> None:
    mesh = make_mesh(
        {
            "core": _group(
                {
                    "base": foreign(free_port()),
                    "mute": foreign(free_port(), mode="silent", required=False),
                    "child": foreign(free_port(), deps=["mute"], required=False),
                }
            )
        },
        settings={
            "health_check": {
                "interval_s": 0.1,
                "timeout_s": 0.2,
                "retries": 2,
                "start_period_s": 0.5,
            },
            "restart": {"policy": "never"},
            "stop_grace_s": 1,
        },
    )
    mesh.up()
    mesh.wait_states({"base": "HEALTHY", "mute": "FAILED", "child": "SKIPPED"})
    reply = mesh.status()
    assert reply is not None and reply.mesh_state == 3  # MESH_STATE_DEGRADED
    assert mesh.count("start", "child") == 0
    assert mesh.stop() == 0


# -- stopping ----------------------------------------------------------------------------


def test_agent_ignoring_sigterm_is_sigkilled_after_grace(make_mesh: Any) -> None:
    mesh = make_mesh({"core": _group({"stubborn": foreign(free_port(), mode="ignore_sigterm")})})
    mesh.up()
    mesh.wait_states({"stubborn": "HEALTHY"})
    status = mesh.agent("stubborn")
    assert status is not None
    pid = status.pid
    started = time.monotonic()
    result = mesh.cli("stop", "stubborn")
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert "STOPPED" in result.stdout
    assert mesh.count("term", "stubborn") == 1  # it got SIGTERM first, and ignored it
    assert not _alive({pid})
    assert took >= 2  # stop_grace_s passed before SIGKILL
    assert mesh.states()["stubborn"] == "STOPPED"
    assert mesh.stop() == 0
    # Once stopped, nothing of its supervision went on (no late health check flipped it).
    assert mesh.state_history("stubborn")[-1] == "STOPPED"
    assert mesh.state_history("stubborn").count("STOPPED") == 1


def test_sigint_during_startup_tears_down_without_orphans(make_mesh: Any) -> None:
    mesh = make_mesh(
        {
            "core": _group(
                {
                    "a": foreign(free_port()),
                    "slow": foreign(free_port(), deps=["a"], delay_s=30),
                }
            )
        }
    )
    mesh.up()
    wait_until(lambda: mesh.count("start", "slow"), 20, "slow to start")
    pids = mesh.agent_pids()
    assert len(pids) == 2
    assert mesh.stop(signal.SIGINT) == 0
    wait_until(lambda: not _alive(pids), 10, "no agent left")


def test_sigkill_of_the_supervisor_leaves_no_agent_alive(make_mesh: Any) -> None:
    mesh = make_mesh(
        {
            "core": _group(
                {
                    "a": foreign(free_port()),
                    "stubborn": foreign(free_port(), mode="ignore_sigterm", deps=["a"]),
                }
            )
        }
    )
    proc = mesh.up()
    mesh.wait_states({"a": "HEALTHY", "stubborn": "HEALTHY"})
    pids = mesh.agent_pids()
    assert len(pids) == 2
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    wait_until(lambda: not _alive(pids), 5, "agents to die with their supervisor")


def test_shutdown_stops_agents_in_reverse_dependency_order(make_mesh: Any) -> None:
    mesh = make_mesh(
        {
            "core": _group(
                {
                    "db": foreign(free_port()),
                    "api": foreign(free_port(), deps=["db"]),
                    "web": foreign(free_port(), deps=["api"]),
                }
            )
        }
    )
    mesh.up()
    mesh.wait_states({"db": "HEALTHY", "api": "HEALTHY", "web": "HEALTHY"})
    result = mesh.cli("down")
    assert result.returncode == 0, result.stderr
    assert "stopping: web, api, db" in result.stdout
    assert mesh.proc is not None and mesh.proc.wait(timeout=30) == 0
    first = mesh.first
    assert first("term", "web") < first("term", "api") < first("term", "db")


# -- operator commands -------------------------------------------------------------------


def test_status_restart_and_logs_through_the_cli(make_mesh: Any) -> None:
    mesh = make_mesh({"core": _group({"a": foreign(free_port())})})
    mesh.up()
    mesh.wait_states({"a": "HEALTHY"})
    data = mesh.status_json()
    (agent,) = data["agents"]
    assert agent["agent"] == "a" and agent["state"] == "AGENT_STATE_HEALTHY"
    assert agent["breaker_state"] == "BREAKER_STATE_CLOSED"
    table = mesh.cli("status")
    assert table.returncode == 0 and "HEALTHY" in table.stdout
    old_pid = agent["pid"]
    assert mesh.cli("restart", "a").returncode == 0
    wait_until(
        lambda: (s := mesh.agent("a")) and s.pid not in (0, old_pid) and s.state == 3,
        10,
        "a restarted",
    )
    logs = mesh.cli("logs", "a")
    assert logs.returncode == 0 and "[supervisor" in logs.stdout and "starting:" in logs.stdout
    unknown = mesh.cli("restart", "nope")
    assert unknown.returncode == 1 and "unknown agent 'nope'" in unknown.stderr
    assert mesh.stop() == 0


def test_cli_without_a_running_supervisor_says_so(make_mesh: Any) -> None:
    mesh = make_mesh({"core": _group({"a": foreign(free_port())})})
    result = mesh.cli("status")
    assert result.returncode == 1
    assert "no supervisor is running" in result.stderr


def test_restart_dependents_restarts_them_after_the_dependency_is_back(make_mesh: Any) -> None:
    mesh = make_mesh(
        {
            "core": _group(
                {
                    "base": foreign(free_port(), restart_dependents=True),
                    "user": foreign(free_port(), deps=["base"]),
                }
            )
        }
    )
    mesh.up()
    mesh.wait_states({"base": "HEALTHY", "user": "HEALTHY"})
    base = mesh.agent("base")
    assert base is not None
    psutil.Process(base.pid).kill()
    wait_until(lambda: mesh.count("start", "user") >= 2, 15, "user restarted")
    mesh.wait_states({"base": "HEALTHY", "user": "HEALTHY"})
    assert (
        mesh.first("ready", "base")
        < [r.at for r in mesh.records() if r.event == "start" and r.agent == "user"][1]
    )
    assert mesh.stop() == 0


# -- groups across machines --------------------------------------------------------------


def test_group_waits_for_its_external_dependency(make_mesh: Any) -> None:
    """Two supervisors of one mesh (two machines on one host): pc2's agent waits for mainpc's."""
    groups = {
        "core": _group({"registry": foreign(free_port())}),
        "edge": _group({"router": foreign(free_port(), deps=["registry"])}, machine="pc2"),
    }
    edge = make_mesh(groups, machine="pc2")
    edge.up("--group", "edge")
    edge.wait_states({"registry": "EXTERNAL", "router": "PENDING"})
    assert edge.count("start", "router") == 0
    core = make_mesh(json.loads(json.dumps(groups)))
    core.record_file = edge.record_file
    for spec in core.config["agent_groups"]["core"]["agents"].values():
        spec["env"]["FOREIGN_RECORD"] = str(edge.record_file)
    core.write()
    core.up("--group", "core")
    edge.wait_states({"router": "HEALTHY"}, timeout_s=30)
    assert edge.first("ready", "registry") < edge.first("start", "router")
    assert edge.stop() == 0
    assert core.stop() == 0


def test_lost_external_dependency_opens_its_breaker_and_heals(
    make_mesh: Any, system_nats_url: str
) -> None:
    """The machine running `registry` goes away: pc2's supervisor trips, reports, and heals."""
    settings = {
        "health_check": {"interval_s": 0.2, "timeout_s": 0.3, "retries": 3, "start_period_s": 5},
        "restart": {"policy": "on-failure", "backoff_initial_s": 0.1, "backoff_max_s": 1.0},
        "circuit_breaker": {"failure_threshold": 3, "window_s": 30, "reset_timeout_s": 1},
        "stop_grace_s": 2,
    }
    groups = {
        "core": _group({"registry": foreign(free_port())}),
        "edge": _group({"router": foreign(free_port(), deps=["registry"])}, machine="pc2"),
    }
    core = make_mesh(json.loads(json.dumps(groups)), settings=settings)
    edge = make_mesh(groups, settings=settings, machine="pc2")
    seen: list[dict[str, Any]] = []

    async def scenario() -> None:
        nc = await nats.connect(system_nats_url)
        opened, closed = asyncio.Event(), asyncio.Event()

        async def on_msg(msg: Any) -> None:
            event = json.loads(msg.data)
            if event.get("details", {}).get("agent") != "registry":
                return
            seen.append(event)
            if event["error_type"] == "CircuitBreakerOpen":
                opened.set()
            elif event["error_type"] == "CircuitBreakerClosed":
                closed.set()

        await nc.subscribe("errors.pc2.*.supervisor", cb=on_msg)
        await nc.flush()
        core.up("--group", "core")
        edge.up("--group", "edge")
        await asyncio.to_thread(edge.wait_states, {"router": "HEALTHY"})
        core.kill()  # the whole machine: supervisor and its agents
        await asyncio.wait_for(opened.wait(), timeout=30)
        ext = await asyncio.to_thread(edge.agent, "registry")
        assert ext is not None and "circuit breaker open" in ext.message
        assert ext.breaker_state in (
            supervisor_pb2.BREAKER_STATE_OPEN,
            supervisor_pb2.BREAKER_STATE_HALF_OPEN,
        )
        # What runs on pc2 keeps running: the breaker guards the link, not the dependents.
        assert (await asyncio.to_thread(edge.states))["router"] == "HEALTHY"
        core.up("--group", "core")
        await asyncio.wait_for(closed.wait(), timeout=30)
        await nc.drain()

    try:
        asyncio.run(scenario())
    except TimeoutError:
        raise AssertionError(f"saw {seen!r}\n{edge.output()}") from None
    kinds = [(e["error_type"], e["severity"]) for e in seen]
    assert kinds == [("CircuitBreakerOpen", "critical"), ("CircuitBreakerClosed", "info")], kinds
    assert "registry on mainpc (127.0.0.1:" in seen[0]["message"]
    wait_until(
        lambda: edge.agent("registry").breaker_state == supervisor_pb2.BREAKER_STATE_CLOSED,
        15,
        "breaker closed in status",
    )
    assert edge.stop() == 0
    assert core.stop() == 0


def test_embedded_infra_on_other_ports_brings_up_an_agent(make_mesh: Any, tmp_path: Path) -> None:
    """No NATS or Redis where the config points: `embedded: auto` starts the bundled ones."""
    nats_port, redis_port = free_port(), free_port()
    mesh = make_mesh({"core": _group({"a": foreign(free_port())})}, embedded="auto")
    mesh.config["infra"] = {
        "nats_url": f"nats://127.0.0.1:{nats_port}",
        "redis_url": f"redis://127.0.0.1:{redis_port}/0",
        "embedded": "auto",
    }
    mesh.write()
    mesh.up()
    mesh.wait_states({"a": "HEALTHY"}, timeout_s=40)
    server_pids = {
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if any(
            str(nats_port) in part or str(redis_port) in part for part in (p.info["cmdline"] or [])
        )
    }
    assert server_pids, "embedded servers not found"
    assert mesh.stop() == 0
    wait_until(lambda: not _alive(server_pids), 10, "embedded servers stopped")


def test_infra_unreachable_and_not_embeddable_exits_4(make_mesh: Any) -> None:
    mesh = make_mesh({"core": _group({"a": foreign(free_port())})})
    mesh.config["infra"] = {
        "nats_url": f"nats://127.0.0.1:{free_port()}",
        "redis_url": f"redis://127.0.0.1:{free_port()}/0",
        "embedded": "never",
    }
    mesh.write()
    proc = mesh.up()
    assert proc.wait(timeout=60) == 4
    assert "infrastructure unavailable" in mesh.output()
    assert mesh.records() == []
