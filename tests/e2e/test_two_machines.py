"""Two machines for real: network namespaces `mainpc` and `pc2` joined by a veth pair.

Each "machine" runs `graftmesh up --group ...` for its own groups, with its own
copy of the config and run dir; NATS (JetStream) and Redis run on mainpc's
address with credentials; every gRPC call carries the mesh token. Host names
`mainpc` and `pc2` resolve through each namespace's own hosts file. The test
creates the namespaces, the link and the hosts files, and removes them; it is
skipped, saying why, where namespaces cannot be created (not root, no `ip`).

The story: mainpc's trainer waits for the registry on pc2 (EXTERNAL); a job
submitted on mainpc is registered on pc2 and served by pc2's router; cutting
the link opens mainpc's breaker on the registry and raises alerts, pc2 keeps
serving and restarts a router killed while it is cut off; restoring the link
closes the breaker, delivers what pc2 reported while cut off, and registers the
job that mainpc trained meanwhile.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.infra import (
    nats_auth_config,
    nats_command,
    nats_server_binary,
    redis_auth_config,
    redis_command,
    redis_server_binary,
)
from tests.wait import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(420)]

ROOT = Path(__file__).resolve().parents[2]
SUBNET = "10.213.{}.{}"
TOKEN = "two-machines-token"
NATS_USER, NATS_PASSWORD = "graftmesh", "nats-secret"
REDIS_PASSWORD = "redis-secret"
MODEL = "two-machines"

AGENTS = {
    "mainpc": {
        "training": {
            "trainer": {"module": "services.trainer", "port": 50063, "health_check_port": 50163,
                        "dependencies": ["registry"]},
        },
        "growth": {
            "compiler": {"module": "services.compiler", "port": 50061, "health_check_port": 50161},
            "seed_selector": {"module": "services.seed_selector", "port": 50062,
                              "health_check_port": 50162},
        },
        "ops": {"alerts": {"module": "services.alerts", "health_check_port": 50170}},
    },
    "pc2": {
        "serving": {
            "registry": {"module": "services.registry", "port": 50051, "health_check_port": 50151},
            "router": {"module": "services.router", "port": 50052, "health_check_port": 50152,
                       "dependencies": ["registry"]},
        },
    },
}  # fmt: skip

JOB = {
    "name": MODEL,
    "model": {"template": "mlp", "params": {"hidden": [8]}},
    "data": {
        "dataset": "two_spirals",
        "batch_size": 32,
        "params": {"samples": 200, "test_samples": 100},
    },
    "optimizer": {"name": "adamw", "lr": 0.01},
    "max_steps": 40,
    "eval_every_steps": 20,
    "seed": 3,
    "device": "cpu",
    "register_as": MODEL,
}


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


@dataclass
class Machine:
    name: str
    netns: str
    address: str
    veth: str
    home: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def config(self) -> Path:
        return self.home / "startup_config.yaml"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GRAFTMESH_")}
        return {
            **env,
            "GRAFTMESH_MACHINE": self.name,
            "GRAFTMESH_TOKEN": TOKEN,
            # Credentials live in the environment, never in the config file.
            "GRAFTMESH_NATS_URL": f"nats://{NATS_USER}:{NATS_PASSWORD}@mainpc:4222",
            "GRAFTMESH_REDIS_URL": f"redis://:{REDIS_PASSWORD}@mainpc:6379/0",
            "GRAFTMESH_LOG_LEVEL": "INFO",
        }

    def spawn(self, argv: list[str], log: str) -> subprocess.Popen[bytes]:
        with (self.home / log).open("ab") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, *argv],
                cwd=ROOT,
                env=self.env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def graftmesh(self, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.netns, sys.executable, "-m", "services.supervisor",
             *args, "--config", str(self.config)],
            cwd=ROOT, env=self.env(), capture_output=True, text=True, timeout=timeout_s,
            check=False,
        )  # fmt: skip

    def statuses(self) -> dict[str, dict[str, Any]]:
        result = self.graftmesh("status", "--json", timeout_s=30)
        if result.returncode != 0:
            return {}
        return {a["agent"]: a for a in json.loads(result.stdout).get("agents", [])}

    def states(self) -> dict[str, str]:
        return {
            name: a.get("state", "").removeprefix("AGENT_STATE_")
            for name, a in self.statuses().items()
        }

    def wait_states(self, expected: dict[str, str], timeout_s: float) -> None:
        def matches() -> dict[str, str] | None:
            states = self.states()
            return states if all(states.get(k) == v for k, v in expected.items()) else None

        try:
            wait_until(matches, timeout_s, f"{self.name}: {expected}", poll_s=0.5)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nlast: {self.states()}\n{self.log_tail()}") from None

    def log_tail(self, lines: int = 40) -> str:
        out = []
        for log in sorted(self.home.glob("*.out")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {self.name}/{log.name}\n" + "\n".join(text))
        return "\n".join(out)

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def _config(machine: str) -> dict[str, Any]:
    groups = {
        group: {"machine": host, "agents": agents}
        for host, by_group in AGENTS.items()
        for group, agents in by_group.items()
    }
    return {
        "version": 1,
        "machine": machine,
        # No credentials here: GRAFTMESH_NATS_URL / GRAFTMESH_REDIS_URL carry them.
        "infra": {
            "nats_url": "nats://mainpc:4222",
            "redis_url": "redis://mainpc:6379/0",
            "embedded": "never",
        },
        "supervisor": {"control_port": 5570, "run_dir": "run"},
        "settings": {
            "health_check": {"interval_s": 1, "timeout_s": 1, "retries": 3, "start_period_s": 90},
            "restart": {"policy": "on-failure", "backoff_initial_s": 0.2, "backoff_max_s": 5},
            "circuit_breaker": {"failure_threshold": 3, "window_s": 60, "reset_timeout_s": 2},
            "stop_grace_s": 10,
        },
        "machines": {"mainpc": {"host": "mainpc"}, "pc2": {"host": "pc2"}},
        "agent_groups": groups,
    }


def _can_make_namespaces() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    probe = f"gm-probe-{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


@pytest.fixture
def machines(tmp_path: Path) -> Iterator[tuple[Machine, Machine]]:
    if why := _can_make_namespaces():
        pytest.skip(why)
    tag = f"{os.getpid() % 100000}"
    octet = os.getpid() % 200 + 20
    main = Machine("mainpc", f"gm-main-{tag}", SUBNET.format(octet, 1), f"gmm{tag}",
                   tmp_path / "mainpc")  # fmt: skip
    pc2 = Machine("pc2", f"gm-pc2-{tag}", SUBNET.format(octet, 2), f"gmp{tag}", tmp_path / "pc2")
    hosts_dirs = [Path("/etc/netns") / m.netns for m in (main, pc2)]
    try:
        for m in (main, pc2):
            _ip("netns", "add", m.netns)
            _ip("-n", m.netns, "link", "set", "lo", "up")
        _ip("link", "add", main.veth, "type", "veth", "peer", "name", pc2.veth)
        for m in (main, pc2):
            _ip("link", "set", m.veth, "netns", m.netns)
            _ip("-n", m.netns, "addr", "add", f"{m.address}/24", "dev", m.veth)
            _ip("-n", m.netns, "link", "set", m.veth, "up")
            m.home.mkdir()
            m.config.write_text(yaml.safe_dump(_config(m.name), sort_keys=False))
        # `ip netns exec` shows /etc/netns/<ns>/hosts as the namespace's /etc/hosts.
        hosts = f"127.0.0.1 localhost\n{main.address} mainpc\n{pc2.address} pc2\n"
        for d in hosts_dirs:
            d.mkdir(parents=True, exist_ok=True)
            (d / "hosts").write_text(hosts)
        yield main, pc2
    finally:
        for m in (pc2, main):
            m.stop_all()
        for m in (main, pc2):
            _ip("netns", "del", m.netns, check=False)
        for d in hosts_dirs:
            shutil.rmtree(d, ignore_errors=True)


def _start_infra(main: Machine) -> None:
    data = main.home / "infra"
    (data / "nats").mkdir(parents=True)
    (data / "redis").mkdir(parents=True)
    nats_conf = data / "nats.conf"
    nats_conf.write_text(nats_auth_config(NATS_USER, NATS_PASSWORD))
    redis_conf = data / "redis.conf"
    redis_conf.write_text(redis_auth_config(None, REDIS_PASSWORD))
    main.spawn(
        nats_command(nats_server_binary(), "0.0.0.0", 4222, data / "nats", nats_conf), "nats.out"
    )
    main.spawn(
        redis_command(redis_server_binary(), "0.0.0.0", 6379, data / "redis", redis_conf),
        "redis.out",
    )
    for port in (4222, 6379):
        wait_until(lambda p=port: _answers(main, p), 20, f"infra port {port} on mainpc")


def _answers(machine: Machine, port: int) -> bool:
    probe = (
        "import socket,sys; s=socket.socket(); s.settimeout(1); "
        f"sys.exit(s.connect_ex(({machine.address!r}, {port})))"
    )
    result = subprocess.run(
        ["ip", "netns", "exec", machine.netns, sys.executable, "-c", probe],
        capture_output=True, timeout=15, check=False,
    )  # fmt: skip
    return result.returncode == 0


def _spec(main: Machine, tag: str) -> str:
    spec = main.home / f"job-{tag}.yaml"
    spec.write_text(yaml.safe_dump(JOB))
    return str(spec)


def _registered(output: str) -> int | None:
    found = re.search(rf"registered\s+{MODEL} v(\d+)", output)
    return int(found.group(1)) if found else None


def _train(main: Machine, tag: str) -> int:
    """Submit a job on mainpc and follow it to the end; the version pc2's registry gave it."""
    result = main.graftmesh("train", _spec(main, tag), timeout_s=240)
    assert result.returncode == 0, result.stdout + result.stderr + main.log_tail()
    version = _registered(result.stdout)
    assert version is not None, result.stdout
    return version


