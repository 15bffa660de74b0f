"""The registry agent as a real process over real gRPC, on SQLite and on PostgreSQL.

One agent per backend serves every test of this module (each test uses model
names of its own); the PostgreSQL agent gets a fresh database, dropped after.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import nats
import pytest

from common.health import HealthStatus, check_health
from common.stubs import common_pb2, registry_pb2, registry_pb2_grpc
from services.registry import (
    AliasAction,
    AliasEntry,
    aliases_at,
    create_registry_engine,
    current_revision,
    head_revision,
)
from tests.integration.mesh import ROOT
from tests.ports import free_port
from tests.unit.registry.databases import fresh_postgres_database
from tests.wait import wait_until

pytestmark = pytest.mark.integration

_ACTIONS = {
    registry_pb2.ALIAS_ACTION_SET: AliasAction.SET,
    registry_pb2.ALIAS_ACTION_DELETE: AliasAction.DELETE,
    registry_pb2.ALIAS_ACTION_ROLLBACK: AliasAction.ROLLBACK,
}


class RegistryProcess:
    """`python -m services.registry` with the environment the supervisor would give it."""

    def __init__(
        self, run_dir: Path, nats_url: str, redis_url: str, name: str, env: Mapping[str, str]
    ) -> None:
        self.name = name
        self.run_dir = run_dir
        self.db_url = env.get(
            "GRAFTMESH_REGISTRY_DB_URL", f"sqlite:///{run_dir / 'registry' / 'registry.db'}"
        )
        self.port = free_port()
        self.health_port = free_port()
        self.log = run_dir / "registry.log"
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
            "GRAFTMESH_RUN_DIR": str(run_dir),
            **env,
        }
        full_env.pop("GRAFTMESH_CONFIG", None)
        if "GRAFTMESH_REGISTRY_DB_URL" not in env:
            full_env.pop("GRAFTMESH_REGISTRY_DB_URL", None)
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "services.registry"],
                cwd=ROOT,
                env=full_env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"registry exited {self.proc.returncode}:\n{self.log.read_text()}")
        result = asyncio.run(check_health("127.0.0.1", self.health_port, 0.5))
        return result.status is HealthStatus.HEALTHY

    def wait_healthy(self) -> None:
        try:
            wait_until(self.healthy, 60, "registry healthy")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.log.read_text()}") from None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def agent(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    system_nats_url: str,
    system_redis_url: str,
) -> Iterator[RegistryProcess]:
    """A registry agent on the backend named by the parameter, healthy."""
    run_dir = tmp_path_factory.mktemp(f"registry-{request.param}")
    with contextlib.ExitStack() as stack:
        env: dict[str, str] = {}
        if request.param == "postgresql":
            env["GRAFTMESH_REGISTRY_DB_URL"] = stack.enter_context(fresh_postgres_database())
        name = f"registry{os.urandom(4).hex()}"
        process = RegistryProcess(run_dir, system_nats_url, system_redis_url, name, env)
        stack.callback(process.kill)  # runs before the database is dropped
        process.wait_healthy()
        yield process
        assert process.stop() == 0, process.log.read_text()


@pytest.fixture
def stub(agent: RegistryProcess) -> Iterator[registry_pb2_grpc.RegistryServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{agent.port}") as channel:
        yield registry_pb2_grpc.RegistryServiceStub(channel)


# --- client helpers ---------------------------------------------------------------------------


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def files_for(seed: str, model_size: int = 3000) -> dict[str, bytes]:
    body = hashlib.sha256(seed.encode()).digest() * (model_size // 32 + 1)
    return {
        "model.pt2": body[:model_size],
        "manifest.json": json.dumps({"seed": seed}).encode(),
    }


def upload(
    name: str,
    files: Mapping[str, bytes],
    *,
    chunk_size: int = 1024,
    **metadata: Any,
) -> Iterator[registry_pb2.RegisterModelRequest]:
    declared = [
        registry_pb2.ArtifactFile(name=n, sha256=sha(d), size_bytes=len(d))
        for n, d in files.items()
    ]
    yield registry_pb2.RegisterModelRequest(
        metadata=registry_pb2.ModelVersionMetadata(name=name, files=declared, **metadata)
    )
    for file_name, data in files.items():
        for offset in range(0, len(data), chunk_size):
            yield registry_pb2.RegisterModelRequest(
                chunk=registry_pb2.FileChunk(
                    file_name=file_name,
                    chunk=common_pb2.ArtifactChunk(
                        data=data[offset : offset + chunk_size], offset=offset
                    ),
                )
            )


def register(
    stub: registry_pb2_grpc.RegistryServiceStub,
    name: str,
    files: Mapping[str, bytes] | None = None,
    **metadata: Any,
) -> registry_pb2.ModelVersion:
    response: registry_pb2.RegisterModelResponse = stub.RegisterModel(
        upload(name, files or files_for(name), **metadata), timeout=30
    )
    return response.model_version


def download(
    stub: registry_pb2_grpc.RegistryServiceStub,
    ref: common_pb2.ModelRef,
    file_name: str,
    **options: int,
) -> tuple[registry_pb2.ArtifactHeader, list[common_pb2.ArtifactChunk]]:
    responses = list(
        stub.DownloadArtifact(
            registry_pb2.DownloadArtifactRequest(model=ref, file_name=file_name, **options),
            timeout=30,
        )
    )
    assert responses[0].WhichOneof("part") == "header"
    assert all(r.WhichOneof("part") == "chunk" for r in responses[1:])
    return responses[0].header, [r.chunk for r in responses[1:]]


def rpc_error(call: Any, *args: Any, **kwargs: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        result = call(*args, timeout=30, **kwargs)
        if hasattr(result, "__iter__") and not isinstance(result, bytes):
            list(result)
    return err.value


def entries_as_records(entries: Sequence[registry_pb2.AliasHistoryEntry]) -> list[AliasEntry]:
    """History entries (newest first) as the registry's records, for `aliases_at`."""
    return [
        AliasEntry(
            model_name=e.model_name,
            alias=e.alias,
            from_version=e.from_version,
            to_version=e.to_version,
            action=_ACTIONS[e.action],
            actor=e.actor,
            reason=e.reason,
            at_us=e.timestamp.ToMicroseconds(),
            seq=len(entries) - i,
        )
        for i, e in enumerate(entries)
    ]


