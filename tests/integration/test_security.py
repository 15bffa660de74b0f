"""The mesh token and TLS on a real agent process, and `graftmesh agent` / `graftmesh probe`."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.channels import open_channel, open_sync_channel
from common.errors import ConfigError
from common.health import HealthStatus, check_health
from common.security import Security
from common.stubs import compiler_pb2, compiler_pb2_grpc
from tests.integration.mesh import ROOT
from tests.integration.test_agent_runtime import AgentProc
from tests.ports import free_port
from tests.wait import wait_until

pytestmark = pytest.mark.integration

TOKEN = "mesh-token-7f3a"


def _list(channel: grpc.Channel) -> compiler_pb2.ListBlueprintsResponse:
    stub = compiler_pb2_grpc.CompilerServiceStub(channel)
    return stub.ListBlueprints(compiler_pb2.ListBlueprintsRequest(), timeout=5)


def _code(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


@pytest.fixture
def token_agent(tmp_path: Path, system_nats_url: str, system_redis_url: str) -> Any:
    agent = AgentProc(tmp_path, system_nats_url, system_redis_url, "tokened", GRAFTMESH_TOKEN=TOKEN)
    agent.wait_healthy()
    yield agent
    agent.stop()


def test_token_is_required_except_for_health_and_reflection(token_agent: AgentProc) -> None:
    target = f"127.0.0.1:{token_agent.port}"
    with grpc.insecure_channel(target) as bare:
        assert _code(lambda: _list(bare)) == grpc.StatusCode.UNAUTHENTICATED
        wrong = (("authorization", "Bearer not-the-token"),)
        stub = compiler_pb2_grpc.CompilerServiceStub(bare)
        assert (
            _code(
                lambda: stub.ListBlueprints(
                    compiler_pb2.ListBlueprintsRequest(), metadata=wrong, timeout=5
                )
            )
            == grpc.StatusCode.UNAUTHENTICATED
        )
        # A streaming method is refused the same way, before the servicer runs.
        stream = stub.GetKernel(compiler_pb2.GetKernelRequest(kernel_id="k"), timeout=5)
        assert _code(lambda: list(stream)) == grpc.StatusCode.UNAUTHENTICATED
        # Probes need no secret.
        health = health_pb2_grpc.HealthStub(bare).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING

    with open_sync_channel(target, Security(token=TOKEN)) as sync:
        _list(sync)
        stub = compiler_pb2_grpc.CompilerServiceStub(sync)
        # Past the token check, the servicer's own answer comes back.
        stream = stub.GetKernel(compiler_pb2.GetKernelRequest(kernel_id="k"), timeout=5)
        assert _code(lambda: list(stream)) == grpc.StatusCode.NOT_FOUND

    async def through_aio() -> None:
        async with open_channel(target, Security(token=TOKEN)) as channel:
            stub = compiler_pb2_grpc.CompilerServiceStub(channel)
            await stub.ListBlueprints(compiler_pb2.ListBlueprintsRequest(), timeout=5)
        async with open_channel(target, Security()) as channel:
            stub = compiler_pb2_grpc.CompilerServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ListBlueprints(compiler_pb2.ListBlueprintsRequest(), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED

    asyncio.run(through_aio())


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=graftmesh-test", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    return cert, key


def test_tls_with_token(tmp_path: Path, system_nats_url: str, system_redis_url: str) -> None:
    cert, key = _self_signed(tmp_path)
    agent = AgentProc(
        tmp_path,
        system_nats_url,
        system_redis_url,
        "tls-agent",
        GRAFTMESH_TOKEN=TOKEN,
        GRAFTMESH_TLS_CERT=str(cert),
        GRAFTMESH_TLS_KEY=str(key),
    )
    try:
        agent.wait_healthy()
        target = f"127.0.0.1:{agent.port}"
        settings = Security.from_environ({"GRAFTMESH_TOKEN": TOKEN, "GRAFTMESH_TLS_CA": str(cert)})
        with open_sync_channel(target, settings) as secure:
            _list(secure)
        # Plain text to a TLS port never gets an answer.
        with grpc.insecure_channel(target) as bare:
            assert _code(lambda: _list(bare)) == grpc.StatusCode.UNAVAILABLE
    finally:
        assert agent.stop() == 0


def test_unusable_security_settings_stop_the_agent_with_exit_2(
    tmp_path: Path, system_nats_url: str, system_redis_url: str
) -> None:
    agent = AgentProc(
        tmp_path,
        system_nats_url,
        system_redis_url,
        "bad-tls",
        GRAFTMESH_TLS_CERT=str(tmp_path / "missing.pem"),
    )
    assert agent.proc.wait(timeout=60) == 2
    log = agent.log.read_text()
    assert "GRAFTMESH_TLS_CERT: cannot read" in log
    assert "GRAFTMESH_TLS_CERT and GRAFTMESH_TLS_KEY go together" in log


def test_security_settings_from_the_environment(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    settings = Security.from_environ({"GRAFTMESH_TOKEN_FILE": str(token_file)})
    assert settings.token == TOKEN
    assert TOKEN not in repr(settings) and "token=set" in repr(settings)
    assert settings.call_metadata() == (("authorization", f"Bearer {TOKEN}"),)
    assert Security.from_environ({}) == Security()
    assert Security().call_metadata() == () and Security().server_interceptors() == []

    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError) as info:
        Security.from_environ(
            {
                "GRAFTMESH_TOKEN_FILE": str(empty),
                "GRAFTMESH_TLS_KEY": str(token_file),
                "GRAFTMESH_TLS_CA": str(tmp_path / "nope.pem"),
            }
        )
    assert info.value.problems == [
        "GRAFTMESH_TOKEN_FILE: the token file is empty",
        f"GRAFTMESH_TLS_CA: cannot read {tmp_path / 'nope.pem'} (No such file or directory)",
        "GRAFTMESH_TLS_CERT and GRAFTMESH_TLS_KEY go together: give both or neither",
    ]
    with pytest.raises(ConfigError, match="must not contain spaces"):
        Security.from_environ({"GRAFTMESH_TOKEN": "two words\n"})


def _sample_config(tmp_path: Path, nats_url: str, redis_url: str) -> tuple[Path, int, int]:
    port, health_port = free_port(), free_port()
    config = {
        "version": 1,
        "machine": "mainpc",
        "infra": {"nats_url": nats_url, "redis_url": redis_url, "embedded": "never"},
        "supervisor": {"control_port": free_port(), "run_dir": "run"},
        "machines": {"mainpc": {"host": "localhost"}},
        "agent_groups": {
            "core": {
                "machine": "mainpc",
                "agents": {
                    "sample": {
                        "module": "tests.agents.sample_agent",
                        "port": port,
                        "health_check_port": health_port,
                        "metrics_port": 0,
                    }
                },
            }
        },
    }
    path = tmp_path / "startup_config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, port, health_port


def _graftmesh(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.supervisor", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_agent_verb_runs_one_agent_without_a_supervisor_and_probe_checks_it(
    tmp_path: Path, system_nats_url: str, system_redis_url: str
) -> None:
    config, port, health_port = _sample_config(tmp_path, system_nats_url, system_redis_url)
    # The infra URLs come from the environment, as credentials would.
    env = {**os.environ, "GRAFTMESH_NATS_URL": system_nats_url}
    env.pop("GRAFTMESH_CONFIG", None)
    log = tmp_path / "agent.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "services.supervisor", "agent", "sample",
                "--config", str(config), "--bind", "0.0.0.0",
            ],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:

        def healthy() -> bool:
            result = asyncio.run(check_health("127.0.0.1", health_port, 0.5))
            return result.status is HealthStatus.HEALTHY

        wait_until(healthy, 60, "the agent started by `graftmesh agent` answers healthy")
        # It listens on every interface (127.0.0.2 reaches only a wildcard bind), and
        # advertises the configured host.
        assert asyncio.run(check_health("127.0.0.2", health_port, 2.0)).is_up
        with grpc.insecure_channel(f"127.0.0.2:{port}") as channel:
            _list(channel)
        key = redis.Redis.from_url(system_redis_url).get("graftmesh:ready:sample")
        assert key is not None
        ready = json.loads(key)
        assert ready["host"] == "localhost" and ready["pid"] == proc.pid
        assert "GRAFTMESH_SUPERVISOR_PID" not in Path(f"/proc/{proc.pid}/environ").read_text()

        probe = _graftmesh("probe", "--config", str(config))
        assert probe.returncode == 0, probe.stdout + probe.stderr
        assert probe.stdout.startswith("sample: healthy ")
        by_group = _graftmesh("probe", "--group", "core", "--config", str(config))
        assert by_group.returncode == 0
        # As a pod's probe does: the agent next to it, whatever its advertised host.
        here = _graftmesh("probe", "sample", "--host", "127.0.0.2", "--config", str(config))
        assert here.returncode == 0, here.stdout + here.stderr
        unknown = _graftmesh("probe", "nobody", "--config", str(config))
        assert unknown.returncode == 2 and "unknown: nobody" in unknown.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()
    down = _graftmesh("probe", "sample", "--config", str(config), "--timeout", "0.5")
    assert down.returncode == 1 and down.stdout.startswith("sample: unreachable")


def test_agent_verb_refuses_unknown_agents(tmp_path: Path) -> None:
    config, _, _ = _sample_config(tmp_path, "nats://127.0.0.1:4222", "redis://127.0.0.1:6379/0")
    result = _graftmesh("agent", "ghost", "--config", str(config))
    assert result.returncode == 2 and "unknown agent 'ghost'; known: sample" in result.stderr
