"""The seed selector agent as a real process: gRPC on one side, real Redis on the other."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import nats
import pytest
import redis

from common.health import HealthResult, HealthStatus, check_health
from common.infra import EmbeddedServer
from common.process import orphan_proof
from common.stubs import common_pb2, seed_selector_pb2, seed_selector_pb2_grpc
from tests.integration.mesh import ROOT
from tests.ports import free_port
from tests.wait import wait_until

pytestmark = pytest.mark.integration

pb = seed_selector_pb2
DORMANT = common_pb2.SEED_STATE_DORMANT


class SelectorAgent:
    """`python -m services.seed_selector` with the supervisor's environment, on free ports."""

    def __init__(
        self, run_dir: Path, nats_url: str, redis_url: str, prefix: str, **env: str
    ) -> None:
        self.name = f"selector-{uuid.uuid4().hex[:8]}"
        self.port = free_port()
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
            "SEED_SELECTOR_KEY_PREFIX": prefix,
            **env,
        }
        full_env.pop("GRAFTMESH_CONFIG", None)
        # As the supervisor starts agents: no Python between fork and exec, which could
        # hang beside this process's gRPC threads.
        argv, preexec = orphan_proof([sys.executable, "-m", "services.seed_selector"])
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                argv,
                cwd=ROOT,
                env=full_env,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=preexec,  # noqa: PLW1509 -- None where setpriv is available
            )
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = seed_selector_pb2_grpc.SeedSelectorServiceStub(self.channel)

    def health(self) -> HealthResult:
        return asyncio.run(check_health("127.0.0.1", self.health_port, 0.5))

    def wait_healthy(self) -> None:
        try:
            wait_until(lambda: self.health().status is HealthStatus.HEALTHY, 30, "agent healthy")
        except AssertionError:
            raise AssertionError(self.log.read_text()) from None

    def stop(self) -> int:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)

    def kill(self) -> None:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _delete_prefix(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=500))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def prefix(system_redis_url: str) -> Iterator[str]:
    name = f"graftmesh:test:{uuid.uuid4().hex[:12]}:selector:"
    yield name
    _delete_prefix(system_redis_url, name)


@pytest.fixture
def start_agent(
    tmp_path: Path, system_nats_url: str, system_redis_url: str, prefix: str
) -> Iterator[Any]:
    """Starts agents on the system NATS and Redis under the test's key prefix."""
    agents: list[SelectorAgent] = []

    def start(redis_url: str = system_redis_url, **env: str) -> SelectorAgent:
        agent = SelectorAgent(tmp_path, system_nats_url, redis_url, prefix, **env)
        agents.append(agent)
        agent.wait_healthy()
        return agent

    yield start
    for agent in agents:
        agent.kill()


@pytest.fixture(scope="module")
def shared_agent(
    tmp_path_factory: pytest.TempPathFactory, system_nats_url: str, system_redis_url: str
) -> Iterator[SelectorAgent]:
    """One agent for the tests that only talk to it (each uses jobs of its own)."""
    prefix = f"graftmesh:test:{uuid.uuid4().hex[:12]}:selector:"
    agent = SelectorAgent(
        tmp_path_factory.mktemp("selector"), system_nats_url, system_redis_url, prefix
    )
    try:
        agent.wait_healthy()
        yield agent
        assert agent.stop() == 0
    finally:
        agent.kill()
        _delete_prefix(system_redis_url, prefix)


@pytest.fixture
def stub(shared_agent: SelectorAgent) -> seed_selector_pb2_grpc.SeedSelectorServiceStub:
    return shared_agent.stub


def _job() -> str:
    return f"job-{uuid.uuid4().hex[:8]}"


def _arm(
    slot: str, blueprint: str = "mlp", *, state: int = DORMANT, params: int = 100, **features: float
) -> seed_selector_pb2.Arm:
    return pb.Arm(
        slot_id=slot,
        blueprint=blueprint,
        added_params=params,
        slot_state=state,  # type: ignore[arg-type]
        slot_features=features,
    )


def _rpc_error(call: Any, request: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=5)
    return caught.value


def _details(error: grpc.RpcError) -> str:
    return str(error.details())


# -- deciding -----------------------------------------------------------------------------