def ref(name: str, *, alias: str = "", version: int = 0) -> common_pb2.ModelRef:
    if alias:
        return common_pb2.ModelRef(name=name, alias=alias)
    if version:
        return common_pb2.ModelRef(name=name, version=version)
    return common_pb2.ModelRef(name=name)


# --- tests ------------------------------------------------------------------------------------


def test_the_agent_migrated_its_database_to_head_at_start(agent: RegistryProcess) -> None:
    engine = create_registry_engine(agent.db_url)
    try:
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()
    if agent.db_url.startswith("sqlite"):
        assert (agent.run_dir / "registry" / "registry.db").exists()
        with sqlite3.connect(agent.run_dir / "registry" / "registry.db") as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_register_search_promote_roll_back_and_download(
    stub: registry_pb2_grpc.RegistryServiceStub, unique_name: str
) -> None:
    name = f"{unique_name}-mlp"
    versions = [
        register(
            stub,
            name,
            files_for(f"{name}{i}"),
            metrics={"accuracy": acc, "val_loss": 1 - acc},
            tags={"dataset": "mnist1d", "arch": arch},
            lineage=registry_pb2.Lineage(job_id=f"job-{i}", parent_version=i),
            actor="trainer",
        )
        for i, (acc, arch) in enumerate(
            [(0.80, "mlp"), (0.90, "mlp"), (0.95, "cnn"), (0.97, "mlp")]
        )
    ]
    assert [v.version for v in versions] == [1, 2, 3, 4]
    assert versions[1].lineage.parent_version == 1 and versions[1].lineage.job_id == "job-1"

    got = stub.GetModelVersion(registry_pb2.GetModelVersionRequest(model=ref(name, version=2)))
    assert got.model_version == versions[1]

    # search: a tag and a metric filter, best accuracy first, one per page
    request = registry_pb2.SearchModelVersionsRequest(
        name=name,
        tags={"arch": "mlp"},
        metric_filters=[
            registry_pb2.MetricFilter(
                metric="accuracy", op=registry_pb2.COMPARISON_OP_GE, value=0.9
            )
        ],
        order_by=registry_pb2.SortOrder(field="metrics.accuracy", descending=True),
        page=common_pb2.PageRequest(page_size=1),
    )
    found: list[int] = []
    for _ in range(10):
        page = stub.SearchModelVersions(request)
        assert page.page.total_size == 2
        found += [v.version for v in page.model_versions]
        if not page.page.next_page_token:
            break
        request.page.page_token = page.page.next_page_token
    assert found == [4, 2]

    # canary, then production; every read carries the aliases
    stub.SetAlias(registry_pb2.SetAliasRequest(name=name, alias="canary", version=4, actor="ci"))
    promoted = stub.SetAlias(
        registry_pb2.SetAliasRequest(
            name=name, alias="production", version=2, actor="cli:alice", reason="first release"
        )
    )
    assert promoted.entry.from_version == 0 and promoted.entry.to_version == 2
    moved = stub.SetAlias(
        registry_pb2.SetAliasRequest(
            name=name,
            alias="production",
            version=4,
            expected_version=2,
            actor="router",
            reason="canary healthy",
        )
    )
    assert list(moved.model_version.aliases) == ["canary", "production"]
    default = stub.GetModelVersion(registry_pb2.GetModelVersionRequest(model=ref(name)))
    assert default.model_version.version == 4  # no selector means production

    rolled = stub.Rollback(
        registry_pb2.RollbackRequest(name=name, alias="production", actor="router", reason="errors")
    )
    assert rolled.model_version.version == 2 and list(rolled.model_version.aliases) == [
        "production"
    ]
    assert rolled.entry.action == registry_pb2.ALIAS_ACTION_ROLLBACK

    history = stub.GetAliasHistory(
        registry_pb2.GetAliasHistoryRequest(name=name, alias="production")
    ).entries
    assert [(e.from_version, e.to_version, e.actor) for e in history] == [
        (4, 2, "router"),
        (2, 4, "router"),
        (0, 2, "cli:alice"),
    ]
    # what was live at each point of the history, from the history alone
    records = entries_as_records(
        stub.GetAliasHistory(registry_pb2.GetAliasHistoryRequest(name=name)).entries
    )
    oldest_first = sorted(records, key=lambda e: e.seq)
    live_after = [aliases_at(records, e.at_us).get("production", 0) for e in oldest_first]
    assert live_after[-1] == 2 and 4 in live_after
    assert aliases_at(records, oldest_first[0].at_us - 1) == {}

    listed = stub.ListModels(registry_pb2.ListModelsRequest(name_prefix=unique_name)).models
    assert [(m.name, m.latest_version, m.version_count) for m in listed] == [(name, 4, 4)]
    assert dict(listed[0].aliases) == {"canary": 4, "production": 2}

    # download by alias: header first, then bytes that hash to the header's sha256
    header, chunks = download(stub, ref(name, alias="production"), "model.pt2", chunk_size=1000)
    assert (header.model_name, header.version, header.file.name) == (name, 2, "model.pt2")
    data = b"".join(c.data for c in chunks)
    assert sha(data) == header.file.sha256 == versions[1].files[0].sha256
    assert data == files_for(f"{name}1")["model.pt2"]
    assert [c.offset for c in chunks] == [0, 1000, 2000]


