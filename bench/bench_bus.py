"""Error bus figures: what `report_error` costs its caller, and events/s into JetStream.

Runs against a bundled nats-server (JetStream, file store) on a free loopback port,
started and stopped here.

1. Caller cost per call. Calls are timed in batches; each batch of `report_error`
   is paired with a batch of bare `deque.append` of the same messages, timed right
   before it on the same thread, so the baseline lives through the same GIL and
   garbage-collector weather. Figures: mean, and p50/p99 over batches of the
   per-call cost; wall clock (what the caller waits, GIL waits and the OS taking
   the CPU away included), then the reporting thread's own CPU time.
   The bus has the default buffer (10 000 events) and calls come in rounds that fit
   it, flushed between rounds, so nothing is dropped and the backlog is what an
   agent can really hold.
   a. on the event loop's own thread (the publisher cannot run meanwhile): the
      call's own CPU cost;
   b. on a worker thread at a steady 20 000 reports/s, as a training thread would
      report, with the publisher running and keeping up;
   c. on a worker thread reporting as fast as it can, so the publisher falls behind
      and a backlog builds (the GIL is shared with it);
   d. one identical error flooding from a worker thread (folded by the guard);
   e. as c, but into a 200 000-event buffer in one go: a backlog of ~100 000
      events, which every full garbage collection walks (the tails grow with it).
2. End to end: N distinct events reported from a worker thread by a fresh bus,
   timed until the ERRORS stream holds all of them (read back through stream info).

Every measurement is bounded in count and in time. Targets: <= 20 us per call,
>= 20 000 events/s.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import os
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import nats

from common.bus import ERRORS_STREAM, ErrorBus
from common.infra import EmbeddedServer
from tests.ports import free_port

CALLS = 100_000
PACED_CALLS = 40_000
PACED_RATE = 20_000.0
END_TO_END_EVENTS = 100_000
LOOP_BATCH = 100
PACED_BATCH = 100
BURST_BATCH = 1_000
ROUND = 10_000
DEADLINE_S = 120.0
CALL_TARGET_US = 20.0
RATE_TARGET = 20_000.0
MACHINE = "bench"

# Per-call ns of each batch: baseline wall clock, bus wall clock, bus thread CPU time.
Timings = tuple[list[float], list[float], list[float]]


def _messages(tag: str, n: int) -> tuple[str, ...]:
    # Distinct after normalisation (a number glued to a word is kept), so nothing folds.
    # A tuple, not a list: the garbage collector stops tracking a tuple of strings, so
    # the bench's own data does not lengthen the collections it measures through.
    return tuple(f"{tag} failure in stage{i}" for i in range(n))


def _paired_batches(
    report: Callable[[str], object],
    messages: tuple[str, ...],
    batch: int,
    rate: float | None = None,
) -> Timings:
    """Time `batch` deque.appends, then `batch` reports, per batch; at `rate` calls/s if given."""
    sink: collections.deque[str] = collections.deque(maxlen=batch)
    base: list[float] = []
    bus: list[float] = []
    cpu: list[float] = []
    clock, cpu_clock = time.perf_counter_ns, time.thread_time_ns
    period_s = batch / rate if rate else 0.0
    next_at = time.perf_counter()
    for start in range(0, len(messages), batch):
        chunk = messages[start : start + batch]
        t0 = clock()
        for message in chunk:
            sink.append(message)
        c1 = cpu_clock()
        t1 = clock()
        for message in chunk:
            report(message)
        t2 = clock()
        c2 = cpu_clock()
        base.append((t1 - t0) / len(chunk))
        bus.append((t2 - t1) / len(chunk))
        cpu.append((c2 - c1) / len(chunk))
        if period_s:
            next_at += period_s
            time.sleep(max(0.0, next_at - time.perf_counter()))  # pacing, not waiting
    return base, bus, cpu


def _summary(per_call_ns: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(per_call_ns, n=100)
    return statistics.fmean(per_call_ns), q[49], q[98]


def _print_pair(label: str, timings: Timings) -> float:
    """Print the baseline and the bus lines; return the bus's mean us per call."""
    base = _summary(timings[0])
    rows = (
        ("deque.append", base),
        (label, _summary(timings[1])),
        (f"{label}, CPU time", _summary(timings[2])),
    )
    for name, (mean, p50, p99) in rows:
        line = (
            f"    {name:<26} mean {mean / 1000:7.3f} us  p50 {p50 / 1000:7.3f} us  "
            f"p99 {p99 / 1000:7.3f} us"
        )
        if name == label:
            line += f"  (x{mean / base[0]:.0f} mean, x{p50 / base[1]:.0f} p50 vs deque.append)"
        print(line)
    return _summary(timings[1])[0] / 1000


