"""The runtime's helpers for agents: `env_number` settings and `run_every` background loops."""

from __future__ import annotations

import asyncio
import contextlib

from common.agent import env_number, run_every
from common.bus import ErrorBus
from tests.ports import free_port


def test_env_number_defaults_parses_and_collects_problems() -> None:
    problems: list[str] = []
    environ = {"A": " 2.5 ", "B": "x", "C": "0.5", "D": "", "F": "nan", "G": "inf"}
    assert env_number(environ, "A", 1.0, 0.0, problems) == 2.5
    assert env_number(environ, "B", 1.0, 0.0, problems) == 1.0
    assert env_number(environ, "C", 1.0, 1.0, problems) == 1.0
    assert env_number(environ, "D", 7.0, 0.0, problems) == 7.0
    assert env_number(environ, "E", 8.0, 0.0, problems) == 8.0
    assert env_number(environ, "F", 3.0, 0.0, problems) == 3.0
    assert env_number(environ, "G", 4.0, 0.0, problems) == 4.0
    assert problems == [
        "B='x': not a number",
        "C='0.5': must be >= 1",
        "F='nan': not a number",
        "G='inf': not a number",
    ]


async def test_run_every_outlives_a_failing_round_and_reports_it() -> None:
    # Never started, so what it is told stays in its counters.
    bus = ErrorBus(nats_url=f"nats://127.0.0.1:{free_port()}", machine="m1", agent="a")
    rounds: list[int] = []
    third = asyncio.Event()

    async def step() -> None:
        rounds.append(len(rounds))
        if len(rounds) == 1:
            raise RuntimeError("first round breaks")
        if len(rounds) == 3:
            third.set()

    def sync_step() -> None:
        raise ValueError("a plain function that fails")

    loops = [
        asyncio.create_task(run_every(0.001, step, what="test loop", bus=bus)),
        asyncio.create_task(run_every(0.001, sync_step, what="sync loop")),
    ]
    try:
        await asyncio.wait_for(third.wait(), 5)
    finally:
        for loop in loops:
            loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop
    assert rounds[:3] == [0, 1, 2]
    assert bus.stats.reported == 1  # only the bus-backed loop reports, and only its failure