def test_alias_changes_are_published_as_model_events(
    stub: registry_pb2_grpc.RegistryServiceStub, system_nats_url: str, unique_name: str
) -> None:
    name = f"{unique_name}-events"

    async def run() -> list[tuple[str, dict[str, Any]]]:
        nc = await nats.connect(system_nats_url)
        try:
            sub = await nc.subscribe(f"events.model.{name}.>")
            await nc.flush()
            await asyncio.to_thread(register, stub, name, None, aliases=["canary"])
            await asyncio.to_thread(register, stub, name)
            await asyncio.to_thread(
                stub.SetAlias, registry_pb2.SetAliasRequest(name=name, alias="canary", version=2)
            )
            await asyncio.to_thread(
                stub.Rollback, registry_pb2.RollbackRequest(name=name, alias="canary")
            )
            received = []
            for _ in range(5):
                msg = await sub.next_msg(timeout=10)
                received.append((msg.subject, json.loads(msg.data)))
            return received
        finally:
            await nc.close()

    received = asyncio.run(run())
    prefix = f"events.model.{name}."
    assert [
        (s.removeprefix(prefix), p.get("version", p.get("to_version"))) for s, p in received
    ] == [
        ("registered", 1),
        ("promoted", 1),
        ("registered", 2),
        ("promoted", 2),
        ("rolled_back", 1),
    ]
    assert received[4][1]["from_version"] == 2


