"""The console's JSON API and event streams against a real mesh started by `graftmesh up`.

One mesh per module (every agent of `startup_config.yaml` plus the console, on
free ports, the system NATS and Redis), with a token configured: every test
talks HTTP to the console, which talks gRPC and NATS to the real agents.
"""

from __future__ import annotations

import http.cookiejar
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from common.stubs import router_pb2, router_pb2_grpc
from tests.integration.mesh import ROOT, Mesh
from tests.ports import free_port
from tests.wait import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

AGENTS = ("alerts", "compiler", "console", "registry", "router", "seed_selector", "trainer")
MESH_UP_S = 150.0
JOB_DONE_S = 150.0


def _agent(module: str, *, grpc_port: bool = True, **extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "module": module,
        "health_check_port": free_port(),
        "metrics_port": 0,
        **extra,
    }
    if grpc_port:
        spec["port"] = free_port()
    return spec


def console_groups(token: str, durable: str) -> dict[str, dict[str, Any]]:
    """`startup_config.yaml`'s agents and groups, plus the console, on free ports."""
    return {
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
                    "services.alerts",
                    grpc_port=False,
                    env={"GRAFTMESH_ALERTS_DURABLE": durable},
                ),
                "console": _agent("services.console", env={"GRAFTMESH_TOKEN": token}),
            },
        },
        "growth": {
            "machine": "mainpc",
            "agents": {
                "compiler": _agent("services.compiler"),
                "seed_selector": _agent("services.seed_selector"),
            },
        },
    }


MESH_SETTINGS: dict[str, Any] = {
    "health_check": {"interval_s": 1, "timeout_s": 1, "retries": 3, "start_period_s": 90},
    "restart": {"policy": "on-failure", "backoff_initial_s": 0.2, "backoff_max_s": 5},
    "circuit_breaker": {"failure_threshold": 5, "window_s": 60, "reset_timeout_s": 60},
    "stop_grace_s": 3,
}


def job_spec(name: str, *, register_as: str = "", growth: bool = False, steps: int = 40) -> dict:
    """A small two-spirals job in `JobSpec`'s JSON form (growth: every round is a plateau)."""
    spec: dict[str, Any] = {
        "name": name,
        "model": {"template": "mlp", "params": {"hidden": [8, 8]}},
        "slots": [{"module_path": "blocks.0.fc"}, {"module_path": "blocks.1.fc"}],
        "data": {
            "dataset": "two_spirals",
            "batch_size": 32,
            "params": {"samples": 400, "test_samples": 100},
        },
        "optimizer": {"name": "adamw", "lr": 0.01},
        "max_steps": steps,
        "eval_every_steps": 10,
        "seed": 7,
        "device": "cpu",
        "register_as": register_as,
    }
    if growth:
        spec["growth"] = {
            "enabled": True,
            "strategy": "SELECTION_STRATEGY_UCB1",
            "plateau_patience": 1,
            "plateau_min_delta": 10.0,
            "seed_training_steps": 6,
            "blend_steps": 6,
            "holding_steps": 4,
            "embargo_steps": 5,
            "blueprints": ["bottleneck_mlp"],
        }
    return spec


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


