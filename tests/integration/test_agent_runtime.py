"""`common.agent` with a real agent process: health, gRPC, ready key, errors, draining."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import nats
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from common.health import HealthStatus, check_health
from common.stubs import compiler_pb2, compiler_pb2_grpc
from tests.integration.mesh import ROOT
from tests.ports import free_port
from tests.wait import wait_until

pytestmark = pytest.mark.integration


class AgentProc:
    def __init__(
        self, tmp_path: Path, nats_url: str, redis_url: str, name: str, **env: str
    ) -> None:
        self.name = name
        self.port = free_port()
        self.health_port = free_port()
        self.redis_url = redis_url
        self.log = tmp_path / f"{name}.log"
        full_env = {
            **os.environ,
            "GRAFTMESH_AGENT": name,
            "GRAFTMESH_GROUP": "core",
            "GRAFTMESH_MACHINE": "mainpc",
            "GRAFTMESH_HOST": "127.0.0.1",
            "GRAFTMESH_PORT": str(self.port),
            "GRAFTMESH_HEALTH_PORT": str(self.health_port),
            "GRAFTMESH_METRICS_PORT": str(free_port()),
            "GRAFTMESH_NATS_URL": nats_url,
            "GRAFTMESH_REDIS_URL": redis_url,
            "GRAFTMESH_RUN_DIR": str(tmp_path),
            **env,
        }
        full_env.pop("GRAFTMESH_CONFIG", None)
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.agents.sample_agent"],
                cwd=ROOT,
                env=full_env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.metrics_port = int(full_env["GRAFTMESH_METRICS_PORT"])

    def health(self) -> Any:
        return asyncio.run(check_health("127.0.0.1", self.health_port, 0.5))

    def wait_healthy(self) -> None:
        try:
            wait_until(lambda: self.health().status is HealthStatus.HEALTHY, 30, "agent healthy")
        except AssertionError:
            raise AssertionError(self.log.read_text()) from None

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(f"127.0.0.1:{self.port}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


@pytest.fixture
def agent_factory(
    tmp_path: Path, system_nats_url: str, system_redis_url: str, unique_name: str
) -> Iterator[Any]:
    procs: list[AgentProc] = []

    def make(**env: str) -> AgentProc:
        proc = AgentProc(
            tmp_path, system_nats_url, system_redis_url, f"{unique_name}{len(procs)}", **env
        )
        procs.append(proc)
        return proc

    yield make
    for p in procs:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait()


def test_agent_serves_health_grpc_health_reflection_and_ready_key(agent_factory: Any) -> None:
    agent = agent_factory()
    agent.wait_healthy()
    reply = agent.health().reply
    assert reply["service"] == agent.name and reply["details"]["sample"] is True
    with agent.channel() as ch:
        health = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="graftmesh.v1.CompilerService"), timeout=5
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        responses = list(
            refl.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
            )
        )
        names = {s.name for s in responses[0].list_services_response.service}
        assert "graftmesh.v1.CompilerService" in names and "grpc.health.v1.Health" in names
    key = redis.Redis.from_url(agent.redis_url).get(f"graftmesh:ready:{agent.name}")
    assert key is not None
    payload = json.loads(key)
    assert payload["status"] == "ready" and payload["port"] == agent.port
    assert payload["health_check_port"] == agent.health_port and payload["pid"] == agent.proc.pid
    assert agent.stop() == 0
    assert redis.Redis.from_url(agent.redis_url).get(f"graftmesh:ready:{agent.name}") is None


def test_errors_map_to_status_codes_and_bugs_reach_the_error_bus(
    agent_factory: Any, system_nats_url: str
) -> None:
    agent = agent_factory()
    agent.wait_healthy()
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    traceparent = f"00-{trace_id}-00f067aa0ba902b7-01"
    with agent.channel() as ch:
        stub = compiler_pb2_grpc.CompilerServiceStub(ch)
        with pytest.raises(grpc.RpcError) as not_found:
            list(stub.GetKernel(compiler_pb2.GetKernelRequest(kernel_id="abc"), timeout=5))
        assert not_found.value.code() == grpc.StatusCode.NOT_FOUND
        assert "no kernel 'abc'" in not_found.value.details()
        with pytest.raises(grpc.RpcError) as internal:
            stub.ListKernels(
                compiler_pb2.ListKernelsRequest(),
                timeout=5,
                metadata=[("traceparent", traceparent)],
            )
        assert internal.value.code() == grpc.StatusCode.INTERNAL
        assert "sample bug" not in internal.value.details()  # no internals leak to callers

    async def read_error() -> dict[str, Any]:
        nc = await nats.connect(system_nats_url)
        js = nc.jetstream()
        sub = await js.subscribe(f"errors.mainpc.error.{agent.name}", ordered_consumer=True)
        msg = await sub.next_msg(timeout=10)
        await nc.close()
        event: dict[str, Any] = json.loads(msg.data)
        return event

    event = asyncio.run(read_error())
    assert event["agent"] == agent.name and event["error_type"] == "RuntimeError"
    assert "ListKernels" in event["message"] and "sample bug" in event["stack_trace"]
    # The caller's trace continues in the server, and the error event carries it.
    assert event["trace_id"] == trace_id
    assert agent.stop() == 0


def test_sigterm_drains_in_flight_calls_then_exits_0(agent_factory: Any) -> None:
    agent = agent_factory()
    agent.wait_healthy()
    with agent.channel() as ch:
        stub = compiler_pb2_grpc.CompilerServiceStub(ch)
        call = stub.ListBlueprints.future(
            compiler_pb2.ListBlueprintsRequest(slot_kind=2), timeout=10
        )  # takes 1 s
        time.sleep(0.2)  # let the call reach the server before SIGTERM
        agent.proc.send_signal(signal.SIGTERM)
        assert call.result() == compiler_pb2.ListBlueprintsResponse()
    assert agent.proc.wait(timeout=30) == 0


def test_failure_at_start_is_reported_as_critical_and_exits_1(
    agent_factory: Any, system_nats_url: str
) -> None:
    async def run() -> tuple[int, dict[str, Any]]:
        nc = await nats.connect(system_nats_url)
        agent = agent_factory(SAMPLE_FAIL_AT_START="1")
        js = nc.jetstream()
        sub = await js.subscribe(f"errors.mainpc.critical.{agent.name}", ordered_consumer=True)
        msg = await sub.next_msg(timeout=20)
        await nc.close()
        code = await asyncio.to_thread(agent.proc.wait, 30)
        return code, json.loads(msg.data)

    code, event = asyncio.run(run())
    assert code == 1
    assert "sample start failure" in event["message"]


def test_agent_keeps_serving_while_redis_is_down(
    tmp_path: Path, system_nats_url: str, unique_name: str
) -> None:
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    agent = AgentProc(tmp_path, system_nats_url, dead_redis, unique_name)
    try:
        agent.wait_healthy()
        with agent.channel() as ch:
            stub = compiler_pb2_grpc.CompilerServiceStub(ch)
            assert stub.ListBlueprints(compiler_pb2.ListBlueprintsRequest(), timeout=5) == (
                compiler_pb2.ListBlueprintsResponse()
            )
        assert agent.stop() == 0
    finally:
        if agent.proc.poll() is None:
            agent.proc.kill()


def test_agent_exposes_prometheus_metrics(agent_factory: Any) -> None:
    import urllib.request

    agent = agent_factory()
    agent.wait_healthy()
    with agent.channel() as ch:
        stub = compiler_pb2_grpc.CompilerServiceStub(ch)
        stub.ListBlueprints(compiler_pb2.ListBlueprintsRequest(), timeout=5)
        with pytest.raises(grpc.RpcError):  # a bug: INTERNAL, reported to the error bus
            stub.ListKernels(compiler_pb2.ListKernelsRequest(), timeout=5)

    def scrape() -> str | None:
        url = f"http://127.0.0.1:{agent.metrics_port}/metrics"
        body: str = urllib.request.urlopen(url, timeout=5).read().decode()
        return body if "graftmesh_errors_reported_total{" in body else None

    body = wait_until(scrape, 10, "rpc and error bus metrics")
    lines = body.splitlines()

    def series(name: str, *labels: str) -> list[str]:
        return [x for x in lines if x.startswith(name + "{") and all(lb in x for lb in labels)]

    assert series("graftmesh_rpc_server_calls_total", "ListBlueprints", 'code="OK"')
    assert series("graftmesh_rpc_server_calls_total", "ListKernels", 'code="INTERNAL"')
    assert series("graftmesh_errors_reported_total", 'severity="error"')
    # Seconds-sized buckets: a fast call lands in the first ones, not all in one.
    assert "graftmesh_rpc_server_duration_seconds_bucket{" in body and 'le="0.0005"' in body
    assert agent.stop() == 0


def test_missing_environment_exits_2() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRAFTMESH_")}
    result = subprocess.run(
        [sys.executable, "-m", "tests.agents.sample_agent"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "GRAFTMESH_AGENT is not set" in result.stderr
