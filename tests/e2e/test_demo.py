"""`graftmesh demo` end to end: the real CLI, the whole default mesh, a small job."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
DEMO_TIMEOUT_S = 280


def _agent(module: str, *, grpc: bool = True, **extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"module": module, "health_check_port": free_port(), **extra}
    if grpc:
        spec["port"] = free_port()
    return spec


def demo_config(root: Path, nats_url: str, redis_url: str, durable: str) -> Path:
    """startup_config.yaml's mesh (same agents and groups) on free ports and the system servers."""
    config = {
        "version": 1,
        "machine": "mainpc",
        "infra": {"nats_url": nats_url, "redis_url": redis_url, "embedded": "never"},
        "supervisor": {"control_port": free_port(), "run_dir": "run"},
        "settings": {
            "health_check": {"interval_s": 1, "timeout_s": 1, "retries": 3, "start_period_s": 60},
            "restart": {"policy": "on-failure", "backoff_initial_s": 0.2, "backoff_max_s": 5},
            "circuit_breaker": {"failure_threshold": 5, "window_s": 60, "reset_timeout_s": 60},
            "stop_grace_s": 10,
        },
        "machines": {"mainpc": {"host": "127.0.0.1"}},
        "agent_groups": {
            "training": {
                "machine": "mainpc",
                "agents": {"trainer": _agent("services.trainer", dependencies=["registry"])},
            },
            "serving": {
                "machine": "mainpc",
                "agents": {
                    "registry": _agent("services.registry"),
                    "router": _agent("services.router", dependencies=["registry"]),
                },
            },
            "ops": {
                "machine": "mainpc",
                "agents": {
                    # A durable of its own: other meshes on the system NATS keep theirs.
                    "alerts": _agent(
                        "services.alerts", grpc=False, env={"GRAFTMESH_ALERTS_DURABLE": durable}
                    )
                },
            },
            "growth": {
                "machine": "mainpc",
                "agents": {
                    "compiler": _agent("services.compiler"),
                    "seed_selector": _agent("services.seed_selector"),
                },
            },
        },
    }
    path = root / "startup_config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.mark.slow
@pytest.mark.timeout(DEMO_TIMEOUT_S + 30)
def test_demo_trains_promotes_serves_survives_a_kill_and_summarises(
    tmp_path: Path, system_nats_url: str, system_redis_url: str, unique_name: str
) -> None:
    config = demo_config(tmp_path, system_nats_url, system_redis_url, unique_name)
    env = {**os.environ, "GRAFTMESH_DEMO_MAX_STEPS": "120", "GRAFTMESH_DEMO_REQUESTS": "50"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.supervisor", "demo", "--config", str(config)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=DEMO_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # The supervisor stops its agents on SIGTERM; its group is only ours.
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            output, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
        pytest.fail(f"demo did not finish within {DEMO_TIMEOUT_S}s:\n{output[-6000:]}")

    assert proc.returncode == 0, output[-6000:]
    assert "demo complete" in output, output[-6000:]
    assert re.search(r"accuracy\s+[01]\.\d{3} \(\w*accuracy\)", output), output[-3000:]
    assert re.search(r"registered\s+spirals-demo v[1-9]\d*", output), output[-3000:]
    assert re.search(r"router latency\s+p50 \d+\.\d+ ms, p99 \d+\.\d+ ms", output), output[-3000:]
    assert re.search(r"alert (agent_restarted|agent_down) .* for seed_selector", output), output
    assert re.search(r"alerts\s+[1-9]\d* seen", output), output[-3000:]