@dataclass
class Console:
    """An HTTP client of the console under test."""

    port: int
    token: str
    mesh: Mesh
    model_prefix: str = field(default_factory=lambda: f"c{secrets.token_hex(4)}")

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = "",
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        """One request; `token=""` sends the mesh's token, None sends none."""
        sent = dict(headers or {})
        if token == "":
            token = self.token
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            sent.setdefault("Content-Type", "application/json")
        request = urllib.request.Request(self.base + path, data=data, method=method, headers=sent)
        opener = urllib.request.build_opener(_NoRedirect)
        try:
            with opener.open(request, timeout=60) as reply:
                return Reply(reply.status, dict(reply.headers), reply.read().decode())
        except urllib.error.HTTPError as err:
            return Reply(err.code, dict(err.headers), err.read().decode())

    def events(self, path: str, timeout_s: float) -> Iterator[tuple[str, str, Any]]:
        """The server-sent events of `path` as (event, id, data) until the stream ends."""
        request = urllib.request.Request(
            self.base + path, headers={"Authorization": f"Bearer {self.token}"}
        )
        deadline = time.monotonic() + timeout_s
        with urllib.request.urlopen(request, timeout=timeout_s) as stream:
            event, event_id, data = "message", "", ""
            while time.monotonic() < deadline:
                line = stream.readline().decode()
                if not line:
                    return
                line = line.rstrip("\n")
                if not line:
                    if data:
                        yield event, event_id, json.loads(data)
                    event, event_id, data = "message", "", ""
                elif line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("id: "):
                    event_id = line[4:]
                elif line.startswith("data: "):
                    data += line[6:]
        raise AssertionError(f"{path}: the stream did not end within {timeout_s}s")

    def wait_job(self, job_id: str, timeout_s: float = JOB_DONE_S) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            job: dict[str, Any] = self.call("GET", f"/api/jobs/{job_id}").json()["job"]
            return job if job["state"] in ("SUCCEEDED", "FAILED", "CANCELLED") else None

        try:
            return wait_until(done, timeout_s, f"job {job_id} to end", poll_s=0.25)
        except AssertionError:
            log = self.mesh.root / "run" / "logs" / "trainer.log"
            raise AssertionError(log.read_text(errors="replace")[-3000:]) from None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def start_console_mesh(root: Path, nats_url: str, redis_url: str) -> tuple[Mesh, Console]:
    """Bring a mesh with the console up and wait until every agent is HEALTHY."""
    token = secrets.token_urlsafe(24)
    groups = console_groups(token, f"console-{secrets.token_hex(6)}")
    mesh = Mesh(root, nats_url, redis_url, groups=groups, settings=MESH_SETTINGS)
    mesh.up()
    try:
        mesh.wait_states(dict.fromkeys(AGENTS, "HEALTHY"), timeout_s=MESH_UP_S)
    except BaseException:
        mesh.kill()
        raise
    return mesh, Console(groups["ops"]["agents"]["console"]["port"], token, mesh)


def stop_console_mesh(mesh: Mesh) -> None:
    try:
        mesh.stop(timeout_s=60)
    finally:
        mesh.kill()


@pytest.fixture(scope="module")
def console(
    tmp_path_factory: pytest.TempPathFactory, system_nats_url: str, system_redis_url: str
) -> Iterator[Console]:
    mesh, client = start_console_mesh(
        tmp_path_factory.mktemp("console-api"), system_nats_url, system_redis_url
    )
    try:
        yield client
    finally:
        stop_console_mesh(mesh)


@pytest.fixture(scope="module")
def grown(console: Console) -> dict[str, Any]:
    """A growing job submitted through the API, with every event its stream sent."""
    name = f"{console.model_prefix}-grown"
    spec = job_spec(name, register_as=name, growth=True)
    reply = console.call("POST", "/api/jobs", {"spec": spec})
    assert reply.status == 201, reply.text
    job_id = reply.json()["job"]["job_id"]
    events = list(console.events(f"/api/jobs/{job_id}/events", JOB_DONE_S))
    return {"name": name, "job_id": job_id, "events": events, "job": console.wait_job(job_id)}


def test_mesh_lists_every_agent_healthy_with_group_machine_and_latency(console: Console) -> None:
    reply = console.call("GET", "/api/mesh")
    assert reply.status == 200, reply.text
    mesh = reply.json()["mesh"]
    assert mesh["mesh_state"] == "RUNNING"
    agents = {a["agent"]: a for a in mesh["agents"]}
    assert set(agents) == set(AGENTS)
    for a in agents.values():
        assert a["state"] == "HEALTHY", a
        assert a["machine"] == "mainpc"
        assert a["breaker"] == "closed"
        assert a["health_latency_ms"] is not None
    assert agents["console"]["group"] == "ops"