def test_select_scores_every_arm_and_explains_the_ineligible_ones(
    stub: seed_selector_pb2_grpc.SeedSelectorServiceStub,
) -> None:
    arms = [
        _arm("blocks.0", grad_norm=0.5),
        _arm("blocks.1", grad_norm=0.2),
        _arm("blocks.2", state=common_pb2.SEED_STATE_TRAINING),
        _arm("blocks.3", state=common_pb2.SEED_STATE_EMBARGOED),
        _arm("blocks.4", params=5000),
        _arm("blocks.0", grad_norm=0.5),
    ]
    response = stub.Select(pb.SelectRequest(job_id=_job(), arms=arms, param_budget=1000), timeout=5)

    assert response.has_decision and response.decision_id
    assert response.strategy == pb.SELECTION_STRATEGY_UCB1  # the contract's default
    assert (response.chosen.slot_id, response.chosen.blueprint) in {
        ("blocks.0", "mlp"),
        ("blocks.1", "mlp"),
    }
    assert dict(response.chosen.slot_features) in ({"grad_norm": 0.5}, {"grad_norm": 0.2})
    assert [(s.slot_id, s.blueprint) for s in response.scores] == [
        (a.slot_id, a.blueprint) for a in arms
    ]
    codes = [s.eligibility for s in response.scores]
    assert codes == [
        pb.ELIGIBILITY_ELIGIBLE,
        pb.ELIGIBILITY_ELIGIBLE,
        pb.ELIGIBILITY_SLOT_NOT_DORMANT,
        pb.ELIGIBILITY_SLOT_NOT_DORMANT,
        pb.ELIGIBILITY_OVER_PARAM_BUDGET,
        pb.ELIGIBILITY_DUPLICATE,
    ]
    never_reported = response.scores[0]
    assert math.isinf(never_reported.score) and never_reported.pulls == 0
    reasons = [s.eligibility_reason for s in response.scores]
    assert "training" in reasons[2]
    assert "embargoed" in reasons[3]
    assert "5000" in reasons[4] and "1000" in reasons[4]
    assert "arms[0]" in reasons[5]
    assert all(s.score == 0 for s in response.scores[2:])


def test_no_eligible_arm_means_no_decision_and_every_reason(
    stub: seed_selector_pb2_grpc.SeedSelectorServiceStub,
) -> None:
    arms = [_arm("blocks.0"), _arm("blocks.1", params=900), _arm("blocks.2", state=7)]
    request = pb.SelectRequest(
        job_id=_job(), arms=arms, param_budget=500, active_seeds=2, max_concurrent_seeds=2
    )
    response = stub.Select(request, timeout=5)

    assert not response.has_decision and response.decision_id == ""
    assert not response.HasField("chosen")
    assert "none eligible" in response.no_decision_reason
    assert "concurrency_cap_reached" in response.no_decision_reason
    assert [s.eligibility for s in response.scores] == [
        pb.ELIGIBILITY_CONCURRENCY_CAP,
        pb.ELIGIBILITY_CONCURRENCY_CAP,
        pb.ELIGIBILITY_SLOT_NOT_DORMANT,
    ]
    # An arm breaking several rules lists them all.
    assert "concurrency_cap_reached" in response.scores[1].eligibility_reason
    assert "over_param_budget" in response.scores[1].eligibility_reason
    assert "culled" in response.scores[2].eligibility_reason


def test_report_counts_in_stats_and_a_second_reward_is_refused(
    stub: seed_selector_pb2_grpc.SeedSelectorServiceStub,
) -> None:
    job = _job()
    decision = stub.Select(pb.SelectRequest(job_id=job, arms=[_arm("blocks.0")]), timeout=5)

    report = stub.Report(pb.ReportRequest(decision_id=decision.decision_id, reward=0.75), timeout=5)
    assert (report.arm.job_id, report.arm.slot_id, report.arm.blueprint) == (job, "blocks.0", "mlp")
    assert report.arm.pulls == 1 and report.arm.mean_reward == pytest.approx(0.75)
    assert report.arm.last_reward == pytest.approx(0.75)
    # The same report again (a client's retry) is answered and counted once.
    again = stub.Report(pb.ReportRequest(decision_id=decision.decision_id, reward=0.75), timeout=5)
    assert again.arm.pulls == 1
    refused = _rpc_error(
        stub.Report, pb.ReportRequest(decision_id=decision.decision_id, reward=0.1)
    )
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION

    stats = stub.GetStats(pb.SeedSelectorServiceGetStatsRequest(job_id=job), timeout=5)
    assert (stats.decisions, stats.reports, stats.open_decisions) == (1, 1, 0)
    assert [(a.slot_id, a.pulls) for a in stats.arms] == [("blocks.0", 1)]
    assert stats.arms[0].mean_reward == pytest.approx(0.75)


def test_report_of_an_unknown_decision_is_not_found(
    stub: seed_selector_pb2_grpc.SeedSelectorServiceStub,
) -> None:
    error = _rpc_error(stub.Report, pb.ReportRequest(decision_id=str(uuid.uuid4()), reward=1.0))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    missing = _rpc_error(stub.GetStats, pb.SeedSelectorServiceGetStatsRequest(job_id=_job()))
    assert missing.code() == grpc.StatusCode.NOT_FOUND