async def _in_thread(work: Callable[[], Timings]) -> Timings:
    """Run `work` on a worker thread while this event loop (and the publisher) keeps running."""
    result: list[Timings] = []
    thread = threading.Thread(target=lambda: result.append(work()))
    thread.start()
    deadline = time.monotonic() + DEADLINE_S
    while thread.is_alive():
        if time.monotonic() >= deadline:
            raise TimeoutError("worker thread did not finish in time")
        await asyncio.sleep(0.005)
    return result[0]


async def _connected(bus: ErrorBus) -> ErrorBus:
    await bus.start()
    deadline = time.monotonic() + DEADLINE_S
    while not bus.connected:
        if time.monotonic() >= deadline:
            raise TimeoutError(f"error bus did not connect; {bus.stats}")
        await asyncio.sleep(0.01)
    return bus


async def _rounds(
    bus: ErrorBus,
    messages: tuple[str, ...],
    batch: int,
    *,
    in_thread: bool,
    rate: float | None = None,
    round_size: int = ROUND,
) -> Timings:
    """Paired batches over `messages`, in rounds that fit the buffer, flushing between them."""
    base: list[float] = []
    bus_ns: list[float] = []
    cpu_ns: list[float] = []
    for start in range(0, len(messages), round_size):
        chunk = messages[start : start + round_size]
        if in_thread:
            timings = await _in_thread(
                functools.partial(_paired_batches, bus.report_error, chunk, batch, rate)
            )
        else:
            timings = _paired_batches(bus.report_error, chunk, batch, rate)
        base += timings[0]
        bus_ns += timings[1]
        cpu_ns += timings[2]
        await bus.flush(DEADLINE_S)
    return base, bus_ns, cpu_ns


async def _caller_cost(url: str) -> None:
    # The default buffer size, so the backlog is what an agent would really hold.
    bus = await _connected(ErrorBus(nats_url=url, machine=MACHINE, agent="cost"))
    big = await _connected(
        ErrorBus(nats_url=url, machine=MACHINE, agent="costbig", buffer_size=2 * CALLS)
    )
    try:
        print(
            f"caller cost per call, default buffer ({bus.buffer_size} events; rounds of {ROUND} "
            "calls, flushed between rounds); each line against deque.append in the same batches:"
        )
        means = []
        print(f" a. event loop thread, {CALLS} calls in batches of {LOOP_BATCH}:")
        timings = await _rounds(bus, _messages("a", CALLS), LOOP_BATCH, in_thread=False)
        means.append(_print_pair("report_error", timings))

        print(
            f" b. worker thread at {PACED_RATE:,.0f}/s, {PACED_CALLS} calls "
            f"in batches of {PACED_BATCH}:"
        )
        timings = await _rounds(
            bus, _messages("b", PACED_CALLS), PACED_BATCH, in_thread=True, rate=PACED_RATE
        )
        means.append(_print_pair("report_error", timings))

        print(f" c. worker thread flat out, {CALLS} calls in batches of {BURST_BATCH}:")
        timings = await _rounds(bus, _messages("c", CALLS), BURST_BATCH, in_thread=True)
        means.append(_print_pair("report_error", timings))

        print(f" d. one identical error, worker thread flat out, {CALLS} calls:")
        published = bus.stats.published
        flood = ("loss is NaN",) * CALLS
        timings = await _rounds(bus, flood, BURST_BATCH, in_thread=True)
        means.append(_print_pair("report_error", timings))
        print(
            f"    ({CALLS} reports became {bus.stats.published - published} events: "
            "the first and the folded rest, per flushed round)"
        )

        print(
            f" e. as c, into a {big.buffer_size}-event buffer in one go "
            "(a full garbage collection walks the whole backlog):"
        )
        timings = await _rounds(
            big, _messages("e", CALLS), BURST_BATCH, in_thread=True, round_size=CALLS
        )
        means.append(_print_pair("report_error", timings))

        worst = max(means)
        verdict = "met" if worst <= CALL_TARGET_US else "MISSED"
        print(f" target <= {CALL_TARGET_US:g} us per call: {verdict} (worst mean {worst:.3f} us)")
    finally:
        await bus.close(timeout_s=DEADLINE_S)
        await big.close(timeout_s=DEADLINE_S)