def test_a_corrupted_artifact_is_refused_and_never_served(
    stub: registry_pb2_grpc.RegistryServiceStub, agent: RegistryProcess, unique_name: str
) -> None:
    name = f"{unique_name}-corrupt"
    version = register(stub, name)
    digest = version.files[0].sha256
    path = agent.run_dir / "registry" / "artifacts" / digest[:2] / digest
    assert path.exists()
    os.chmod(path, 0o644)
    damaged = bytearray(path.read_bytes())
    damaged[100] ^= 0xFF
    path.write_bytes(bytes(damaged))
    received: list[registry_pb2.DownloadArtifactResponse] = []
    with pytest.raises(grpc.RpcError) as err:
        for response in stub.DownloadArtifact(
            registry_pb2.DownloadArtifactRequest(model=ref(name, version=1), file_name="model.pt2"),
            timeout=30,
        ):
            received.append(response)
    assert err.value.code() == grpc.StatusCode.DATA_LOSS
    assert received == []  # not even the header
    # the undamaged file of the same version is still served
    header, chunks = download(stub, ref(name, version=1), "manifest.json")
    assert sha(b"".join(c.data for c in chunks)) == header.file.sha256


def test_simultaneous_registrations_of_one_name_get_distinct_versions(
    stub: registry_pb2_grpc.RegistryServiceStub, unique_name: str
) -> None:
    name = f"{unique_name}-race"
    count = 8
    with ThreadPoolExecutor(count) as pool:
        futures = [
            pool.submit(register, stub, name, files_for(f"{name}{i}"), tags={"i": str(i)})
            for i in range(count)
        ]
        versions = [f.result(timeout=60) for f in futures]
    assert sorted(v.version for v in versions) == list(range(1, count + 1))
    for v in versions:  # each number went to the upload that got it
        stored = stub.GetModelVersion(
            registry_pb2.GetModelVersionRequest(model=ref(name, version=v.version))
        ).model_version
        assert stored.tags["i"] == v.tags["i"] and stored.files == v.files


def test_deleting_an_aliased_version_and_aliasing_a_deleted_one_are_refused(
    stub: registry_pb2_grpc.RegistryServiceStub, unique_name: str
) -> None:
    name = f"{unique_name}-delete"
    register(stub, name, aliases=["production"])
    register(stub, name, files_for(f"{name}2"))
    refused = rpc_error(
        stub.DeleteModelVersion, registry_pb2.DeleteModelVersionRequest(name=name, version=1)
    )
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "production" in (refused.details() or "")
    stub.DeleteModelVersion(registry_pb2.DeleteModelVersionRequest(name=name, version=2))
    missing = rpc_error(
        stub.SetAlias, registry_pb2.SetAliasRequest(name=name, alias="canary", version=2)
    )
    assert missing.code() == grpc.StatusCode.NOT_FOUND
    gone = rpc_error(
        stub.GetModelVersion, registry_pb2.GetModelVersionRequest(model=ref(name, version=2))
    )
    assert gone.code() == grpc.StatusCode.NOT_FOUND
    stub.DeleteModelVersion(
        registry_pb2.DeleteModelVersionRequest(
            name=name, version=1, force=True, actor="ops", reason="retired"
        )
    )
    latest = stub.GetAliasHistory(registry_pb2.GetAliasHistoryRequest(name=name)).entries[0]
    assert (latest.alias, latest.action, latest.actor) == (
        "production",
        registry_pb2.ALIAS_ACTION_DELETE,
        "ops",
    )
    after = rpc_error(stub.GetModelVersion, registry_pb2.GetModelVersionRequest(model=ref(name)))
    assert after.code() == grpc.StatusCode.NOT_FOUND


