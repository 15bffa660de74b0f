"""The router agent as a real process, in front of the real registry agent, over real gRPC
and NATS: aliases, routes, hot reload, canaries, drift, refused artifacts, registry loss."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import nats
import pytest
import torch

from common.health import HealthResult, HealthStatus, check_health
from common.process import orphan_proof
from common.stubs import common_pb2, registry_pb2, registry_pb2_grpc, router_pb2, router_pb2_grpc
from services.router import reference_from_samples, tensor_from_proto, tensor_to_proto
from services.router.canary import Verdict
from services.router.canary_watch import CanaryWatch
from services.router.catalog import Catalog
from services.router.registry_client import RegistryClient
from services.router.routing import RouteTarget
from services.router.settings import RouterSettings
from tests.integration.mesh import ROOT
from tests.ports import free_port
from tests.unit.router import model_factory as mf
from tests.wait import wait_until

pytestmark = pytest.mark.integration

ROUTER_SETTINGS: dict[str, Any] = {
    "replicas": 2,
    # Long enough that alias changes in these tests reach the router by NATS events.
    "reconcile_interval_s": 60,
    "batching": {"max_batch_size": 16, "max_wait_us": 500},
    "canary": {
        "interval_s": 0.3,
        "min_requests": 20,
        "min_duration_s": 0,
        "fail_fast_errors": 5,
        "max_latency_ratio": 50,
        "latency_slack_us": 200000,
    },
    "drift": {"window_rows": 256, "psi_threshold": 0.25, "alert_cooldown_s": 60},
}


class Agent:
    """`python -m services.<module>` with the supervisor's environment, on free ports."""

    def __init__(
        self,
        module: str,
        run_dir: Path,
        nats_url: str,
        redis_url: str,
        *,
        port: int | None = None,
        name: str | None = None,
        **env: str,
    ) -> None:
        self.module = module
        self.name = name or f"{module}-{uuid.uuid4().hex[:8]}"
        self.port = port or free_port()
        self.health_port = free_port()
        self.log = run_dir / f"{self.name}.log"
        full_env = {
            **os.environ,
            "GRAFTMESH_AGENT": self.name,
            "GRAFTMESH_GROUP": "core",
            "GRAFTMESH_MACHINE": "mainpc",
            "GRAFTMESH_HOST": "127.0.0.1",
            "GRAFTMESH_PORT": str(self.port),
            "GRAFTMESH_HEALTH_PORT": str(self.health_port),
            "GRAFTMESH_METRICS_PORT": "0",
            "GRAFTMESH_NATS_URL": nats_url,
            "GRAFTMESH_REDIS_URL": redis_url,
            "GRAFTMESH_RUN_DIR": str(run_dir),
            **env,
        }
        full_env.pop("GRAFTMESH_CONFIG", None)
        # As the supervisor starts agents: no Python between fork and exec, which could
        # hang beside this process's gRPC threads.
        argv, preexec = orphan_proof([sys.executable, "-m", f"services.{module}"])
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                argv,
                cwd=ROOT,
                env=full_env,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=preexec,  # noqa: PLW1509 -- None where setpriv is available
            )
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")

    def health(self) -> HealthResult:
        return asyncio.run(check_health("127.0.0.1", self.health_port, 0.5))

    def wait_healthy(self, timeout_s: float = 90) -> None:
        try:
            wait_until(
                lambda: self.health().status is HealthStatus.HEALTHY, timeout_s, "agent healthy"
            )
        except AssertionError:
            raise AssertionError(self.log.read_text()[-5000:]) from None

    def kill(self) -> None:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)

    def stop(self) -> int:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


