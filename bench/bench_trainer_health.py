"""Health check latency of the trainer agent while a job trains with every core busy.

Target: p99 <= 50 ms. The trainer runs as a real agent process with as many torch
threads as cores; the checks go through common.health like the supervisor's.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

from common.health import HealthClient
from common.infra import probe_nats, probe_redis
from common.stubs import common_pb2, trainer_pb2
from tests.integration.test_trainer_agent import Trainer, dead_agents, spirals, write_config
from tests.wait import wait_until

NATS_URL = "nats://127.0.0.1:4222"
REDIS_URL = "redis://127.0.0.1:6379/15"
CHECKS = 400
SPACING_S = 0.02


async def _measure(port: int) -> tuple[list[float], int]:
    client = HealthClient()
    latencies: list[float] = []
    failed = 0
    try:
        for _ in range(CHECKS):
            result = await client.check("127.0.0.1", port, timeout_s=1.0)
            if result.is_up and result.latency_s is not None:
                latencies.append(result.latency_s * 1000.0)
            else:
                failed += 1
            await asyncio.sleep(SPACING_S)
    finally:
        client.close()
    return latencies, failed


def main() -> None:
    if not (asyncio.run(probe_nats(NATS_URL)) and asyncio.run(probe_redis(REDIS_URL))):
        print("skipped: needs NATS and Redis on their standard loopback ports")
        return
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="bench-trainer-health-") as tmp:
        root = Path(tmp)
        env, entries = dead_agents(f"bth{os.getpid()}")
        config = write_config(root / "startup_config.yaml", NATS_URL, REDIS_URL, entries)
        trainer = Trainer(
            root / "run",
            NATS_URL,
            REDIS_URL,
            f"bench-trainer-{os.getpid()}",
            GRAFTMESH_CONFIG=str(config),
            GRAFTMESH_TRAINER_TORCH_THREADS=str(cores),
            **env,
        )
        try:
            trainer.wait_healthy()
            spec = spirals(max_steps=1_000_000, checkpoint_every_steps=0)
            spec["model"]["params"]["hidden"] = [256, 256, 256]
            spec["data"]["batch_size"] = 512
            job = trainer.submit(spec)
            wait_until(lambda: trainer.get(job.job_id).progress.step > 0, 120, "the job to train")
            started = time.monotonic()
            latencies, failed = asyncio.run(_measure(trainer.health_port))
            elapsed = time.monotonic() - started
            steps = trainer.get(job.job_id).progress.step
            trainer.stub().CancelJob(trainer_pb2.CancelJobRequest(job_id=job.job_id), timeout=30)
            assert trainer.wait_done(job.job_id).state == common_pb2.JOB_STATE_CANCELLED
        finally:
            trainer.stop()
    latencies.sort()
    p50 = statistics.median(latencies)
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    print(
        f"health during training ({cores} torch threads on {cores} CPUs, MLP 3x256 at batch 512, "
        f"{steps} steps done, {CHECKS} checks over {elapsed:.1f} s, {failed} failed):"
    )
    print(
        f"  p50 {p50:.2f} ms  p99 {p99:.2f} ms  max {latencies[-1]:.2f} ms  "
        f"(target p99 <= 50 ms; {'met' if p99 <= 50 else 'MISSED'})"
    )