def test_unknown_models_are_not_found_and_bad_input_names_its_field(
    stub: registry_pb2_grpc.RegistryServiceStub, unique_name: str
) -> None:
    unknown = rpc_error(
        stub.GetModelVersion, registry_pb2.GetModelVersionRequest(model=ref(f"{unique_name}-none"))
    )
    assert unknown.code() == grpc.StatusCode.NOT_FOUND

    def invalid(call: Any, request: Any) -> str:
        err = rpc_error(call, request)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        return (err.details() or "").split(":", 1)[0]

    assert invalid(stub.GetModelVersion, registry_pb2.GetModelVersionRequest(model=ref("a.b"))) == (
        "model.name"
    )
    assert (
        invalid(
            stub.SetAlias, registry_pb2.SetAliasRequest(name=unique_name, alias="Prod", version=1)
        )
        == "alias"
    )
    bad_filter = registry_pb2.SearchModelVersionsRequest(
        metric_filters=[registry_pb2.MetricFilter(metric="accuracy", value=0.5)]
    )
    assert invalid(stub.SearchModelVersions, bad_filter) == "metric_filters[0].op"
    bad_token = registry_pb2.SearchModelVersionsRequest(
        page=common_pb2.PageRequest(page_token="garbage")
    )
    assert invalid(stub.SearchModelVersions, bad_token) == "page.page_token"

    name = f"{unique_name}-bad"
    files = files_for(name)
    chunks_first = list(upload(name, files))[1:]
    assert invalid(stub.RegisterModel, iter(chunks_first)) == "metadata"
    requests = list(upload(name, files))
    requests[2].chunk.chunk.offset += 1  # second chunk of model.pt2 leaves a gap
    assert invalid(stub.RegisterModel, iter(requests)) == "chunk.chunk.offset"
    unlisted = list(upload(name, files))
    unlisted[1].chunk.file_name = "weights.bin"
    assert invalid(stub.RegisterModel, iter(unlisted)) == "chunk.file_name"
    bad_meta = list(upload(name, files, aliases=["Canary"]))
    assert invalid(stub.RegisterModel, iter(bad_meta)) == "metadata.aliases[0]"

    tampered = list(upload(name, files))
    tampered[1].chunk.chunk.data = b"X" + tampered[1].chunk.chunk.data[1:]
    data_loss = rpc_error(stub.RegisterModel, iter(tampered))
    assert data_loss.code() == grpc.StatusCode.DATA_LOSS
    truncated = list(upload(name, files))[:-1]
    assert rpc_error(stub.RegisterModel, iter(truncated)).code() == grpc.StatusCode.DATA_LOSS
    # nothing of the refused uploads was stored
    assert rpc_error(
        stub.GetModelVersion, registry_pb2.GetModelVersionRequest(model=ref(name, version=1))
    ).code() == (grpc.StatusCode.NOT_FOUND)


def test_a_multi_megabyte_artifact_round_trips_in_chunks_and_resumes(
    stub: registry_pb2_grpc.RegistryServiceStub, unique_name: str
) -> None:
    name = f"{unique_name}-big"
    big = os.urandom(3 * 1024 * 1024 + 123)
    files = {"model.pt2": big, "manifest.json": b"{}"}
    version = register(stub, name, files, chunk_size=256 * 1024)
    assert version.files[0].size_bytes == len(big)
    _, chunks = download(stub, ref(name, version=1), "model.pt2")
    assert len(chunks) == 4  # 1 MiB default chunks
    assert b"".join(c.data for c in chunks) == big
    offset = 2 * 1024 * 1024 + 7
    _, rest = download(stub, ref(name, version=1), "model.pt2", offset=offset, chunk_size=500_000)
    assert rest[0].offset == offset
    assert b"".join(c.data for c in rest) == big[offset:]
