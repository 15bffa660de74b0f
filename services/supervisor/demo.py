"""`graftmesh demo`: the main job, run on a mesh the supervisor has just brought up.

`run_demo(sup, out)` walks the whole story once, printing each step:

1. trains the two-spirals growth job (`examples/spirals-growing.yaml`, registered
   as `spirals-demo`) and follows it live through `WatchJob`;
2. points the `canary`, then the `production` alias at the version it registered;
3. sends a burst of inferences through the router (alias `production`) and
   measures their latency as the client sees it;
4. SIGKILLs the seed selector, waits for the supervisor to restart it, and waits
   for the alert that follows on `alerts.>`;
5. prints a summary and returns 0, or 1 with the reason when a step failed.

It runs on the supervisor's event loop, so every call is asynchronous and every
wait has a deadline. Environment knobs (for tests and small machines):
`GRAFTMESH_DEMO_MAX_STEPS` (the job's `max_steps`, default 1500) and
`GRAFTMESH_DEMO_REQUESTS` (the burst's size, default 200).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import signal
import struct
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import grpc
import nats
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from common.channels import agent_channel
from common.errors import NotFoundError
from common.stubs import (
    common_pb2,
    compiler_pb2,
    compiler_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)
from services.supervisor.exits import EXIT_FAILED, EXIT_OK
from services.supervisor.policy import AgentState
from services.supervisor.supervisor import Supervisor
from services.trainer.cli import spec_from_mapping

__all__ = ["DEMO_MODEL", "DemoError", "DemoSummary", "demo_spec", "percentile", "run_demo"]

DEMO_MODEL: Final = "spirals-demo"
SPEC_PATH: Final = Path(__file__).resolve().parents[2] / "examples" / "spirals-growing.yaml"
MAX_STEPS_ENV: Final = "GRAFTMESH_DEMO_MAX_STEPS"
REQUESTS_ENV: Final = "GRAFTMESH_DEMO_REQUESTS"
# Longer than the example's 400 steps: enough for seeds to be grafted and the spirals
# learned (seconds of CPU for this 8-wide MLP).
DEFAULT_MAX_STEPS: Final = 1500
FAULT_AGENT: Final = "seed_selector"
ACTOR: Final = "graftmesh demo"

_RPC_TIMEOUT_S: Final = 30.0
_JOB_TIMEOUT_S: Final = 900.0
_RESTART_TIMEOUT_S: Final = 60.0
_ALERT_TIMEOUT_S: Final = 30.0
_BURST_CONCURRENCY: Final = 4
_INFER_DEADLINE_MS: Final = 20_000
_ALERT_KINDS: Final = frozenset({"agent_restarted", "agent_down"})
_TERMINAL: Final = frozenset(
    {common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED, common_pb2.JOB_STATE_CANCELLED}
)


class DemoError(Exception):
    """A step of the demo failed; the message says which and why."""


@dataclass
class DemoSummary:
    """What the demo measured, for the closing table."""

    job_id: str = ""
    accuracy: float | None = None
    accuracy_metric: str = ""
    params_before: int = 0
    params_after: int = 0
    seeds_grafted: list[str] = field(default_factory=list)
    seeds_other: list[str] = field(default_factory=list)
    model_version: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    requests: int = 0
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    restarted_pid: tuple[int, int] | None = None
    alerts: list[dict[str, Any]] = field(default_factory=list)


# -- pure helpers -----------------------------------------------------------------------


def demo_spec(
    base: Mapping[str, Any], *, name: str, max_steps: int | None = None
) -> trainer_pb2.JobSpec:
    """The demo's job: `base` (the example spec) under `name`, registered as `DEMO_MODEL`,
    with `max_steps` when given (the checkpoint and eval periods shrink with it)."""
    data = dict(base)
    data["name"] = name
    data["register_as"] = DEMO_MODEL
    if max_steps is not None:
        data["max_steps"] = max_steps
        data["eval_every_steps"] = min(int(data.get("eval_every_steps", 20)), max(1, max_steps))
        data["checkpoint_every_steps"] = min(
            int(data.get("checkpoint_every_steps", 100)), max(1, max_steps)
        )
    return spec_from_mapping(data)


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank `q`-th percentile (0 < q <= 100) of `values`; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def _positive_env(name: str, default: int | None) -> int | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise DemoError(f"{name}={raw!r} is not an integer") from None
    if value < 1:
        raise DemoError(f"{name} must be >= 1, not {value}")
    return value


def _seed(value: int) -> str:
    return common_pb2.SeedState.Name(value).removeprefix("SEED_STATE_").lower()  # type: ignore[arg-type]


def _job_state(value: int) -> str:
    return common_pb2.JobState.Name(value).removeprefix("JOB_STATE_")  # type: ignore[arg-type]


def _slots_line(slots: Mapping[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(slots.items())) or "-"


def _accuracy(metrics: Mapping[str, float]) -> tuple[str, float] | None:
    """The most telling accuracy among the job's metrics: test, then val, then any."""
    for key in ("test_accuracy", "val_accuracy", "accuracy", "train_accuracy"):
        if key in metrics:
            return key, metrics[key]
    return None