def test_reset_forgets_the_job_and_its_open_decisions(
    stub: seed_selector_pb2_grpc.SeedSelectorServiceStub,
) -> None:
    job, other = _job(), _job()
    arms = [_arm("blocks.0"), _arm("blocks.1")]
    first = stub.Select(pb.SelectRequest(job_id=job, arms=arms), timeout=5)
    stub.Report(pb.ReportRequest(decision_id=first.decision_id, reward=1.0), timeout=5)
    open_one = stub.Select(pb.SelectRequest(job_id=job, arms=arms), timeout=5)
    kept = stub.Select(pb.SelectRequest(job_id=other, arms=arms), timeout=5)

    cleared = stub.Reset(pb.ResetRequest(job_id=job), timeout=5)

    assert (cleared.arms_cleared, cleared.decisions_cleared) == (1, 1)
    gone = _rpc_error(stub.GetStats, pb.SeedSelectorServiceGetStatsRequest(job_id=job))
    assert gone.code() == grpc.StatusCode.NOT_FOUND
    late = _rpc_error(stub.Report, pb.ReportRequest(decision_id=open_one.decision_id, reward=1.0))
    assert late.code() == grpc.StatusCode.NOT_FOUND
    # Other jobs are untouched.
    stub.Report(pb.ReportRequest(decision_id=kept.decision_id, reward=1.0), timeout=5)
    assert (
        stub.GetStats(pb.SeedSelectorServiceGetStatsRequest(job_id=other), timeout=5).reports == 1
    )


def test_rng_seed_makes_decisions_reproducible(
    stub: seed_selector_pb2_grpc.SeedSelectorServiceStub,
) -> None:
    arms = [_arm(f"blocks.{i}") for i in range(6)]

    def run(job: str) -> list[str]:
        chosen = []
        for step in range(8):
            request = pb.SelectRequest(
                job_id=job, arms=arms, strategy=pb.SELECTION_STRATEGY_THOMPSON, rng_seed=42
            )
            response = stub.Select(request, timeout=5)
            chosen.append(response.chosen.slot_id)
            reward = float(response.chosen.slot_id in ("blocks.2", "blocks.4") or step % 3 == 0)
            stub.Report(
                pb.ReportRequest(decision_id=response.decision_id, reward=reward), timeout=5
            )
        return chosen

    assert run(_job()) == run(_job())


def test_strategy_params_are_checked_against_the_selectors_settings(
    stub: seed_selector_pb2_grpc.SeedSelectorServiceStub,
) -> None:
    arms = [_arm("blocks.0")]
    # The documented default of UCB1's `c` is what this selector runs with.
    same = pb.SelectRequest(job_id=_job(), arms=arms, strategy_params={"c": math.sqrt(2)})
    assert stub.Select(same, timeout=5).has_decision
    other = pb.SelectRequest(job_id=_job(), arms=arms, strategy_params={"c": 3.0})
    error = _rpc_error(stub.Select, other)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _details(error).startswith("strategy_params[c]: ")


