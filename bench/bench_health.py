"""Health check figures: round trip against bare pyzmq, latency under a busy agent, a full sweep.

1. Round trip p50/p99 through `HealthResponder` + `HealthClient` against a
   bare pyzmq REP thread that sends the same reply bytes, asked by two bare
   clients: a `zmq.asyncio` REQ (the same asyncio setup as `HealthClient`) and
   a blocking REQ (no event loop: the floor). Servers live in one child
   process, each with its own ZMQ context as an agent would have; the clients
   take turns in short rounds, so load from elsewhere on the machine hits all
   of them alike, and the headline ratio is the median of per-round ratios.
2. p50/p99 of checks, a few milliseconds apart, against a responder whose
   process's main thread spins in pure Python (holding the GIL when it can).
3. One `check_many` sweep over 272 responders (4 processes x 68), p50/p99.

Every measurement is bounded in count and in time.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from common.health import HealthClient, HealthResponder, HealthState

_ROOT = Path(__file__).resolve().parents[1]
_REQUEST = b'{"action": "health_check"}'
_OURS = "HealthClient+HealthResponder"

ROUND_TRIP_ROUNDS = 30
ROUND_TRIP_PER_ROUND = 200
ROUND_TRIP_BUDGET_S = 30.0
BUSY_CHECKS = 300
# Checks back to back find the GIL free far more often than checks that
# arrive now and then, as a supervisor's do; the gap makes each one a cold start.
BUSY_GAP_S = 0.003
BUSY_BUDGET_S = 20.0
SWEEP_PROCESSES = 4
SWEEP_PER_PROCESS = 68
SWEEPS = 40
SWEEP_BUDGET_S = 30.0
CHILD_LIFETIME_S = 120.0  # children exit by themselves after this, whatever happens here

RATIO_TARGET = 1.3
BUSY_P99_TARGET_MS = 50.0
SWEEP_TARGET_MS = 150.0


def _state() -> HealthState:
    state = HealthState("bench-agent")
    state.set("healthy", details={"step": 1234, "loss": 0.25, "device": "cpu"})
    return state


# --- child processes ---------------------------------------------------------


def _child_round_trip() -> None:
    """Serve a bare REP loop and a HealthResponder; print both ports; live until stdin closes."""
    state = _state()
    responder = HealthResponder(state, "tcp://127.0.0.1:0")
    responder.start()
    reply = json.dumps(state.snapshot()).encode()  # a real reply's bytes, timestamp frozen
    bare_context = zmq.Context()
    bare = bare_context.socket(zmq.REP)
    bare.linger = 0
    bare_port = bare.bind_to_random_port("tcp://127.0.0.1")

    def serve_bare() -> None:
        while True:
            bare.recv()
            bare.send(reply)

    threading.Thread(target=serve_bare, daemon=True).start()
    print(json.dumps({"bare": bare_port, "health": responder.port}), flush=True)
    sys.stdin.read()  # EOF: the parent is done or gone
    responder.stop()


def _child_busy() -> None:
    """Serve a HealthResponder while the main thread spins in pure Python."""
    responder = HealthResponder(_state(), "tcp://127.0.0.1:0")
    responder.start()
    print(json.dumps({"health": responder.port}), flush=True)
    parent = os.getppid()
    deadline = time.monotonic() + CHILD_LIFETIME_S
    spins = 0
    while time.monotonic() < deadline:
        for _ in range(10_000):
            spins += 1
        if os.getppid() != parent:
            break
    responder.stop()


def _child_many(count: int) -> None:
    """Serve `count` responders sharing one ZMQ context; live until stdin closes."""
    context: zmq.Context[Any] = zmq.Context()
    responders = []
    for i in range(count):
        state = HealthState(f"bench-agent-{i}")
        responder = HealthResponder(state, "tcp://127.0.0.1:0", context=context)
        responder.start()
        responders.append(responder)
    print(json.dumps({"health": [r.port for r in responders]}), flush=True)
    sys.stdin.read()
    for responder in responders:
        responder.stop()
    context.term()


@contextmanager
def _child(kind: str, *args: str) -> Iterator[dict[str, Any]]:
    """Start a child serving `kind`; yield what it printed; then end it.

    Children that read stdin leave when it closes; a busy child cannot read
    it, so one that is still there after a moment gets SIGTERM by its PID.
    """
    code = f"from bench.bench_health import _child_{kind} as run; run({', '.join(args)})"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(_ROOT), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=_ROOT,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(
                f"benchmark child {kind!r} exited with {proc.wait(10)} before it served"
            )
        yield json.loads(line)
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(timeout=0.5 if kind == "busy" else 5)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# --- measurements ------------------------------------------------------------


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:7.1f} us"


def _bare_round(sock: zmq.Socket[Any], count: int) -> list[float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        sock.send(_REQUEST)
        sock.recv()
        samples.append(time.perf_counter() - started)
    return samples


async def _asyncio_round(sock: zmq.asyncio.Socket, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        await sock.send(_REQUEST)
        await sock.recv()
        samples.append(time.perf_counter() - started)
    return samples


async def _client_round(client: HealthClient, port: int, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        result = await client.check("127.0.0.1", port)
        samples.append(time.perf_counter() - started)
        if not result.is_healthy:
            raise RuntimeError(f"health check failed during the benchmark: {result}")
    return samples


def _round_trip() -> None:
    with _child("round_trip") as ports:
        bare_context: zmq.Context[Any] = zmq.Context()
        bare = bare_context.socket(zmq.REQ)
        bare.linger = 0
        bare.connect(f"tcp://127.0.0.1:{ports['bare']}")
        aio_context = zmq.asyncio.Context()
        aio = aio_context.socket(zmq.REQ)
        aio.linger = 0
        aio.connect(f"tcp://127.0.0.1:{ports['bare']}")
        client = HealthClient()
        loop = asyncio.new_event_loop()
        kinds: dict[str, Callable[[int], list[float]]] = {
            "bare pyzmq REQ/REP": lambda n: _bare_round(bare, n),
            "bare zmq.asyncio REQ/REP": lambda n: loop.run_until_complete(_asyncio_round(aio, n)),
            _OURS: lambda n: loop.run_until_complete(_client_round(client, ports["health"], n)),
        }
        samples: dict[str, list[float]] = {kind: [] for kind in kinds}
        round_p50: dict[str, list[float]] = {kind: [] for kind in kinds}
        try:
            for run in kinds.values():
                run(50)  # connect and warm up
            deadline = time.monotonic() + ROUND_TRIP_BUDGET_S
            rounds = 0
            while rounds < ROUND_TRIP_ROUNDS and time.monotonic() < deadline:
                for kind, run in kinds.items():
                    got = run(ROUND_TRIP_PER_ROUND)
                    samples[kind] += got
                    round_p50[kind].append(statistics.median(got))
                rounds += 1
        finally:
            client.close()
            aio.close()
            aio_context.term()
            bare.close()
            bare_context.term()
            loop.close()
    floor = "bare pyzmq REQ/REP"
    same_loop = "bare zmq.asyncio REQ/REP"
    print(
        f"round trip ({rounds} interleaved rounds x {ROUND_TRIP_PER_ROUND};"
        " servers in one child process, clients here):"
    )
    for kind, got in samples.items():
        print(f"  {kind:30s} p50 {_us(_pct(got, 0.5))}  p99 {_us(_pct(got, 0.99))}")
    ours = samples[_OURS]
    # Each round runs the three clients back to back, so the per-round ratio
    # compares them under the same machine load; its median is the headline.
    for base in (same_loop, floor):
        per_round = statistics.median(
            a / b for a, b in zip(round_p50[_OURS], round_p50[base], strict=True)
        )
        pooled_p50 = _pct(ours, 0.5) / _pct(samples[base], 0.5)
        pooled_p99 = _pct(ours, 0.99) / _pct(samples[base], 0.99)
        print(
            f"  RATIO vs {base}: {per_round:.2f} (median of per-round p50 ratios;"
            f" target <= {RATIO_TARGET}); pooled p50 {pooled_p50:.2f}, pooled p99 {pooled_p99:.2f}"
        )


def _busy() -> None:
    async def measure(port: int) -> tuple[list[float], int]:
        client = HealthClient()
        samples: list[float] = []
        failures = 0
        try:
            deadline = time.monotonic() + BUSY_BUDGET_S
            await client.check("127.0.0.1", port, timeout_s=5.0)  # connect
            while len(samples) + failures < BUSY_CHECKS and time.monotonic() < deadline:
                await asyncio.sleep(BUSY_GAP_S)
                started = time.perf_counter()
                result = await client.check("127.0.0.1", port, timeout_s=1.0)
                if result.is_healthy:
                    samples.append(time.perf_counter() - started)
                else:
                    failures += 1
        finally:
            client.close()
        return samples, failures

    with _child("busy") as ports:
        samples, failures = asyncio.run(measure(ports["health"]))
    print(
        f"busy agent (main thread spinning in pure Python; switch interval"
        f" {sys.getswitchinterval() * 1e3:g} ms): {len(samples)} checks"
        f" {BUSY_GAP_S * 1e3:g} ms apart, {failures} failed"
    )
    if samples:
        print(
            f"  p50 {_pct(samples, 0.5) * 1e3:6.2f} ms  p99 {_pct(samples, 0.99) * 1e3:6.2f} ms"
            f"  max {max(samples) * 1e3:6.2f} ms  (target p99 <= {BUSY_P99_TARGET_MS:g} ms)"
        )


def _sweep() -> None:
    async def measure(targets: list[tuple[str, int]]) -> tuple[float, list[float], int]:
        client = HealthClient()
        try:
            started = time.perf_counter()
            first = await client.check_many(targets, timeout_s=5.0)
            cold = time.perf_counter() - started
            bad = sum(not r.is_healthy for r in first.values())
            times: list[float] = []
            deadline = time.monotonic() + SWEEP_BUDGET_S
            while len(times) < SWEEPS and time.monotonic() < deadline:
                started = time.perf_counter()
                results = await client.check_many(targets, timeout_s=1.0)
                times.append(time.perf_counter() - started)
                bad += sum(not r.is_healthy for r in results.values())
        finally:
            client.close()
        return cold, times, bad

    with ExitStack() as stack:
        targets = [
            ("127.0.0.1", port)
            for _ in range(SWEEP_PROCESSES)
            for port in stack.enter_context(_child("many", str(SWEEP_PER_PROCESS)))["health"]
        ]
        cold, times, bad = asyncio.run(measure(targets))
    print(
        f"sweep of {len(targets)} responders ({SWEEP_PROCESSES} processes x {SWEEP_PER_PROCESS},"
        f" {os.cpu_count()} CPUs): first sweep (connecting) {cold * 1e3:.1f} ms;"
        f" {len(times)} sweeps, {bad} unhealthy results"
    )
    print(
        f"  p50 {_pct(times, 0.5) * 1e3:6.1f} ms  p99 {_pct(times, 0.99) * 1e3:6.1f} ms"
        f"  (target <= {SWEEP_TARGET_MS:g} ms)"
    )


def main() -> None:
    _round_trip()
    _busy()
    _sweep()


if __name__ == "__main__":
    main()