class Mesh:
    """A registry agent and a router agent that reaches it at a fixed address."""

    def __init__(self, run_dir: Path, nats_url: str, redis_url: str, **settings: Any) -> None:
        self.run_dir = run_dir
        self.nats_url = nats_url
        self.redis_url = redis_url
        self.registry = Agent("registry", run_dir, nats_url, redis_url)
        config = {**ROUTER_SETTINGS, **settings}
        config["registry_address"] = f"127.0.0.1:{self.registry.port}"
        self.router = Agent(
            "router", run_dir, nats_url, redis_url, ROUTER_CONFIG=json.dumps(config)
        )
        self.registry.wait_healthy()
        self.router.wait_healthy()
        self.reg = registry_pb2_grpc.RegistryServiceStub(self.registry.channel)
        self.stub = router_pb2_grpc.RouterServiceStub(self.router.channel)

    def restart_registry(self) -> None:
        old = self.registry
        self.registry = Agent(
            "registry", self.run_dir, self.nats_url, self.redis_url, port=old.port, name=old.name
        )
        self.registry.wait_healthy()
        self.reg = registry_pb2_grpc.RegistryServiceStub(self.registry.channel)

    def close(self) -> None:
        self.router.kill()
        self.registry.kill()

    # -- registry side -------------------------------------------------------------

    def register(
        self,
        name: str,
        module: torch.nn.Module,
        *,
        aliases: tuple[str, ...] = (),
        reference: dict[str, Any] | None = None,
        model_bytes: bytes | None = None,
    ) -> int:
        model_bytes = model_bytes if model_bytes is not None else mf.export(module)
        manifest_bytes = mf.manifest(reference)
        files = {"model.pt2": model_bytes, "manifest.json": manifest_bytes}
        metadata = registry_pb2.ModelVersionMetadata(
            name=name,
            input_signature=mf.signature(),
            files=[
                registry_pb2.ArtifactFile(name=n, sha256=mf.sha256(b), size_bytes=len(b))
                for n, b in files.items()
            ],
            aliases=list(aliases),
            actor="test",
        )
        messages = [registry_pb2.RegisterModelRequest(metadata=metadata)]
        for file_name, data in files.items():
            for offset in range(0, len(data), 64 * 1024):
                messages.append(
                    registry_pb2.RegisterModelRequest(
                        chunk=registry_pb2.FileChunk(
                            file_name=file_name,
                            chunk=common_pb2.ArtifactChunk(
                                data=data[offset : offset + 64 * 1024], offset=offset
                            ),
                        )
                    )
                )
        response = self.reg.RegisterModel(iter(messages), timeout=30)
        return int(response.model_version.version)

    def set_alias(self, name: str, alias: str, version: int) -> None:
        self.reg.SetAlias(
            registry_pb2.SetAliasRequest(name=name, alias=alias, version=version, actor="test"),
            timeout=10,
        )

    def alias_version(self, name: str, alias: str) -> int | None:
        try:
            response = self.reg.GetModelVersion(
                registry_pb2.GetModelVersionRequest(
                    model=common_pb2.ModelRef(name=name, alias=alias)
                ),
                timeout=10,
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        return int(response.model_version.version)

    # -- router side -----------------------------------------------------------------

    def infer(
        self,
        name: str,
        x: torch.Tensor,
        *,
        alias: str | None = None,
        version: int | None = None,
        **fields: Any,
    ) -> router_pb2.InferResponse:
        ref = common_pb2.ModelRef(name=name)
        if version is not None:
            ref.version = version
        elif alias is not None:
            ref.alias = alias
        request = router_pb2.InferRequest(
            model=ref, inputs={"x": tensor_to_proto(x)}, deadline_ms=20000, **fields
        )
        response: router_pb2.InferResponse = self.stub.Infer(request, timeout=30)
        return response


def _name() -> str:
    return f"m{uuid.uuid4().hex[:10]}"


def _x(rows: int = 2) -> torch.Tensor:
    return torch.randn(rows, mf.IN_FEATURES)


@pytest.fixture(scope="module")
def mesh(
    tmp_path_factory: pytest.TempPathFactory, system_nats_url: str, system_redis_url: str
) -> Iterator[Mesh]:
    """One registry and one router for the tests that only register models of their own."""
    shared = Mesh(tmp_path_factory.mktemp("router"), system_nats_url, system_redis_url)
    yield shared
    shared.close()


class Alerts:
    """Collects the JSON of every message on `alerts.*.<agent>` in a background thread."""

    def __init__(self, nats_url: str, agent: str) -> None:
        self.received: list[dict[str, Any]] = []
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._run(nats_url, agent),))
        self._thread.start()
        assert self._ready.wait(10), "alert subscription not ready"

    async def _run(self, nats_url: str, agent: str) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        nc = await nats.connect(nats_url)

        async def on_message(msg: Any) -> None:
            self.received.append(json.loads(msg.data))

        await nc.subscribe(f"alerts.*.{agent}", cb=on_message)
        await nc.flush()
        self._ready.set()
        await self._stop.wait()
        await nc.close()

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [a for a in self.received if a.get("kind") == kind]

    def close(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@pytest.fixture
def alerts(mesh: Mesh, system_nats_url: str) -> Iterator[Alerts]:
    collector = Alerts(system_nats_url, mesh.router.name)
    yield collector
    collector.close()


# -- tests -----------------------------------------------------------------------------


def test_infer_by_alias_and_by_version_through_the_router(mesh: Mesh) -> None:
    name = _name()
    module = mf.mlp(seed=1)
    assert mesh.register(name, module, aliases=("production",)) == 1
    x = _x(3)
    by_alias = mesh.infer(name, x)  # no selector: the production alias
    by_version = mesh.infer(name, x, version=1)
    with torch.inference_mode():
        expected = module(x)
    for response in (by_alias, by_version):
        assert response.model_name == name and response.version == 1
        assert response.replica_id.startswith(f"{name}-v1-r")
        assert response.latency_us > 0 and response.cost > 0
        assert torch.allclose(tensor_from_proto(response.outputs[0], "y"), expected, atol=1e-5)
    with pytest.raises(grpc.RpcError) as err:
        mesh.infer(name, x, max_cost=by_alias.cost / 1e6)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert mesh.infer(name, x, max_cost=1e9).version == 1
    positional = mesh.stub.Infer(
        router_pb2.InferRequest(
            model=common_pb2.ModelRef(name=name, alias="production"), args=[tensor_to_proto(x)]
        ),
        timeout=30,
    )
    assert positional.version == 1


def test_bad_input_and_unknown_names_are_client_errors_not_crashes(mesh: Mesh) -> None:
    name = _name()
    mesh.register(name, mf.mlp(), aliases=("production",))
    mesh.infer(name, _x())

    def request(
        model: common_pb2.ModelRef | None = None, inputs: dict[str, common_pb2.Tensor] | None = None
    ) -> router_pb2.InferRequest:
        return router_pb2.InferRequest(
            model=model or common_pb2.ModelRef(name=name),
            inputs=inputs if inputs is not None else {"x": tensor_to_proto(_x())},
        )

    short = common_pb2.Tensor(data=b"12", shape=[2, 8], dtype=common_pb2.DTYPE_FLOAT32)
    cases = [
        (
            request(inputs={"x": tensor_to_proto(torch.randn(2, 5))}),
            "INVALID_ARGUMENT",
            "inputs[x].shape[1]",
        ),
        (
            request(inputs={"x": tensor_to_proto(_x().double())}),
            "INVALID_ARGUMENT",
            "inputs[x].dtype",
        ),
        (request(inputs={"y": tensor_to_proto(_x())}), "INVALID_ARGUMENT", "inputs[y]"),
        (request(inputs={"x": short}), "INVALID_ARGUMENT", "inputs[x].data"),
        (request(common_pb2.ModelRef(name=name, alias="nope")), "NOT_FOUND", "nope"),
        (request(common_pb2.ModelRef(name=name, version=7)), "NOT_FOUND", ""),
        (request(common_pb2.ModelRef(name=_name())), "NOT_FOUND", ""),
        (request(common_pb2.ModelRef(name="bad.name")), "INVALID_ARGUMENT", "model.name"),
    ]
    for message, code, text in cases:
        with pytest.raises(grpc.RpcError) as err:
            mesh.stub.Infer(message, timeout=30)
        assert err.value.code().name == code, (code, err.value.details())
        assert text in str(err.value.details())
    assert mesh.infer(name, _x()).version == 1
    assert mesh.router.health().status is HealthStatus.HEALTHY


def test_set_route_splits_traffic_and_clearing_it_restores_the_alias(mesh: Mesh) -> None:
    name = _name()
    mesh.register(name, mf.mlp(seed=1), aliases=("production",))
    mesh.register(name, mf.mlp(seed=2))
    set_route = mesh.stub.SetRoute(
        router_pb2.SetRouteRequest(
            model_name=name,
            alias="production",
            targets=[
                router_pb2.RouteTarget(version=1, weight=1),
                router_pb2.RouteTarget(version=2, weight=1),
            ],
            actor="test",
            reason="half and half",
        ),
        timeout=10,
    )
    assert set_route.route.explicit and set_route.route.actor == "test"
    wait_until(
        lambda: (
            {
                v.version
                for v in mesh.stub.GetStats(
                    router_pb2.RouterServiceGetStatsRequest(model_name=name), timeout=10
                ).versions
            }
            >= {1, 2}
        ),
        60,
        "both versions loaded",
    )
    served = Counter(mesh.infer(name, _x()).version for _ in range(120))
    assert served[1] > 25 and served[2] > 25, served
    stats = mesh.stub.GetStats(router_pb2.RouterServiceGetStatsRequest(model_name=name), timeout=10)
    shares = {v.version: v.traffic_share["production"] for v in stats.versions}
    assert shares == {1: pytest.approx(0.5), 2: pytest.approx(0.5)}
    assert sum(v.stats.requests for v in stats.versions) >= 120
    assert {r.version for r in stats.replicas} == {1, 2}
    assert all(r.device == "cpu" and not r.ejected for r in stats.replicas)
    routes = mesh.stub.GetRoutes(router_pb2.GetRoutesRequest(model_name=name), timeout=10).routes
    (production,) = [r for r in routes if r.alias == "production"]
    assert production.explicit and production.reason == "half and half"

    mesh.stub.SetRoute(
        router_pb2.SetRouteRequest(model_name=name, alias="production", actor="test"), timeout=10
    )
    assert {mesh.infer(name, _x()).version for _ in range(20)} == {1}
    routes = mesh.stub.GetRoutes(router_pb2.GetRoutesRequest(model_name=name), timeout=10).routes
    (production,) = [r for r in routes if r.alias == "production"]
    assert not production.explicit and [t.version for t in production.targets] == [1]

    for targets, code, text in [
        ([router_pb2.RouteTarget(version=9, weight=1)], "NOT_FOUND", "targets[0].version"),
        ([router_pb2.RouteTarget(version=1, weight=-1)], "INVALID_ARGUMENT", "targets[0].weight"),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            mesh.stub.SetRoute(
                router_pb2.SetRouteRequest(model_name=name, alias="production", targets=targets),
                timeout=10,
            )
        assert err.value.code().name == code and text in str(err.value.details())


def test_a_new_production_version_is_picked_up_without_failing_requests(mesh: Mesh) -> None:
    name = _name()
    mesh.register(name, mf.mlp(seed=1), aliases=("production",))
    assert mesh.infer(name, _x()).version == 1
    versions: list[int] = []
    failures: list[str] = []
    stop = threading.Event()

    def traffic() -> None:
        for _ in range(5000):
            if stop.is_set():
                return
            try:
                versions.append(mesh.infer(name, _x()).version)
            except grpc.RpcError as exc:
                failures.append(f"{exc.code().name}: {exc.details()}")

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        mesh.register(name, mf.mlp(seed=2))
        mesh.set_alias(name, "production", 2)
        wait_until(lambda: versions[-5:] == [2] * 5, 60, "traffic on v2")
        mesh.register(name, mf.mlp(seed=3))
        mesh.set_alias(name, "production", 3)
        wait_until(lambda: versions[-5:] == [3] * 5, 60, "traffic on v3")
    finally:
        stop.set()
        worker.join(60)
    assert failures == []
    # v2 stays loaded as v3's fallback; v1 is drained and unloaded.
    wait_until(
        lambda: (
            {
                v.version
                for v in mesh.stub.GetStats(
                    router_pb2.RouterServiceGetStatsRequest(model_name=name), timeout=10
                ).versions
            }
            == {2, 3}
        ),
        60,
        "v1 unloaded",
    )


def test_a_good_canary_is_promoted_and_announced(mesh: Mesh, alerts: Alerts) -> None:
    name = _name()
    mesh.register(name, mf.mlp(seed=1), aliases=("production",))
    mesh.register(name, mf.mlp(seed=2), aliases=("canary",))
    # The router may promote as soon as it has seen enough canary traffic, even while
    # this loop runs: then production serves v2 and the canary alias is gone.
    for _ in range(30):
        if mesh.infer(name, _x(), alias="production").version == 2:
            break
        try:
            assert mesh.infer(name, _x(), alias="canary").version == 2
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND
            break
    wait_until(lambda: mesh.alias_version(name, "production") == 2, 30, "production moved to v2")
    (alert,) = wait_until(lambda: alerts.of_kind("canary_promoted"), 30, "promotion alert")
    assert set(alert) == {
        "id",
        "timestamp",
        "kind",
        "severity",
        "agent",
        "fingerprint",
        "count",
        "first_seen",
        "last_seen",
        "message",
        "sample",
    }
    assert alert["severity"] == "info" and alert["agent"] == mesh.router.name
    assert alert["sample"]["model"] == name and alert["sample"]["canary_version"] == 2
    assert mesh.alias_version(name, "canary") is None
    wait_until(lambda: mesh.infer(name, _x()).version == 2, 30, "traffic on the promoted version")


class FailsOnRealInputs(torch.nn.Module):
    """Runs on zeros (the warm-up) but indexes out of range on ordinary inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(mf.IN_FEATURES, mf.OUT_FEATURES)
        self.table = torch.nn.Embedding(4, mf.OUT_FEATURES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = (x.abs() * 1000).long()
        result: torch.Tensor = self.linear(x) + self.table(index).sum(dim=1)
        return result


def test_a_failing_canary_is_rolled_back_while_its_traffic_falls_back(
    mesh: Mesh, alerts: Alerts
) -> None:
    name = _name()
    mesh.register(name, mf.mlp(seed=1), aliases=("production",))
    mesh.register(name, FailsOnRealInputs(), aliases=("canary",))
    mesh.stub.SetRoute(
        router_pb2.SetRouteRequest(
            model_name=name,
            alias="production",
            targets=[
                router_pb2.RouteTarget(version=1, weight=1),
                router_pb2.RouteTarget(version=2, weight=1),
            ],
            actor="test",
        ),
        timeout=10,
    )
    wait_until(
        lambda: (
            len(
                mesh.stub.GetStats(
                    router_pb2.RouterServiceGetStatsRequest(model_name=name), timeout=10
                ).versions
            )
            == 2
        ),
        60,
        "both versions loaded",
    )
    for _ in range(40):
        assert mesh.infer(name, _x()).version == 1  # v2 fails; its requests fall back to v1
    (alert,) = wait_until(lambda: alerts.of_kind("canary_rolled_back"), 30, "rollback alert")
    assert alert["severity"] == "warning" and alert["sample"]["canary_version"] == 2
    assert alert["sample"]["canary"]["errors"] >= 5
    wait_until(lambda: mesh.alias_version(name, "canary") is None, 30, "canary alias removed")
    routes = mesh.stub.GetRoutes(router_pb2.GetRoutesRequest(model_name=name), timeout=10).routes
    (production,) = [r for r in routes if r.alias == "production"]
    assert [t.version for t in production.targets] == [1]


async def test_routers_judging_one_failing_canary_roll_it_back_once(mesh: Mesh) -> None:
    """Two routers (replicas) both see the canary fail: one moves the alias, one alert."""
    name = _name()
    v1 = mesh.register(name, mf.mlp(seed=1), aliases=("production",))
    mesh.register(name, mf.mlp(seed=2), aliases=("canary",))
    mesh.set_alias(name, "canary", v1)
    v3 = mesh.register(name, mf.mlp(seed=3), aliases=("canary",))  # canary: v2, v1, v3
    settings = RouterSettings.model_validate(
        {**ROUTER_SETTINGS, "registry_address": f"127.0.0.1:{mesh.registry.port}"}
    )
    address = settings.registry_address
    assert address is not None
    published: list[tuple[str, dict[str, Any]]] = []

    async def publish(subject: str, alert: Mapping[str, Any]) -> None:
        published.append((subject, dict(alert)))

    async def where() -> str:
        return address

    catalogs, watchers = [], []
    try:
        for agent in ("router-a", "router-b"):
            catalog = Catalog(settings, RegistryClient(where))
            catalogs.append(catalog)
            await catalog.track(name)
            for version, ok in ((v1, True), (v3, False)):
                served = await catalog.ensure_loaded(name, version)
                for _ in range(30):  # what each router's traffic showed it
                    served.stats.record(900.0, 0.0, ok=ok)
            split = (RouteTarget(v1, 1.0), RouteTarget(v3, 1.0))
            catalog.set_route(name, "production", split, actor="test", reason="canary split")
            watchers.append(CanaryWatch(catalog, settings.canary, agent=agent, publish=publish))
        # Both judged v3 before either acted; b acts after a did.
        first, second = [await watcher.check(name) for watcher in watchers]
    finally:
        for catalog in catalogs:
            await catalog.close()
            await catalog.registry.close()
    assert first is not None and second is not None
    assert first.decision.verdict is Verdict.ROLLBACK and first.applied
    assert second.decision.verdict is Verdict.ROLLBACK and not second.applied
    assert [a["kind"] for _, a in published] == ["canary_rolled_back"]
    assert published[0][1]["agent"] == "router-a"
    # Not stepped back twice (v3 -> v1 -> v2): the canary is gone, production kept.
    assert mesh.alias_version(name, "canary") is None
    assert mesh.alias_version(name, "production") == v1
    history = mesh.reg.GetAliasHistory(
        registry_pb2.GetAliasHistoryRequest(name=name, alias="canary"), timeout=10
    ).entries
    by_routers = [(e.actor, e.from_version, e.to_version) for e in history if e.actor != "test"]
    assert sorted(by_routers) == [("router-a", v1, 0), ("router-a", v3, v1)]
    # Each router's own route lost the failing version.
    for catalog in catalogs:
        targets = catalog.route(name, "production")[0]
        assert [t.version for t in targets] == [v1]


def test_drifting_inputs_raise_a_drift_alert(mesh: Mesh, alerts: Alerts) -> None:
    name = _name()
    reference = reference_from_samples(torch.randn(5000, mf.IN_FEATURES))
    section = {"schema": 1, "sample_count": 5000, "inputs": {"x": reference.model_dump()}}
    mesh.register(name, mf.mlp(), aliases=("production",), reference=section)
    for _ in range(4):
        mesh.infer(name, _x(64))
    assert alerts.of_kind("drift") == []
    for _ in range(8):
        shifted = _x(64)
        shifted[:, 3] += 3.0
        mesh.infer(name, shifted)
    (alert,) = wait_until(lambda: alerts.of_kind("drift"), 30, "drift alert")
    assert alert["severity"] == "warning" and alert["sample"]["model"] == name
    assert alert["sample"]["features"][0]["feature"] == 3


def _issue_about(mesh: Mesh, text: str) -> bool:
    issues = (mesh.router.health().reply or {}).get("issues", [])
    return any(text in issue for issue in issues)


def _corrupt_stored_file(root: Path, sha256: str) -> None:
    for path in root.rglob("*"):
        if path.is_file() and mf.sha256(path.read_bytes()) == sha256:
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0xFF
            path.chmod(0o644)
            path.write_bytes(bytes(data))
            return
    raise AssertionError(f"no stored file with sha256 {sha256} under {root}")


def test_corrupted_and_unsafe_artifacts_are_refused_and_the_old_version_serves(
    mesh: Mesh,
) -> None:
    name = _name()
    mesh.register(name, mf.mlp(seed=1), aliases=("production",))
    assert mesh.infer(name, _x()).version == 1
    corrupt = mf.export(mf.mlp(seed=2))
    mesh.register(name, mf.mlp(), model_bytes=corrupt)
    _corrupt_stored_file(mesh.run_dir, mf.sha256(corrupt))
    mesh.set_alias(name, "production", 2)
    wait_until(lambda: _issue_about(mesh, f"{name} v2"), 30, "v2 refused in the health issues")
    assert mesh.router.health().status is HealthStatus.DEGRADED
    assert mesh.infer(name, _x()).version == 1  # the previous version takes over
    unsafe = mf.export_with_pickled_inputs(mf.mlp(seed=3))
    mesh.register(name, mf.mlp(), model_bytes=unsafe)
    with pytest.raises(grpc.RpcError) as err:
        mesh.infer(name, _x(), version=3)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "pickled example inputs" in str(err.value.details())


@pytest.mark.slow
def test_with_the_registry_gone_the_router_serves_what_it_has_and_reports_degraded(
    tmp_path: Path, system_nats_url: str, system_redis_url: str
) -> None:
    own = Mesh(tmp_path, system_nats_url, system_redis_url, reconcile_interval_s=0.5)
    try:
        name = _name()
        own.register(name, mf.mlp(), aliases=("production",))
        assert own.infer(name, _x()).version == 1
        own.registry.kill()
        wait_until(
            lambda: own.router.health().status is HealthStatus.DEGRADED, 30, "router degraded"
        )
        issues = (own.router.health().reply or {})["issues"]
        assert any("registry unreachable" in issue for issue in issues), issues
        for _ in range(10):
            assert own.infer(name, _x()).version == 1
        with pytest.raises(grpc.RpcError) as err:
            own.infer(_name(), _x())
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        own.restart_registry()
        wait_until(
            lambda: own.router.health().status is HealthStatus.HEALTHY, 30, "router healthy again"
        )
        assert own.infer(name, _x()).version == 1
    finally:
        with contextlib.suppress(Exception):
            own.close()