def test_features_the_job_does_not_use_are_named_by_their_arm(
    stub: seed_selector_pb2_grpc.SeedSelectorServiceStub,
) -> None:
    job = _job()
    stub.Select(pb.SelectRequest(job_id=job, arms=[_arm("blocks.0", grad_norm=1.0)]), timeout=5)
    request = pb.SelectRequest(
        job_id=job, arms=[_arm("blocks.0", grad_norm=1.0), _arm("blocks.1", dead_fraction=0.3)]
    )
    error = _rpc_error(stub.Select, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _details(error).startswith("arms[1].slot_features: ")
    assert "dead_fraction" in _details(error)


_NAN = float("nan")


@pytest.mark.parametrize(
    ("rpc", "request_", "path"),
    [
        ("Select", pb.SelectRequest(job_id="j"), "arms"),
        ("Select", pb.SelectRequest(arms=[_arm("s")], strategy=99), "strategy"),  # type: ignore[arg-type]
        ("Select", pb.SelectRequest(arms=[_arm("s", state=0)]), "arms[0].slot_state"),
        (
            "Select",
            pb.SelectRequest(arms=[_arm("s"), _arm("t", params=-1)]),
            "arms[1].added_params",
        ),
        ("Select", pb.SelectRequest(arms=[_arm("")]), "arms[0].slot_id"),
        ("Select", pb.SelectRequest(arms=[_arm("s", g=_NAN)]), "arms[0].slot_features[g]"),
        (
            "Select",
            pb.SelectRequest(arms=[_arm("s", g=1.0), _arm("s", "attn", g=2.0)]),
            "arms[1].slot_features",
        ),
        ("Select", pb.SelectRequest(arms=[_arm("s")], param_budget=-5), "param_budget"),
        ("Select", pb.SelectRequest(arms=[_arm("s")], active_seeds=-1), "active_seeds"),
        (
            "Select",
            pb.SelectRequest(arms=[_arm("s")], strategy_params={"zz": 1}),
            "strategy_params[zz]",
        ),
        ("Select", pb.SelectRequest(arms=[_arm("s")], rng_seed=-3), "rng_seed"),
        ("Report", pb.ReportRequest(decision_id=str(uuid.uuid4()), reward=_NAN), "reward"),
        (
            "Report",
            pb.ReportRequest(decision_id="d", reward=1, metrics={"m": math.inf}),
            "metrics[m]",
        ),
        ("Report", pb.ReportRequest(reward=1.0), "decision_id"),
        ("GetStats", pb.SeedSelectorServiceGetStatsRequest(), "job_id"),
        ("Reset", pb.ResetRequest(), "scope"),
        ("Reset", pb.ResetRequest(all=False), "all"),
    ],
)
def test_bad_input_is_invalid_argument_naming_the_field(
    stub: seed_selector_pb2_grpc.SeedSelectorServiceStub, rpc: str, request_: Any, path: str
) -> None:
    error = _rpc_error(getattr(stub, rpc), request_)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _details(error).startswith(f"{path}: "), _details(error)


# -- restarts and Redis outages -------------------------------------------------------------


def test_report_after_an_agent_restart_still_counts(start_agent: Any) -> None:
    job = _job()
    first = start_agent()
    decision = first.stub.Select(
        pb.SelectRequest(job_id=job, arms=[_arm("blocks.0"), _arm("blocks.1")]), timeout=5
    )
    assert first.stop() == 0

    second = start_agent()
    report = second.stub.Report(
        pb.ReportRequest(decision_id=decision.decision_id, reward=1.0), timeout=5
    )

    assert report.arm.slot_id == decision.chosen.slot_id and report.arm.pulls == 1
    stats = second.stub.GetStats(pb.SeedSelectorServiceGetStatsRequest(job_id=job), timeout=5)
    assert (stats.decisions, stats.reports, stats.open_decisions) == (1, 1, 0)
    assert second.stop() == 0


async def _error_event(nats_url: str, subject: str) -> dict[str, Any]:
    """The first event stored on `subject` in the error stream."""
    nc = await nats.connect(nats_url)
    try:
        sub = await nc.jetstream().subscribe(subject, ordered_consumer=True)
        msg = await sub.next_msg(timeout=10)
    finally:
        await nc.close()
    event: dict[str, Any] = json.loads(msg.data)
    return event


def test_redis_down_keeps_deciding_reports_degraded_then_recovers(
    start_agent: Any, tmp_path: Path, prefix: str, system_nats_url: str
) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    agent = start_agent(url, SEED_SELECTOR_CONFIG='{"store_retry_interval_s": 0.2}')
    job = _job()

    decision = agent.stub.Select(pb.SelectRequest(job_id=job, arms=[_arm("blocks.0")]), timeout=5)
    assert decision.has_decision

    def degraded_health() -> HealthResult | None:
        result: HealthResult = agent.health()
        return result if result.status is HealthStatus.DEGRADED else None

    degraded = wait_until(degraded_health, 10, "degraded health")
    assert degraded is not None and degraded.reply is not None
    assert "selector store unavailable" in degraded.reply["issues"][0]
    event = asyncio.run(_error_event(system_nats_url, f"errors.mainpc.warning.{agent.name}"))
    assert event["error_type"] == "SelectorStoreUnavailable"
    assert "selector store unavailable" in event["message"]
    report = agent.stub.Report(
        pb.ReportRequest(decision_id=decision.decision_id, reward=1.0), timeout=5
    )
    assert report.arm.pulls == 1

    server = EmbeddedServer.redis("127.0.0.1", port, tmp_path / "redis")
    asyncio.run(server.start())
    try:
        wait_until(lambda: agent.health().status is HealthStatus.HEALTHY, 10, "healthy again")
        # What was decided and reported meanwhile reached the store.
        stored = redis.Redis.from_url(url)
        try:
            assert stored.get(f"{prefix}job:{job}") is not None
            assert stored.get(f"{prefix}decision:{decision.decision_id}") is not None
        finally:
            stored.close()
        assert agent.stop() == 0
    finally:
        asyncio.run(server.stop())