def test_reads_and_changes_need_the_token_and_say_so_without_a_trace(console: Console) -> None:
    for method, path, body in (
        ("GET", "/api/mesh", None),
        ("GET", "/api/jobs", None),
        ("POST", "/api/jobs", {"spec": {}}),
        ("POST", "/api/models/x/promote", {"version": 1}),
    ):
        for token in (None, "not-the-token"):
            reply = console.call(method, path, body, token=token)
            assert reply.status == 401, (method, path, reply.text)
            assert "token" in reply.json()["error"]
            assert "Traceback" not in reply.text
    page = console.call("GET", "/mesh", token=None)
    assert page.status == 303
    assert page.headers["location"].startswith("/login")
    login = console.call("GET", "/login", token=None)
    assert login.status == 200
    assert console.token not in login.text
    cookie = login.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    assert "default-src 'self'" in login.headers["content-security-policy"]


def test_changes_refuse_other_origins_and_non_json_bodies(console: Console) -> None:
    foreign = console.call(
        "POST", "/api/jobs", {"spec": {}}, headers={"Origin": "http://evil.example"}
    )
    assert foreign.status == 403, foreign.text
    text = console.call("POST", "/api/jobs", raw=b"spec=1", headers={"Content-Type": "text/plain"})
    assert text.status == 415, text.text
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    for path in ("/training/jobs", "/models/x/promote", "/blueprints", "/login"):
        forged = console.call("POST", path, raw=b"name=x&version=1", headers=form, token=None)
        assert forged.status == 403, (path, forged.text)
        assert "reload the page" in forged.text
    broken = console.call(
        "POST", "/api/jobs", raw=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert broken.status == 400
    assert broken.json()["error"] == "the body is not JSON"


def test_a_bad_job_spec_is_refused_by_the_trainer_naming_the_field(console: Console) -> None:
    spec = job_spec("bad", growth=True)
    spec["growth"]["blend_steps"] = -1
    reply = console.call("POST", "/api/jobs", {"spec": spec})
    assert reply.status == 400, reply.text
    assert "spec.growth.blend_steps" in reply.json()["fields"]
    unknown = console.call("POST", "/api/jobs", {"spec": {"no_such_field": 1}})
    assert unknown.status == 400
    assert "no_such_field" in unknown.json()["error"]


def test_unknown_ids_are_not_found_with_a_clear_message(console: Console) -> None:
    for method, path, body, words in (
        ("GET", "/api/jobs/job-nope", None, "no job 'job-nope'"),
        ("GET", "/api/jobs/job-nope/events", None, "no job 'job-nope'"),
        ("POST", "/api/jobs/job-nope/cancel", {}, "no job 'job-nope'"),
        ("GET", "/api/models/nope", None, "model 'nope' is not registered"),
        ("POST", "/api/models/nope/promote", {"version": 1}, "model 'nope' is not registered"),
        ("GET", "/api/nothing-here", None, "no such page"),
    ):
        reply = console.call(method, path, body)
        assert reply.status == 404, (path, reply.text)
        assert words in reply.json()["error"], reply.text
    page = console.call("GET", "/training/jobs/job-nope")
    assert page.status == 404
    assert "no job &#39;job-nope&#39; on the trainer" in page.text
    assert "Traceback" not in page.text


def test_a_growing_job_streams_progress_seeds_and_parameters_then_registers(
    console: Console, grown: dict[str, Any]
) -> None:
    job = grown["job"]
    assert job["state"] == "SUCCEEDED", job
    assert job["registered"] == {"name": grown["name"], "version": 1}
    events = [data for kind, _, data in grown["events"] if kind == "job"]
    assert grown["events"][-1][0] == "end"
    progress = [e for e in events if e["kind"] == "progress"]
    assert len(progress) >= 3
    assert all(e["train_loss"] is not None for e in progress)
    transitions = [e for e in events if e["kind"] == "slot_transition"]
    assert transitions, events
    assert {"GERMINATED", "TRAINING"} <= {t["to_state"] for t in transitions}
    # Parameters over time: every progress event counts them, and a graft adds some.
    params = [e["param_count"] for e in progress]
    assert all(count > 0 for count in params) and params[-1] > params[0], params
    states = [e["to_state"] for e in events if e["kind"] == "state_change"]
    assert states[-1] == "SUCCEEDED"
    ids = [int(i) for kind, i, _ in grown["events"] if kind == "job" and i]
    assert ids == sorted(ids)
    # A client that reconnects (Last-Event-ID) gets only what came after.
    tail = list(console.events(f"/api/jobs/{grown['job_id']}/events?after={ids[-3]}", 30))
    assert [int(i) for kind, i, _ in tail if kind == "job"] == ids[-2:]


def test_a_running_job_is_cancelled_and_cancelling_again_returns_it_unchanged(
    console: Console,
) -> None:
    reply = console.call("POST", "/api/jobs", {"spec": job_spec("long", steps=1_000_000)})
    assert reply.status == 201, reply.text
    job_id = reply.json()["job"]["job_id"]
    cancelled = console.call("POST", f"/api/jobs/{job_id}/cancel", {})
    assert cancelled.status == 200, cancelled.text
    assert console.wait_job(job_id)["state"] == "CANCELLED"
    again = console.call("POST", f"/api/jobs/{job_id}/cancel", {})
    assert again.json()["job"]["state"] == "CANCELLED"


def test_promote_moves_production_and_the_router_routes_to_it(
    console: Console, grown: dict[str, Any]
) -> None:
    name = grown["name"]
    reply = console.call("POST", f"/api/models/{name}/promote", {"version": 1})
    assert reply.status == 200, reply.text
    assert reply.json()["entry"]["to_version"] == 1
    router = console.mesh.config["agent_groups"]["serving"]["agents"]["router"]["port"]

    def routed() -> list[int] | None:
        with grpc.insecure_channel(f"127.0.0.1:{router}") as channel:
            routes = (
                router_pb2_grpc.RouterServiceStub(channel)
                .GetRoutes(router_pb2.GetRoutesRequest(model_name=name), timeout=5)
                .routes
            )
        found = [[t.version for t in r.targets] for r in routes if r.alias == "production"]
        return found[0] if found else None

    assert wait_until(routed, 30, "the router's production route") == [1]
    gallery = console.call("GET", "/api/models").json()["models"]
    card = next(m for m in gallery if m["name"] == name)
    assert card["aliases"] == {"production": 1}
    assert "val_accuracy" in card["metrics"]
    model = console.call("GET", f"/api/models/{name}").json()["model"]
    assert model["aliases"] == {"production": 1}
    assert model["history"][0]["actor"].startswith("console")
    assert model["versions"][0]["lineage"]["job_id"] == grown["job_id"]
    assert model["stats"]["window_s"] > 0  # the router answered
    # The alias was just created: there is nothing to roll back to.
    refused = console.call("POST", f"/api/models/{name}/rollback", {"alias": "production"})
    assert refused.status == 409
    assert "no earlier version" in refused.json()["error"]
    missing = console.call("POST", f"/api/models/{name}/promote", {"version": 9})
    assert missing.status == 404
    bad = console.call("POST", f"/api/models/{name}/promote", {"version": "one"})
    assert bad.status == 400


def test_custom_blueprints_compile_and_a_bad_one_names_its_field(console: Console) -> None:
    nodes = [
        {"name": "down", "op": "linear", "inputs": ["input"], "attrs": {"out_features": 2}},
        {"name": "act", "op": "relu", "inputs": ["down"]},
        {"name": "up", "op": "linear", "inputs": ["act"], "attrs": {"out_features": "out"}},
    ]
    body = {"name": "tiny_custom", "slot": {"kind": "linear", "features": 4}, "nodes": nodes}
    # Growth must start function-preserving: a seed that does not output zero fails.
    not_zero = console.call("POST", "/api/blueprints", {**body, "output": "up"})
    assert not_zero.status == 422, not_zero.text
    assert "zero_at_init" in not_zero.json()["error"]
    nodes[2]["attrs"]["zero_init"] = True
    good = console.call("POST", "/api/blueprints", {**body, "output": "up"})
    assert good.status == 201, good.text
    kernel = good.json()["kernel"]
    assert kernel["blueprint_name"] == "tiny_custom"
    assert kernel["param_count"] == 4 * 2 + 2 + 2 * 4 + 4
    assert {n["id"] for n in kernel["graph"]["nodes"]} == {"input", "down", "act", "up"}
    listed = console.call("GET", "/api/blueprints").json()
    assert "tiny_custom" in {k["blueprint_name"] for k in listed["custom"]}
    assert {"bottleneck_mlp", "residual_mlp"} <= {b["name"] for b in listed["catalogue"]}
    nodes[0]["attrs"]["out_features"] = -3
    bad = console.call("POST", "/api/blueprints", {**body, "output": "up"})
    assert bad.status == 400, bad.text
    assert "blueprint.ir.nodes[0]" in bad.json()["fields"]["nodes"]
    unreadable = console.call("POST", "/api/blueprints", {**body, "nodes": "not a list"})
    assert unreadable.status == 400
    assert "nodes" in unreadable.json()["fields"]


class Browser:
    """A cookie-keeping HTTP client that posts forms the way a browser does."""

    def __init__(self, console: Console) -> None:
        self.base = console.base
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(self.jar), _NoRedirect
        )

    def _send(self, request: urllib.request.Request) -> Reply:
        try:
            with self.opener.open(request, timeout=120) as reply:
                return Reply(reply.status, dict(reply.headers), reply.read().decode())
        except urllib.error.HTTPError as err:
            return Reply(err.code, dict(err.headers), err.read().decode())

    def get(self, path: str) -> Reply:
        return self._send(urllib.request.Request(self.base + path))

    def post(self, path: str, fields: dict[str, str]) -> Reply:
        data = urllib.parse.urlencode(fields).encode()
        return self._send(urllib.request.Request(self.base + path, data=data, method="POST"))

    def csrf(self, path: str) -> str:
        page = self.get(path)
        found = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert found, page.text[:2000]
        return found.group(1)