async def _stream_count(js: nats.js.JetStreamContext, subject: str) -> int:
    info = await js.stream_info(ERRORS_STREAM, subjects_filter=subject)
    return sum((info.state.subjects or {}).values())


async def _end_to_end(url: str) -> None:
    agent = f"e2e{uuid.uuid4().hex[:8]}"
    subject = f"errors.{MACHINE}.*.{agent}"
    bus = await _connected(
        ErrorBus(nats_url=url, machine=MACHINE, agent=agent, buffer_size=END_TO_END_EVENTS)
    )
    reader = await nats.connect(url)
    try:
        js = reader.jetstream()
        messages = _messages("e2e", END_TO_END_EVENTS)
        began = time.perf_counter()
        cpu_began = time.process_time()
        _, reported, _ = await _in_thread(
            lambda: _paired_batches(bus.report_error, messages, BURST_BATCH)
        )
        reported_s = time.perf_counter() - began
        deadline = time.monotonic() + DEADLINE_S
        count = 0
        while count < END_TO_END_EVENTS:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"stream holds {count} of {END_TO_END_EVENTS}; {bus.stats}")
            await asyncio.sleep(0.01)
            count = await _stream_count(js, subject)
        elapsed = time.perf_counter() - began
        cpu_s = time.process_time() - cpu_began
        rate = END_TO_END_EVENTS / elapsed
        stats = bus.stats
        print(f"end to end: {END_TO_END_EVENTS} distinct events into JetStream (file store)")
        print(
            f"  reported in {reported_s:.3f} s ({_summary(reported)[0] / 1000:.3f} us/call); "
            f"all stored after {elapsed:.3f} s"
        )
        print(
            f"  {rate:,.0f} events/s; target >= {RATE_TARGET:,.0f}: "
            f"{'met' if rate >= RATE_TARGET else 'MISSED'} (x{rate / RATE_TARGET:.2f})"
        )
        # Per CPU-second of this process (reporting thread, publisher, reader): what the
        # bus could sustain on a core of its own, whatever else the machine was doing.
        print(
            f"  {END_TO_END_EVENTS / cpu_s:,.0f} events per CPU-second of this process "
            f"({cpu_s:.2f} CPU-s)"
        )
        print(
            f"  stored {count}, published {stats.published}, dropped {stats.dropped}, "
            f"publish failures {stats.publish_failures}"
        )
    finally:
        await reader.close()
        await bus.close(timeout_s=DEADLINE_S)


async def _run() -> None:
    # Tails (p99) move with whatever else the machine runs: say what that was.
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"machine: {os.cpu_count()} CPUs, load average {load} (1, 5, 15 min)")
    with tempfile.TemporaryDirectory(prefix="bench-bus-") as tmp:
        server = EmbeddedServer.nats("127.0.0.1", free_port(), Path(tmp))
        await server.start()
        try:
            await _caller_cost(server.url)
            await _end_to_end(server.url)
        finally:
            await server.stop()


def main() -> None:
    asyncio.run(_run())


if __name__ == "__main__":
    main()