def _alerts(main: Machine) -> list[dict[str, Any]]:
    result = main.graftmesh("alerts", "--last", "500", "--json", timeout_s=30)
    assert result.returncode == 0, result.stdout + result.stderr
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def test_two_machines_wait_for_each_other_serve_fail_and_heal(
    machines: tuple[Machine, Machine],
) -> None:
    main, pc2 = machines
    _start_infra(main)

    # mainpc first: its trainer needs the registry, which pc2 has not started yet.
    main_up = main.spawn(
        [sys.executable, "-m", "services.supervisor", "up", "--config", str(main.config),
         "--group", "training", "--group", "growth", "--group", "ops"],
        "up.out",
    )  # fmt: skip
    main.wait_states(
        {"compiler": "HEALTHY", "seed_selector": "HEALTHY", "alerts": "HEALTHY",
         "registry": "EXTERNAL", "trainer": "PENDING"},
        timeout_s=120,
    )  # fmt: skip
    assert main.statuses()["trainer"].get("pid", 0) in (0, None)

    pc2_up = pc2.spawn(
        [sys.executable, "-m", "services.supervisor", "up", "--config", str(pc2.config),
         "--group", "serving"],
        "up.out",
    )  # fmt: skip
    pc2.wait_states({"registry": "HEALTHY", "router": "HEALTHY"}, timeout_s=120)
    main.wait_states({"trainer": "HEALTHY"}, timeout_s=120)

    # A job submitted on mainpc: registered on pc2, promoted, served by pc2's router.
    version = _train(main, "first")
    promoted = main.graftmesh("promote", MODEL, "--version", str(version))
    assert promoted.returncode == 0, promoted.stdout + promoted.stderr
    served = pc2.graftmesh("infer", MODEL, "[[0.1, -0.2]]")
    assert served.returncode == 0, served.stdout + served.stderr + pc2.log_tail()
    assert f"{MODEL} v{version}" in served.stdout

    # Cut the link.
    _ip("-n", main.netns, "link", "set", main.veth, "down")

    def breaker_open() -> bool:
        registry = main.statuses().get("registry", {})
        return registry.get("breaker_state") == "BREAKER_STATE_OPEN"

    wait_until(breaker_open, 60, "mainpc's breaker on the registry opens", poll_s=0.5)

    def alerted(kind: str, agent: str) -> list[dict[str, Any]]:
        return [a for a in _alerts(main) if a["kind"] == kind and a["agent"] == agent]

    wait_until(lambda: alerted("breaker_open", "registry"), 60, "a breaker_open alert")

    # A job submitted now trains on mainpc and then waits for the registry.
    submitted = main.graftmesh("train", _spec(main, "during-cut"), "--detach")
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job_id = re.search(r"submitted (\S+)", submitted.stdout)
    assert job_id, submitted.stdout

    # pc2 is cut off but keeps serving, and restarts what dies there meanwhile.
    still = pc2.graftmesh("infer", MODEL, "[[0.3, 0.1]]")
    assert still.returncode == 0, still.stdout + still.stderr
    router_pid = int(pc2.statuses()["router"]["pid"])
    os.kill(router_pid, signal.SIGKILL)
    wait_until(
        lambda: (
            (s := pc2.statuses().get("router", {})).get("state") == "AGENT_STATE_HEALTHY"
            and int(s.get("pid", 0)) not in (0, router_pid)
        ),
        90,
        "pc2 restarts its router while cut off",
        poll_s=0.5,
    )
    assert not alerted("agent_restarted", "router"), "pc2's events crossed a cut link"

    # Restore the link: the breaker closes and what pc2 said while cut off arrives.
    _ip("-n", main.netns, "link", "set", main.veth, "up")
    wait_until(
        lambda: main.statuses().get("registry", {}).get("breaker_state") == "BREAKER_STATE_CLOSED",
        60,
        "mainpc's breaker on the registry closes",
        poll_s=0.5,
    )
    wait_until(
        lambda: alerted("agent_restarted", "router"), 90, "the restart pc2 buffered is alerted"
    )

    # Nothing lost: the job trained during the cut is registered once the registry is back.
    def job_registered() -> int | None:
        shown = main.graftmesh("job", job_id.group(1), timeout_s=30)
        return _registered(shown.stdout) if "SUCCEEDED" in shown.stdout else None

    again = wait_until(job_registered, 120, "the job trained while cut off is registered")
    assert again == version + 1
    served = pc2.graftmesh("infer", MODEL, "[[0.1, -0.2]]", "--version", str(again))
    assert served.returncode == 0, served.stdout + served.stderr
    assert f"{MODEL} v{again}" in served.stdout

    for machine, supervisor in ((pc2, pc2_up), (main, main_up)):
        os.killpg(supervisor.pid, signal.SIGTERM)
        assert supervisor.wait(timeout=60) == 0, machine.log_tail()