def _input_width(version: registry_pb2.ModelVersion) -> int:
    inputs = version.input_signature.inputs
    if not inputs or not inputs[0].shape or inputs[0].shape[-1] < 1:
        raise DemoError(f"{version.name} v{version.version} has no usable input signature")
    return int(inputs[0].shape[-1])


def _random_row(rng: random.Random, width: int) -> common_pb2.Tensor:
    values = [rng.uniform(-1.0, 1.0) for _ in range(width)]
    return common_pb2.Tensor(
        data=struct.pack(f"<{width}f", *values), shape=[1, width], dtype=common_pb2.DTYPE_FLOAT32
    )


# -- the steps --------------------------------------------------------------------------


def _heading(out: Console, number: int, title: str) -> None:
    out.rule(f"[bold cyan]{number}. {title}")


async def _train(sup: Supervisor, out: Console, summary: DemoSummary) -> None:
    try:
        base = yaml.safe_load(SPEC_PATH.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise DemoError(f"cannot read the demo spec {SPEC_PATH}: {exc}") from None
    max_steps = _positive_env(MAX_STEPS_ENV, DEFAULT_MAX_STEPS)
    spec = demo_spec(base, name=f"spirals-demo-{uuid.uuid4().hex[:8]}", max_steps=max_steps)
    async with await agent_channel(sup.cfg, "trainer") as channel:
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        submitted = (
            await stub.SubmitJob(
                trainer_pb2.SubmitJobRequest(spec=spec, request_id=spec.name),
                timeout=_RPC_TIMEOUT_S,
            )
        ).job
        summary.job_id = submitted.job_id
        out.print(
            f"submitted [bold]{submitted.job_id}[/] ({spec.name}: {spec.max_steps} steps, "
            f"slots {', '.join(s.module_path for s in spec.slots)}, registers as {DEMO_MODEL})"
        )
        try:
            async with asyncio.timeout(_JOB_TIMEOUT_S):
                await _follow(stub, submitted, out, summary)
        except TimeoutError:
            raise DemoError(
                f"job {submitted.job_id} did not end within {_JOB_TIMEOUT_S:.0f}s"
            ) from None
        final = (
            await stub.GetJob(
                trainer_pb2.GetJobRequest(job_id=submitted.job_id), timeout=_RPC_TIMEOUT_S
            )
        ).job
    if final.state != common_pb2.JOB_STATE_SUCCEEDED:
        raise DemoError(
            f"job {final.job_id} ended {_job_state(final.state)}: {final.message or 'no reason'}"
        )
    summary.params_after = final.progress.param_count
    grafted = [s for s in final.slots if s.state == common_pb2.SEED_STATE_FOSSILIZED]
    summary.seeds_grafted = [f"{s.slot_id}:{s.blueprint}" for s in grafted]
    summary.seeds_other = [
        f"{s.slot_id} {_seed(s.state)}"
        for s in final.slots
        if s.state not in (common_pb2.SEED_STATE_FOSSILIZED, common_pb2.SEED_STATE_DORMANT)
    ]
    if not summary.params_before:
        summary.params_before = summary.params_after - sum(s.added_params for s in grafted)
    found = _accuracy(final.progress.metrics)
    if found is not None:
        summary.accuracy_metric, summary.accuracy = found
    if not final.registered_model.name or not final.registered_model.version:
        raise DemoError(f"job {final.job_id} succeeded but registered no model version")
    summary.model_version = final.registered_model.version
    accuracy = f"{summary.accuracy:.3f}" if summary.accuracy is not None else "-"
    metric = summary.accuracy_metric or "accuracy"
    out.print(
        f"job [green]SUCCEEDED[/] at step {final.progress.step}: {metric} "
        f"{accuracy}, registered [bold]{final.registered_model.name} "
        f"v{final.registered_model.version}[/]"
    )


async def _follow(
    stub: trainer_pb2_grpc.TrainerServiceAsyncStub,
    job: trainer_pb2.Job,
    out: Console,
    summary: DemoSummary,
) -> None:
    """Show the job's events until it reaches a terminal state."""
    slots: dict[str, str] = {s.slot_id: _seed(s.state) for s in job.slots}
    # A terminal shows a live bar; a log gets one line per evaluation instead.
    lines = not out.is_terminal
    with Progress(
        TextColumn("[bold]{task.fields[state]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(),
        console=out,
        disable=lines,
    ) as progress:
        task = progress.add_task(
            job.job_id, total=job.spec.max_steps or None, state=_job_state(job.state), stats=""
        )
        stream = stub.WatchJob(trainer_pb2.WatchJobRequest(job_id=job.job_id, after_sequence=0))
        async for reply in stream:
            event = reply.event
            kind = event.WhichOneof("payload")
            if kind == "progress":
                p = event.progress
                if not summary.params_before:
                    current = await stub.GetJob(
                        trainer_pb2.GetJobRequest(job_id=job.job_id), timeout=_RPC_TIMEOUT_S
                    )
                    summary.params_before = current.job.progress.param_count
                parts = [f"loss {p.train_loss:.4f}"]
                if p.HasField("val_loss"):
                    parts.append(f"val_loss {p.val_loss:.4f}")
                if "val_accuracy" in p.metrics:
                    parts.append(f"acc {p.metrics['val_accuracy']:.3f}")
                parts.append(f"slots {_slots_line(slots)}")
                stats = "  ".join(parts)
                progress.update(task, completed=event.step, stats=stats)
                if lines and p.HasField("val_loss"):
                    out.print(f"step {event.step:>5}  {stats}", highlight=False)
            elif kind == "slot_transition":
                t = event.slot_transition
                slots[t.slot_id] = _seed(t.to_state)
                progress.console.print(
                    f"step {event.step:>5}  slot {t.slot_id}: {_seed(t.from_state)} -> "
                    f"[bold]{_seed(t.to_state)}[/] {t.blueprint} ({t.reason})"
                )
            elif kind == "state_change":
                c = event.state_change
                progress.update(task, state=_job_state(c.to_state))
                if lines:
                    out.print(f"job {_job_state(c.from_state)} -> {_job_state(c.to_state)}")
                if c.to_state in _TERMINAL:
                    stream.cancel()
                    return


async def _promote(sup: Supervisor, out: Console, summary: DemoSummary) -> None:
    async with await agent_channel(sup.cfg, "registry") as channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        for alias in ("canary", "production"):
            reply = await stub.SetAlias(
                registry_pb2.SetAliasRequest(
                    name=DEMO_MODEL,
                    alias=alias,
                    version=summary.model_version,
                    actor=ACTOR,
                    reason=f"demo job {summary.job_id}",
                ),
                timeout=_RPC_TIMEOUT_S,
            )
            previous = reply.entry.from_version
            moved = f"v{previous} -> " if previous else ""
            out.print(
                f"{DEMO_MODEL} [bold]{alias}[/]: {moved}v{summary.model_version} "
                f"(aliases now {', '.join(reply.model_version.aliases)})"
            )


async def _burst(sup: Supervisor, out: Console, summary: DemoSummary) -> None:
    requests = _positive_env(REQUESTS_ENV, 200) or 200
    async with await agent_channel(sup.cfg, "registry") as channel:
        version = (
            await registry_pb2_grpc.RegistryServiceStub(channel).GetModelVersion(
                registry_pb2.GetModelVersionRequest(
                    model=common_pb2.ModelRef(name=DEMO_MODEL, version=summary.model_version)
                ),
                timeout=_RPC_TIMEOUT_S,
            )
        ).model_version
    width = _input_width(version)
    rng = random.Random(0)
    async with await agent_channel(sup.cfg, "router") as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        ref = common_pb2.ModelRef(name=DEMO_MODEL, alias="production")

        async def one() -> tuple[float, router_pb2.InferResponse]:
            request = router_pb2.InferRequest(
                model=ref, args=[_random_row(rng, width)], deadline_ms=_INFER_DEADLINE_MS
            )
            started = time.perf_counter()
            reply = await stub.Infer(request, timeout=_RPC_TIMEOUT_S)
            return (time.perf_counter() - started) * 1000.0, reply

        # The first request loads the model into a replica: timed apart from the burst.
        warm_ms, first = await one()
        out.print(
            f"first request (loads the model): {warm_ms:.1f} ms, served by "
            f"{first.model_name} v{first.version} on {first.replica_id}"
        )
        if first.version != summary.model_version:
            raise DemoError(
                f"production served v{first.version}, not the promoted v{summary.model_version}"
            )
        latencies: list[float] = []
        pending = iter(range(requests))

        async def worker() -> None:
            for _ in pending:
                ms, _reply = await one()
                latencies.append(ms)

        await asyncio.gather(*(worker() for _ in range(_BURST_CONCURRENCY)))
    summary.requests = len(latencies)
    summary.p50_ms = percentile(latencies, 50)
    summary.p99_ms = percentile(latencies, 99)
    out.print(
        f"{len(latencies)} requests ({_BURST_CONCURRENCY} at a time, width {width}): "
        f"p50 {summary.p50_ms:.2f} ms, p99 {summary.p99_ms:.2f} ms"
    )


async def _fault(sup: Supervisor, out: Console, summary: DemoSummary) -> None:
    watcher = sup.local.get(FAULT_AGENT)
    if watcher is None:
        raise DemoError(f"{FAULT_AGENT} does not run under this supervisor")
    old_pid = watcher.status().pid
    if old_pid is None:
        raise DemoError(f"{FAULT_AGENT} has no running process ({watcher.state.value})")
    alerts: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def on_alert(msg: Any) -> None:
        try:
            payload = json.loads(msg.data)
        except ValueError:
            return
        if isinstance(payload, dict):
            alerts.put_nowait(payload)

    try:
        nc = await nats.connect(
            sup.cfg.infra.nats_url,
            connect_timeout=5,
            max_reconnect_attempts=3,
            allow_reconnect=True,
        )
    except Exception as exc:  # nats raises several unrelated types for "cannot connect"
        raise DemoError(f"cannot reach NATS at {sup.cfg.infra.nats_url}: {exc!r}") from None
    try:
        # Subscribed before the kill, so the alert it causes cannot be missed.
        await nc.subscribe("alerts.>", cb=on_alert)
        await nc.flush(timeout=5)
        out.print(f"SIGKILL {FAULT_AGENT} (pid {old_pid})")
        try:
            os.kill(old_pid, signal.SIGKILL)
        except ProcessLookupError:
            raise DemoError(f"{FAULT_AGENT} (pid {old_pid}) was already gone") from None
        new_pid = await _wait_restarted(sup, old_pid)
        summary.restarted_pid = (old_pid, new_pid)
        out.print(
            f"supervisor restarted {FAULT_AGENT}: pid {old_pid} -> {new_pid}, "
            f"{sup.local[FAULT_AGENT].state.value} (restarts {sup.local[FAULT_AGENT].restarts})"
        )
        alert = await _wait_alert(alerts, summary)
    finally:
        await nc.close()
    out.print(
        f"alert [bold]{alert.get('kind')}[/] ({alert.get('severity')}) for {alert.get('agent')}: "
        f"{alert.get('message')}",
        highlight=False,
    )


async def _wait_restarted(sup: Supervisor, old_pid: int) -> int:
    deadline = time.monotonic() + _RESTART_TIMEOUT_S
    watcher = sup.local[FAULT_AGENT]
    while time.monotonic() < deadline:
        status = watcher.status()
        if status.state is AgentState.HEALTHY and status.pid not in (None, old_pid):
            assert status.pid is not None
            return status.pid
        if status.state is AgentState.FAILED:
            raise DemoError(f"{FAULT_AGENT} FAILED instead of restarting: {status.reason}")
        await asyncio.sleep(0.1)
    raise DemoError(
        f"{FAULT_AGENT} was not HEALTHY with a new pid within {_RESTART_TIMEOUT_S:.0f}s "
        f"(now {watcher.state.value}: {watcher.reason})"
    )


async def _wait_alert(
    alerts: asyncio.Queue[dict[str, Any]], summary: DemoSummary
) -> dict[str, Any]:
    deadline = time.monotonic() + _ALERT_TIMEOUT_S
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DemoError(
                f"no agent_restarted/agent_down alert for {FAULT_AGENT} within "
                f"{_ALERT_TIMEOUT_S:.0f}s on alerts.> (is the alerts agent up?)"
            )
        try:
            alert = await asyncio.wait_for(alerts.get(), timeout=remaining)
        except TimeoutError:
            continue
        summary.alerts.append(alert)
        if alert.get("agent") == FAULT_AGENT and alert.get("kind") in _ALERT_KINDS:
            return alert


def _print_summary(out: Console, summary: DemoSummary) -> None:
    table = Table(title="graftmesh demo: summary", box=None, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    accuracy = "-" if summary.accuracy is None else f"{summary.accuracy:.3f}"
    table.add_row("accuracy", f"{accuracy} ({summary.accuracy_metric or 'not reported'})")
    table.add_row("parameters", f"{summary.params_before} -> {summary.params_after}")
    others = f"; {', '.join(summary.seeds_other)}" if summary.seeds_other else ""
    table.add_row(
        "seeds grafted",
        f"{len(summary.seeds_grafted)} ({', '.join(summary.seeds_grafted) or 'none'}{others})",
    )
    table.add_row("registered", f"{DEMO_MODEL} v{summary.model_version} (canary, production)")
    table.add_row("compile cache", f"{summary.cache_hits} hits, {summary.cache_misses} misses")
    table.add_row(
        "router latency",
        f"p50 {summary.p50_ms:.2f} ms, p99 {summary.p99_ms:.2f} ms ({summary.requests} requests)",
    )
    if summary.restarted_pid is not None:
        old, new = summary.restarted_pid
        table.add_row("fault", f"{FAULT_AGENT} SIGKILLed (pid {old}), restarted (pid {new})")
    seen = ", ".join(f"{a.get('kind')}:{a.get('agent')}" for a in summary.alerts) or "none"
    table.add_row("alerts", f"{len(summary.alerts)} seen ({seen})")
    out.print(table)


async def _compiler_stats(sup: Supervisor, summary: DemoSummary) -> None:
    async with await agent_channel(sup.cfg, "compiler") as channel:
        stats = await compiler_pb2_grpc.CompilerServiceStub(channel).GetStats(
            compiler_pb2.CompilerServiceGetStatsRequest(), timeout=_RPC_TIMEOUT_S
        )
    summary.cache_hits = stats.cache_hits
    summary.cache_misses = stats.cache_misses


async def run_demo(sup: Supervisor, out: Console) -> int:
    """Run the demo on the mesh `sup` has brought up; 0 when every step succeeded, 1
    (with the failed step and its reason on `out`) otherwise.

    Matches `run_up`'s `then` once the console is bound:
    `functools.partial(run_demo, out=out)`.
    """
    summary = DemoSummary()
    steps = (
        ("train the two spirals, growing seeds", _train),
        ("promote the registered version: canary, then production", _promote),
        ("a burst of inferences through the router", _burst),
        (f"a real fault: SIGKILL the {FAULT_AGENT}", _fault),
    )
    for number, (title, step) in enumerate(steps, start=1):
        _heading(out, number, title)
        try:
            await step(sup, out, summary)
        except DemoError as exc:
            return _failed(out, number, title, str(exc))
        except grpc.aio.AioRpcError as exc:
            return _failed(out, number, title, f"{exc.code().name}: {exc.details()}")
        except NotFoundError as exc:
            return _failed(out, number, title, str(exc))
    _heading(out, len(steps) + 1, "summary")
    try:
        await _compiler_stats(sup, summary)
    except (grpc.aio.AioRpcError, NotFoundError) as exc:
        out.print(f"[yellow]compile cache stats unavailable:[/] {exc}", highlight=False)
    _print_summary(out, summary)
    out.print("[bold green]demo complete[/]")
    return EXIT_OK


def _failed(out: Console, number: int, title: str, why: str) -> int:
    out.print(f"[bold red]demo failed at step {number} ({title}):[/] ", end="")
    out.print(why, markup=False, highlight=False)
    return EXIT_FAILED