def test_forms_need_a_session_opened_with_the_token_and_its_csrf_token(
    console: Console,
) -> None:
    browser = Browser(console)
    first = browser.csrf("/login")
    wrong = browser.post("/login", {"csrf": first, "token": "guess", "next": "/blueprints"})
    assert wrong.status == 401 and "not the mesh&#39;s token" in wrong.text
    right = browser.post("/login", {"csrf": first, "token": console.token, "next": "/blueprints"})
    assert right.status == 303 and right.headers["location"] == "/blueprints"
    # Logging in replaced the session: the old form token is worth nothing now.
    stale = browser.post("/blueprints/residual_mlp/measure", {"csrf": first})
    assert stale.status == 403
    csrf = browser.csrf("/blueprints")
    measured = browser.post("/blueprints/residual_mlp/measure", {"csrf": csrf})
    assert measured.status == 303, measured.text[-2000:]
    assert measured.headers["location"] == "/blueprints#bp-residual_mlp"
    listed = json.loads(browser.get("/api/blueprints").text)
    entry = next(b for b in listed["catalogue"] if b["name"] == "residual_mlp")
    assert entry["kernel"]["latency_ratio"] > 0
    assert entry["kernel"]["param_count"] == entry["param_count"]
    assert len(entry["kernel"]["graph"]["nodes"]) >= 3
    unknown = browser.post("/blueprints/no_such/measure", {"csrf": csrf})
    assert unknown.status == 404
    out = browser.post("/logout", {"csrf": csrf})
    assert out.status == 303
    assert browser.get("/api/mesh").status == 401
    assert browser.get("/mesh").status == 303


