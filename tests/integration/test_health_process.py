"""A real agent process whose main thread never lets go of the CPU still answers health checks."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from common.health import HealthClient, HealthResult, HealthStatus

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

# The child reports its port, then spins in pure Python (holding the GIL
# whenever the interpreter lets it), publishing its progress through the
# health details so the test can see the loop ran while it was being checked.
BUSY_AGENT = """
import os, sys, time
from common.health import HealthResponder, HealthState

state = HealthState("busy-agent")
responder = HealthResponder(state, "tcp://127.0.0.1:0")
responder.start()
print(responder.port, flush=True)
parent = os.getppid()
deadline = time.monotonic() + 60.0
spins = 0
while time.monotonic() < deadline and os.getppid() == parent:
    for _ in range(200_000):
        spins += 1
    state.update_details(spins=spins)
responder.stop()
"""

MIN_CHECKS = 30
MAX_CHECKS = 2000
DEADLINE_S = 30.0


@pytest.fixture
async def busy_agent_port() -> AsyncIterator[int]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        BUSY_AGENT,
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=30.0)
        assert line.strip().isdigit(), f"busy agent printed {line!r} (exit code {proc.returncode})"
        yield int(line)
        assert proc.returncode is None, f"busy agent exited early with {proc.returncode}"
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), timeout=10.0)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def test_busy_agent_keeps_answering_health_checks(busy_agent_port: int) -> None:
    # Check until the main thread is seen to have moved on at least twice
    # (so the checks overlapped its busy loop), and at least MIN_CHECKS times.
    client = HealthClient()
    target = ("127.0.0.1", busy_agent_port)
    results: list[HealthResult] = []
    progress: list[int] = []
    deadline = asyncio.get_running_loop().time() + DEADLINE_S
    try:
        while len(results) < MAX_CHECKS and asyncio.get_running_loop().time() < deadline:
            result = await client.check(*target, timeout_s=2.0)
            results.append(result)
            spins = result.reply["details"].get("spins", 0) if result.reply else 0
            if not progress or spins > progress[-1]:
                progress.append(spins)
            if len(results) >= MIN_CHECKS and len(progress) >= 3:
                break
        sweep = await client.check_many([target], timeout_s=2.0)
    finally:
        client.close()
    failed = [(i, r.error) for i, r in enumerate(results) if r.status is not HealthStatus.HEALTHY]
    assert not failed, f"checks that failed while the agent was busy: {failed}"
    assert len(progress) >= 3, (
        f"the agent's main thread made no progress over {len(results)} checks: {progress}"
    )
    assert sweep[target].status is HealthStatus.HEALTHY
