"""A mesh under test: a config of real agents on free ports, and the real `graftmesh` CLI.

Agents record what happens to them in a file (see tests/agents/foreign_agent.py);
tests wait on conditions with deadlines that report what they last saw.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psutil
import yaml

from common.stubs import supervisor_pb2, supervisor_pb2_grpc
from tests.ports import free_port
from tests.wait import wait_until

ROOT = Path(__file__).resolve().parents[2]
FOREIGN = str(ROOT / "tests" / "agents" / "foreign_agent.py")


@dataclass
class Record:
    event: str
    agent: str
    at: float


def foreign(
    port: int, *, deps: list[str] | None = None, mode: str = "ok", delay_s: float = 0, **extra: Any
) -> dict[str, Any]:
    """The config entry of a foreign (command:) agent."""
    spec: dict[str, Any] = {
        "command": [sys.executable, FOREIGN],
        "health_check_port": port,
        "metrics_port": 0,
        "dependencies": deps or [],
        "env": {"FOREIGN_MODE": mode, "FOREIGN_DELAY_S": str(delay_s)},
    }
    spec.update(extra)
    return spec


class Mesh:
    """One config, one `graftmesh up` process, and ways to look at both."""

    def __init__(
        self,
        root: Path,
        nats_url: str,
        redis_url: str,
        *,
        groups: dict[str, dict[str, Any]],
        settings: dict[str, Any] | None = None,
        embedded: str = "never",
        machine: str = "mainpc",
    ) -> None:
        self.root = root
        self.record_file = root / "records.txt"
        self.control_port = free_port()
        for group in groups.values():
            for spec in group["agents"].values():
                spec.setdefault("env", {})["FOREIGN_RECORD"] = str(self.record_file)
        self.config: dict[str, Any] = {
            "version": 1,
            "machine": machine,
            "infra": {"nats_url": nats_url, "redis_url": redis_url, "embedded": embedded},
            "supervisor": {"control_port": self.control_port, "run_dir": "run"},
            "settings": settings
            or {
                "health_check": {
                    "interval_s": 0.2,
                    "timeout_s": 0.5,
                    "retries": 3,
                    "start_period_s": 5,
                },
                "restart": {"policy": "on-failure", "backoff_initial_s": 0.1, "backoff_max_s": 1.0},
                "circuit_breaker": {"failure_threshold": 5, "window_s": 60, "reset_timeout_s": 60},
                "stop_grace_s": 2,
            },
            "machines": {"mainpc": {"host": "127.0.0.1"}, "pc2": {"host": "127.0.0.1"}},
            "agent_groups": groups,
        }
        self.config_path = root / "startup_config.yaml"
        self.write()
        self.proc: subprocess.Popen[bytes] | None = None
        self.out = root / "up.out"

    def write(self) -> None:
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))

    def cli(self, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "services.supervisor", *args, "--config", str(self.config_path)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )

    def up(self, *args: str) -> subprocess.Popen[bytes]:
        with self.out.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "services.supervisor",
                    "up",
                    "--config",
                    str(self.config_path),
                    *args,
                ],
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self.proc

    def output(self) -> str:
        return self.out.read_text(errors="replace") if self.out.exists() else ""

    def status(self) -> supervisor_pb2.GetStatusResponse | None:
        """The control API's status, or None while the supervisor does not answer."""
        with grpc.insecure_channel(f"127.0.0.1:{self.control_port}") as channel:
            stub = supervisor_pb2_grpc.SupervisorServiceStub(channel)
            try:
                reply: supervisor_pb2.GetStatusResponse = stub.GetStatus(
                    supervisor_pb2.GetStatusRequest(), timeout=2
                )
            except grpc.RpcError:
                return None
            return reply

    def states(self) -> dict[str, str]:
        reply = self.status()
        if reply is None:
            return {}
        return {
            a.agent: supervisor_pb2.AgentState.Name(a.state).removeprefix("AGENT_STATE_")
            for a in reply.agents
        }

    def agent(self, name: str) -> supervisor_pb2.AgentStatus | None:
        reply = self.status()
        if reply is None:
            return None
        return next((a for a in reply.agents if a.agent == name), None)

    def wait_states(self, expected: dict[str, str], timeout_s: float = 30) -> dict[str, str]:
        def check() -> dict[str, str] | None:
            states = self.states()
            ok = all(states.get(k) == v for k, v in expected.items())
            return states if ok else None

        try:
            return wait_until(check, timeout_s, f"states {expected}")
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}\nstates: {self.states()}\nup output:\n{self.output()}"
            ) from None

    def records(self) -> list[Record]:
        if not self.record_file.exists():
            return []
        out = []
        for line in self.record_file.read_text().splitlines():
            event, agent, at = line.split()
            out.append(Record(event, agent, float(at)))
        return out

    def first(self, event: str, agent: str) -> float:
        return next(r.at for r in self.records() if r.event == event and r.agent == agent)

    def count(self, event: str, agent: str) -> int:
        return sum(1 for r in self.records() if r.event == event and r.agent == agent)

    def stop(self, sig: int = signal.SIGINT, timeout_s: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"supervisor did not exit in {timeout_s}s:\n{self.output()}"
            ) from None

    def kill(self) -> None:
        """Last-resort cleanup: SIGKILL the supervisor's session and every agent it recorded."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        for pid in self.agent_pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)

    def agent_pids(self) -> set[int]:
        """Every process whose command line runs our foreign agent with this mesh's records."""
        pids = set()
        for proc in psutil.process_iter(["pid", "cmdline", "environ"]):
            try:
                env = proc.info.get("environ") or {}
                if env.get("FOREIGN_RECORD") == str(self.record_file):
                    pids.add(proc.info["pid"])
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return pids

    def state_history(self, agent: str) -> list[str]:
        """Every state the supervisor logged for `agent`, in order (from its JSON log)."""
        log = self.root / "run" / "logs" / "supervisor.log"
        states = []
        for line in log.read_text().splitlines():
            entry = json.loads(line)
            if entry.get("event") == "agent state" and entry.get("agent") == agent:
                states.append(entry["state"])
        return states

    def status_json(self) -> dict[str, Any]:
        result = self.cli("status", "--json")
        assert result.returncode == 0, result.stderr
        parsed: dict[str, Any] = json.loads(result.stdout)
        return parsed