class StandaloneConsole:
    """A second console process on the same mesh with settings of its own."""

    def __init__(self, mesh: Mesh, env: dict[str, str]) -> None:
        self.port = free_port()
        self.log = mesh.root / f"console-{self.port}.log"
        environ = {
            **{k: v for k, v in os.environ.items() if not k.startswith("GRAFTMESH_")},
            "GRAFTMESH_AGENT": f"console{self.port}",
            "GRAFTMESH_MACHINE": "mainpc",
            "GRAFTMESH_HOST": "127.0.0.1",
            "GRAFTMESH_PORT": str(self.port),
            "GRAFTMESH_HEALTH_PORT": str(free_port()),
            "GRAFTMESH_NATS_URL": mesh.config["infra"]["nats_url"],
            "GRAFTMESH_REDIS_URL": mesh.config["infra"]["redis_url"],
            "GRAFTMESH_CONFIG": str(mesh.config_path),
            "GRAFTMESH_RUN_DIR": str(mesh.root / "run"),
            **env,
        }
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "services.console"],
                cwd=ROOT,
                env=environ,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.client = Console(self.port, env.get("GRAFTMESH_TOKEN", ""), mesh)
        try:
            wait_until(self._serving, 30, f"a console on port {self.port}")
        except AssertionError:
            self.stop()
            raise AssertionError(self.log.read_text(errors="replace")[-3000:]) from None

    def _serving(self) -> bool:
        assert self.proc.poll() is None, self.log.read_text(errors="replace")[-3000:]
        try:
            return self.client.call("GET", "/healthz", token=None).status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def test_reads_are_open_only_when_configured_so_and_open_access_says_so(
    console: Console, grown: dict[str, Any]
) -> None:
    readable = StandaloneConsole(
        console.mesh, {"GRAFTMESH_TOKEN": "other-token", "GRAFTMESH_CONSOLE_READONLY_OPEN": "1"}
    )
    try:
        reply = readable.client.call("GET", "/api/mesh", token=None)
        assert reply.status == 200, reply.text
        assert reply.json()["mesh"]["mesh_state"] in ("RUNNING", "DEGRADED")
        page = readable.client.call("GET", f"/models/{grown['name']}", token=None)
        assert page.status == 200 and "read-only" in page.text
        assert "Promote to production" not in page.text and "Roll back" not in page.text
        refused = readable.client.call("POST", "/api/models/x/promote", {}, token=None)
        assert refused.status == 401
    finally:
        readable.stop()
    assert readable.proc.returncode == 0
    open_console = StandaloneConsole(console.mesh, {})
    try:
        page = open_console.client.call("GET", "/mesh", token=None)
        assert page.status == 200
        assert "No token is configured" in page.text
        # Changes pass the access check and reach the registry.
        missing = open_console.client.call("POST", "/api/models/nope/promote", {}, token=None)
        assert missing.status == 404, missing.text
    finally:
        open_console.stop()
    assert open_console.proc.returncode == 0


