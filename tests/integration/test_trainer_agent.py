"""The trainer agent as a real process over real gRPC, with real NATS and Redis.

One trainer serves the quick tests; its config names a compiler and a seed
selector on ports nobody listens on (growth is unavailable there). Resuming
after a SIGKILL and growing with real compiler and selector agents start
processes of their own.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import nats
import pytest
import torch
import yaml
from rich.console import Console
from safetensors.torch import load_file

from common.config import load_config
from common.health import HealthStatus, check_health
from common.stubs import common_pb2, registry_pb2, registry_pb2_grpc, trainer_pb2, trainer_pb2_grpc
from services.trainer import cli
from services.trainer.cli import spec_from_mapping
from tests.integration.mesh import ROOT
from tests.ports import free_port
from tests.wait import wait_until

pytestmark = pytest.mark.integration

TERMINAL = {
    common_pb2.JOB_STATE_SUCCEEDED,
    common_pb2.JOB_STATE_FAILED,
    common_pb2.JOB_STATE_CANCELLED,
}


def spirals(**overrides: Any) -> dict[str, Any]:
    """A small two-spirals job in the YAML form the CLI reads."""
    spec: dict[str, Any] = {
        "name": "spirals",
        "model": {"template": "mlp", "params": {"hidden": [16, 16]}},
        "data": {
            "dataset": "two_spirals",
            "batch_size": 32,
            "params": {"samples": 600, "test_samples": 200},
        },
        "optimizer": {"name": "adamw", "lr": 0.01},
        "max_steps": 60,
        "eval_every_steps": 10,
        "checkpoint_every_steps": 20,
        "seed": 7,
        "device": "cpu",
        "deterministic": True,
    }
    spec.update(overrides)
    return spec


def growing(**growth: Any) -> dict[str, Any]:
    """Two slots on an 8-wide MLP; every validation round is a plateau; short phases."""
    settings: dict[str, Any] = {
        "enabled": True,
        "plateau_patience": 1,
        "plateau_min_delta": 10.0,
        "seed_training_steps": 8,
        "blend_steps": 8,
        "holding_steps": 4,
        "embargo_steps": 5,
        "blueprints": ["bottleneck_mlp"],
        "strategy": "ucb1",
    }
    settings.update(growth)
    return spirals(
        model={"template": "mlp", "params": {"hidden": [8, 8]}},
        slots=[{"module_path": "blocks.0.fc"}, {"module_path": "blocks.1.fc"}],
        max_steps=50,
        growth=settings,
    )


def agent_env(
    name: str, port: int, health_port: int, run_dir: Path, *, nats_url: str, redis_url: str
) -> dict[str, str]:
    env = {
        **os.environ,
        "GRAFTMESH_AGENT": name,
        "GRAFTMESH_GROUP": "core",
        "GRAFTMESH_MACHINE": "mainpc",
        "GRAFTMESH_HOST": "127.0.0.1",
        "GRAFTMESH_PORT": str(port),
        "GRAFTMESH_HEALTH_PORT": str(health_port),
        "GRAFTMESH_NATS_URL": nats_url,
        "GRAFTMESH_REDIS_URL": redis_url,
        "GRAFTMESH_RUN_DIR": str(run_dir),
    }
    for key in ("GRAFTMESH_CONFIG", "GRAFTMESH_METRICS_PORT"):
        env.pop(key, None)
    return env


class Proc:
    """An agent subprocess (`python -m <module>`) on free ports."""

    def __init__(
        self, module: str, name: str, run_dir: Path, nats_url: str, redis_url: str, **extra: str
    ) -> None:
        self.module, self.name, self.run_dir = module, name, run_dir
        self.port, self.health_port = free_port(), free_port()
        self.env = {
            **agent_env(
                name, self.port, self.health_port, run_dir, nats_url=nats_url, redis_url=redis_url
            ),
            **extra,
        }
        self.log = run_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.module],
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def health(self) -> Any:
        return asyncio.run(check_health("127.0.0.1", self.health_port, 0.5))

    def wait_healthy(self, timeout_s: float = 60) -> None:
        try:
            wait_until(
                lambda: self.health().status is HealthStatus.HEALTHY,
                timeout_s,
                f"{self.name} healthy",
            )
        except AssertionError:
            raise AssertionError(self.log.read_text(errors="replace")[-4000:]) from None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()


class Trainer(Proc):
    def __init__(
        self, run_dir: Path, nats_url: str, redis_url: str, name: str, **extra: str
    ) -> None:
        super().__init__("services.trainer", name, run_dir, nats_url, redis_url, **extra)

    def stub(self) -> trainer_pb2_grpc.TrainerServiceStub:
        channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        return trainer_pb2_grpc.TrainerServiceStub(channel)

    def submit(self, spec: dict[str, Any], request_id: str = "") -> trainer_pb2.Job:
        request = trainer_pb2.SubmitJobRequest(spec=spec_from_mapping(spec), request_id=request_id)
        job: trainer_pb2.Job = self.stub().SubmitJob(request, timeout=30).job
        return job

    def get(self, job_id: str) -> trainer_pb2.Job:
        job: trainer_pb2.Job = (
            self.stub().GetJob(trainer_pb2.GetJobRequest(job_id=job_id), timeout=10).job
        )
        return job

    def wait_done(self, job_id: str, timeout_s: float = 120) -> trainer_pb2.Job:
        def done() -> trainer_pb2.Job | None:
            job = self.get(job_id)
            return job if job.state in TERMINAL else None

        try:
            return wait_until(done, timeout_s, f"job {job_id} done", poll_s=0.1)
        except AssertionError:
            raise AssertionError(self.log.read_text(errors="replace")[-4000:]) from None

    def watch(self, job_id: str, after: int = 0) -> list[trainer_pb2.JobEvent]:
        replies = self.stub().WatchJob(
            trainer_pb2.WatchJobRequest(job_id=job_id, after_sequence=after), timeout=120
        )
        return [r.event for r in replies]

    def job_dir(self, job_id: str) -> Path:
        return self.run_dir / "trainer" / "jobs" / job_id


def write_config(
    path: Path, nats_url: str, redis_url: str, agents: dict[str, dict[str, Any]]
) -> Path:
    """A startup config that names `agents` (module, port, health port) for discovery."""
    config = {
        "version": 1,
        "machine": "mainpc",
        "infra": {"nats_url": nats_url, "redis_url": redis_url, "embedded": "never"},
        "supervisor": {"control_port": free_port(), "run_dir": str(path.parent / "run")},
        "machines": {"mainpc": {"host": "127.0.0.1"}},
        "agent_groups": {"core": {"machine": "mainpc", "agents": agents}},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def dead_agents(unique: str) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """Trainer env and config entries naming a compiler and a selector that are not running."""
    names = {"compiler": f"{unique}c", "selector": f"{unique}s", "registry": f"{unique}r"}
    entries = {
        names["compiler"]: {
            "module": "services.compiler",
            "port": free_port(),
            "health_check_port": free_port(),
        },
        names["selector"]: {
            "module": "services.seed_selector",
            "port": free_port(),
            "health_check_port": free_port(),
        },
    }
    env = {
        "GRAFTMESH_TRAINER_COMPILER": names["compiler"],
        "GRAFTMESH_TRAINER_SELECTOR": names["selector"],
        "GRAFTMESH_TRAINER_REGISTRY": names["registry"],
    }
    return env, entries


@pytest.fixture(scope="module")
def trainer(
    tmp_path_factory: pytest.TempPathFactory, system_nats_url: str, system_redis_url: str
) -> Iterator[Trainer]:
    root = tmp_path_factory.mktemp("trainer")
    unique = f"t{os.getpid()}x{free_port()}"
    env, entries = dead_agents(unique)
    config = write_config(root / "startup_config.yaml", system_nats_url, system_redis_url, entries)
    agent = Trainer(
        root / "run",
        system_nats_url,
        system_redis_url,
        f"{unique}t",
        GRAFTMESH_CONFIG=str(config),
        **env,
    )
    try:
        agent.wait_healthy()
        yield agent
    finally:
        agent.stop()


def test_job_succeeds_streams_its_progress_and_exports_a_loadable_model(
    trainer: Trainer, system_nats_url: str
) -> None:
    async def published(job_id_box: list[str]) -> dict[str, Any]:
        nc = await nats.connect(system_nats_url)
        sub = await nc.subscribe("events.job.*.succeeded")
        job = await asyncio.to_thread(trainer.submit, spirals())
        job_id_box.append(job.job_id)
        try:
            for _ in range(50):
                msg = await sub.next_msg(timeout=120)
                payload: dict[str, Any] = json.loads(msg.data)
                if payload["job_id"] == job.job_id:
                    assert msg.subject == f"events.job.{job.job_id}.succeeded"
                    return payload
            raise AssertionError("no succeeded event of the job")
        finally:
            await nc.close()

    box: list[str] = []
    payload = asyncio.run(published(box))
    job_id = box[0]
    assert payload["state"] == "succeeded"
    events = trainer.watch(job_id)
    kinds = [e.WhichOneof("payload") for e in events]
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    changes = [
        (e.state_change.from_state, e.state_change.to_state)
        for e in events
        if e.HasField("state_change")
    ]
    assert changes == [
        (common_pb2.JOB_STATE_PENDING, common_pb2.JOB_STATE_QUEUED),
        (common_pb2.JOB_STATE_QUEUED, common_pb2.JOB_STATE_RUNNING),
        (common_pb2.JOB_STATE_RUNNING, common_pb2.JOB_STATE_SUCCEEDED),
    ]
    steps = [e.step for e in events if e.HasField("progress")]
    assert steps == sorted(steps) and steps[-1] == 60
    assert any(e.HasField("progress") and e.progress.HasField("val_loss") for e in events)
    assert kinds.count("checkpoint_saved") >= 3
    # Resumable: after a sequence, only what follows.
    assert [e.sequence for e in trainer.watch(job_id, after=events[-3].sequence)] == [
        events[-2].sequence,
        events[-1].sequence,
    ]
    job = trainer.get(job_id)
    assert job.progress.step == 60 and job.progress.total_steps == 60
    assert job.last_event_sequence == events[-1].sequence and job.checkpoint_path
    model_dir = trainer.job_dir(job_id) / "model"
    for name in ("model.pt2", "model.safetensors", "manifest.json"):
        assert (model_dir / name).is_file()
    program = torch.export.load(str(model_dir / "model.pt2"))
    out = program.module()(torch.zeros(5, 2))
    assert out.shape == (5, 2)
    listed = trainer.stub().ListJobs(
        trainer_pb2.ListJobsRequest(states=[common_pb2.JOB_STATE_SUCCEEDED]), timeout=10
    )
    assert job_id in [j.job_id for j in listed.jobs]


def test_invalid_spec_is_invalid_argument_naming_the_field_and_creates_no_job(
    trainer: Trainer,
) -> None:
    before = trainer.stub().ListJobs(trainer_pb2.ListJobsRequest(), timeout=10).page.total_size
    for spec, field in (
        (spirals(growth={"blend_steps": -1}), "spec.growth.blend_steps"),
        (spirals(model={"template": "nope"}), "spec.model.template"),
        (spirals(max_steps=0, epochs=0), "spec"),
    ):
        with pytest.raises(grpc.RpcError) as refused:
            trainer.submit(spec)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in str(refused.value.details())
    after = trainer.stub().ListJobs(trainer_pb2.ListJobsRequest(), timeout=10).page.total_size
    assert after == before


def test_request_id_makes_submit_idempotent(trainer: Trainer) -> None:
    first = trainer.submit(spirals(max_steps=10))
    again = trainer.submit(spirals(max_steps=10))
    assert again.job_id != first.job_id  # no request id: a new job each time
    key = f"idem-{first.job_id}"
    one = trainer.submit(spirals(max_steps=10), request_id=key)
    two = trainer.submit(spirals(max_steps=10), request_id=key)
    assert one.job_id == two.job_id
    for job_id in (first.job_id, again.job_id, one.job_id):
        trainer.wait_done(job_id)


def test_health_answers_while_a_job_trains_and_cancel_stops_it(trainer: Trainer) -> None:
    job = trainer.submit(spirals(max_steps=200_000, checkpoint_every_steps=0, eval_every_steps=100))
    wait_until(lambda: trainer.get(job.job_id).progress.step > 0, 60, "training under way")
    health = trainer.health()
    assert health.status is HealthStatus.HEALTHY
    details = health.reply["details"]
    assert details["running_jobs"] == 1 and details["hardware"]["cpu_cores"] >= 1
    cancelled = (
        trainer.stub()
        .CancelJob(trainer_pb2.CancelJobRequest(job_id=job.job_id, reason="enough"), timeout=10)
        .job
    )
    assert cancelled.state in (common_pb2.JOB_STATE_RUNNING, common_pb2.JOB_STATE_CANCELLED)
    done = trainer.wait_done(job.job_id)
    assert done.state == common_pb2.JOB_STATE_CANCELLED and done.message == "enough"
    assert done.progress.step < 200_000
    # Cancelling again changes nothing; a finished job cannot be cancelled.
    again = (
        trainer.stub().CancelJob(trainer_pb2.CancelJobRequest(job_id=job.job_id), timeout=10).job
    )
    assert again.state == common_pb2.JOB_STATE_CANCELLED


def test_compiler_down_job_succeeds_without_growth_and_says_so(trainer: Trainer) -> None:
    job = trainer.submit(growing())
    done = trainer.wait_done(job.job_id)
    assert done.state == common_pb2.JOB_STATE_SUCCEEDED, done.message
    assert "growth unavailable" in done.message
    assert done.progress.metrics["growth_available"] == 0.0
    assert (
        all(s.state == common_pb2.SEED_STATE_DORMANT for s in done.slots) and len(done.slots) == 2
    )
    with pytest.raises(grpc.RpcError) as refused:
        trainer.stub().CancelJob(trainer_pb2.CancelJobRequest(job_id=job.job_id), timeout=10)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.slow
def test_trainer_killed_mid_training_resumes_to_the_same_weights(
    trainer: Trainer, tmp_path: Path, system_nats_url: str, system_redis_url: str
) -> None:
    spec = spirals(max_steps=1500, eval_every_steps=250, checkpoint_every_steps=50)
    victim = Trainer(tmp_path / "run", system_nats_url, system_redis_url, f"{trainer.name}k")
    try:
        victim.wait_healthy()
        job = victim.submit(spec)
        wait_until(
            lambda: victim.get(job.job_id).progress.step >= 300, 60, "training past step 300"
        )
        victim.kill()
        step_at_kill = max(
            int(p.name.split("-")[1].split(".")[0])
            for p in (victim.job_dir(job.job_id) / "checkpoints").glob("step-*.json")
        )
        assert 0 < step_at_kill < 1500
        victim.start()
        victim.wait_healthy()
        resumed = victim.wait_done(job.job_id)
        assert resumed.state == common_pb2.JOB_STATE_SUCCEEDED, resumed.message
        events = victim.watch(job.job_id)
        messages = [e.state_change.message for e in events if e.HasField("state_change")]
        assert "resuming from the last checkpoint" in messages
        # The restarted trainer went on from the checkpoint, not from step 0.
        steps = [e.step for e in events if e.HasField("progress")]
        assert steps and min(steps) > step_at_kill
    finally:
        victim.stop()
    straight = trainer.submit(spec)
    assert trainer.wait_done(straight.job_id).state == common_pb2.JOB_STATE_SUCCEEDED
    a = load_file(str(victim.job_dir(job.job_id) / "model" / "model.safetensors"))
    b = load_file(str(trainer.job_dir(straight.job_id) / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_growth_grafts_a_kernel_with_compiler_and_selector_agents(
    tmp_path: Path, system_nats_url: str, system_redis_url: str, unique_name: str
) -> None:
    compiler = Proc(
        "services.compiler",
        f"{unique_name}c",
        tmp_path / "compiler",
        system_nats_url,
        system_redis_url,
        GRAFTMESH_COMPILER_MAX_LATENCY_RATIO="1e9",
    )
    selector = Proc(
        "services.seed_selector",
        f"{unique_name}s",
        tmp_path / "selector",
        system_nats_url,
        system_redis_url,
        SEED_SELECTOR_KEY_PREFIX=f"graftmesh:test:{unique_name}:",
    )
    agents = {
        p.name: {"module": p.module, "port": p.port, "health_check_port": p.health_port}
        for p in (compiler, selector)
    }
    config = write_config(
        tmp_path / "startup_config.yaml", system_nats_url, system_redis_url, agents
    )
    grower = Trainer(
        tmp_path / "trainer",
        system_nats_url,
        system_redis_url,
        f"{unique_name}t",
        GRAFTMESH_CONFIG=str(config),
        GRAFTMESH_TRAINER_COMPILER=compiler.name,
        GRAFTMESH_TRAINER_SELECTOR=selector.name,
    )
    try:
        for proc in (compiler, selector, grower):
            proc.wait_healthy(90)
        job = grower.submit(growing())
        done = grower.wait_done(job.job_id, 180)
        assert done.state == common_pb2.JOB_STATE_SUCCEEDED, done.message
        events = grower.watch(job.job_id)
        grafts = [
            e.slot_transition
            for e in events
            if e.HasField("slot_transition")
            and e.slot_transition.from_state == common_pb2.SEED_STATE_DORMANT
            and e.slot_transition.to_state == common_pb2.SEED_STATE_GERMINATED
        ]
        assert grafts, [e.slot_transition for e in events if e.HasField("slot_transition")]
        assert grafts[0].blueprint == "bottleneck_mlp" and len(grafts[0].kernel_id) == 64
        assert "growth unavailable" not in done.message
    finally:
        for proc in (grower, selector, compiler):
            proc.stop()


@pytest.mark.slow
def test_register_as_uploads_the_model_with_lineage_to_the_registry_agent(
    trainer: Trainer, tmp_path: Path, system_nats_url: str, system_redis_url: str
) -> None:
    registry = Proc(
        "services.registry",
        trainer.env["GRAFTMESH_TRAINER_REGISTRY"],
        tmp_path / "registry",
        system_nats_url,
        system_redis_url,
    )
    try:
        registry.wait_healthy(90)
        name = f"spirals-{registry.name}"
        job = trainer.submit(spirals(register_as=name, tags={"team": "graft"}))
        done = trainer.wait_done(job.job_id)
        assert done.state == common_pb2.JOB_STATE_SUCCEEDED, done.message
        assert done.registered_model.name == name and done.registered_model.version == 1
        with grpc.insecure_channel(f"127.0.0.1:{registry.port}") as channel:
            stored = (
                registry_pb2_grpc.RegistryServiceStub(channel)
                .GetModelVersion(
                    registry_pb2.GetModelVersionRequest(
                        model=common_pb2.ModelRef(name=name, version=1)
                    ),
                    timeout=10,
                )
                .model_version
            )
        assert stored.lineage.job_id == job.job_id and stored.tags["team"] == "graft"
        assert {f.name for f in stored.files} == {"model.pt2", "model.safetensors", "manifest.json"}
        manifest = json.loads((trainer.job_dir(job.job_id) / "model" / "manifest.json").read_text())
        assert {f.name: f.sha256 for f in stored.files}["model.pt2"] == manifest["files"][
            "model.pt2"
        ]["sha256"]
        stats = stored.reference_statistics
        assert stats.sample_count > 0 and len(stats.inputs[0].mean) == 2
        assert "val_loss" in stored.metrics
    finally:
        registry.stop()


def test_register_as_without_a_registry_fails_the_job_and_keeps_the_export(
    trainer: Trainer,
) -> None:
    job = trainer.submit(spirals(max_steps=10, register_as="nowhere"))
    done = trainer.wait_done(job.job_id)
    assert done.state == common_pb2.JOB_STATE_FAILED
    assert "registry agent" in done.message
    assert (trainer.job_dir(job.job_id) / "model" / "model.pt2").is_file()


def readme_example() -> str:
    """The README's example job (so the documented example keeps working), unregistered:
    this test runs no registry."""
    spec = yaml.safe_load((ROOT / "examples" / "spirals-growing.yaml").read_text())
    spec.pop("register_as")
    return yaml.safe_dump(spec)


def test_cli_trains_the_readme_example_and_lists_shows_and_cancels_jobs(
    trainer: Trainer, tmp_path: Path, system_nats_url: str, system_redis_url: str
) -> None:
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(readme_example())
    cfg = load_config(
        write_config(tmp_path / "startup_config.yaml", system_nats_url, system_redis_url, {})
    )
    console = Console(file=io.StringIO(), width=200)
    assert cli.train(cfg, spec_path, False, console, agent=trainer.name) == cli.EXIT_OK
    shown = console.file.getvalue()  # type: ignore[attr-defined]
    assert "SUCCEEDED" in shown and "growth unavailable" in shown
    job_id = shown.split("submitted ", 1)[1].split()[0]
    assert trainer.get(job_id).spec.growth.blend_schedule == trainer_pb2.BLEND_SCHEDULE_COSINE
    listing = Console(file=io.StringIO(), width=200)
    assert cli.jobs(cfg, listing, agent=trainer.name) == cli.EXIT_OK
    assert job_id in listing.file.getvalue()  # type: ignore[attr-defined]
    assert cli.job(cfg, job_id, Console(file=io.StringIO()), agent=trainer.name) == cli.EXIT_OK
    assert (
        cli.job(cfg, "job-nope", Console(file=io.StringIO()), agent=trainer.name) == cli.EXIT_USAGE
    )
    assert (
        cli.cancel(cfg, job_id, Console(file=io.StringIO()), agent=trainer.name) == cli.EXIT_FAILED
    )
    detached = Console(file=io.StringIO())
    long_spec = tmp_path / "long.yaml"
    long_spec.write_text(yaml.safe_dump(spirals(max_steps=200_000, checkpoint_every_steps=0)))
    assert cli.train(cfg, long_spec, True, detached, agent=trainer.name) == cli.EXIT_OK
    long_id = detached.file.getvalue().split("submitted ", 1)[1].split()[0]  # type: ignore[attr-defined]
    assert cli.cancel(cfg, long_id, Console(file=io.StringIO()), agent=trainer.name) == cli.EXIT_OK
    assert trainer.wait_done(long_id).state == common_pb2.JOB_STATE_CANCELLED
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {template: mlp}\nwhat: 1\n")
    assert (
        cli.train(cfg, bad, True, Console(file=io.StringIO()), agent=trainer.name) == cli.EXIT_USAGE
    )