def _stopped_trainer(data: dict[str, Any]) -> bool:
    return data.get("agent") == "trainer" and str(data.get("state")).lower() == "stopped"


def test_live_feed_reports_an_agent_stopping_and_pages_say_it_is_unreachable(
    console: Console,
) -> None:
    seen: list[tuple[str, Any]] = []
    ready = threading.Event()

    def listen() -> None:
        request = urllib.request.Request(
            console.base + "/api/events", headers={"Authorization": f"Bearer {console.token}"}
        )
        deadline = time.monotonic() + 60
        with urllib.request.urlopen(request, timeout=60) as stream:
            ready.set()
            event = ""
            while time.monotonic() < deadline:
                try:
                    line = stream.readline().decode().rstrip("\n")
                except TimeoutError:
                    return
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    data = json.loads(line[6:])
                    seen.append((event, data))
                    if event == "agent" and _stopped_trainer(data):
                        return

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    assert ready.wait(10)
    stopped = console.mesh.cli("stop", "trainer")
    assert stopped.returncode == 0, stopped.stderr
    listener.join(60)
    agent_events = [d for kind, d in seen if kind == "agent"]
    assert any(_stopped_trainer(d) for d in agent_events), seen
    api = console.call("GET", "/api/jobs")
    assert api.status == 503
    assert "the trainer is not reachable" in api.json()["error"]
    page = console.call("GET", "/training")
    assert page.status == 200
    assert "The trainer is not reachable" in page.text
    assert "Traceback" not in page.text
