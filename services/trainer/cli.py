"""`graftmesh train|jobs|job|cancel`: the trainer's client side.

Each function is a whole command; the `graftmesh` CLI maps its options onto it
and exits with what it returns. The trainer is found through its Redis ready
key, falling back to the config (`common.ready.resolve_address`).

Exit codes: 0 success (`train`: the job SUCCEEDED, or was submitted with
`detach`); 1 the job failed or was cancelled, or the request was refused for
the job's state; 2 a bad spec file or job id (usage); 3 the trainer is not
reachable.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final

import grpc
import yaml
from google.protobuf import json_format
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from common.client_cli import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    connect,
    print_error,
    rpc_failure,
)
from common.config import StartupConfig
from common.stubs import common_pb2, trainer_pb2, trainer_pb2_grpc

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "cancel",
    "job",
    "jobs",
    "load_spec",
    "spec_from_mapping",
    "train",
]

DEFAULT_AGENT: Final = "trainer"
_TIMEOUT_S: Final = 30.0
# How long `train` keeps reconnecting its watch while the trainer is away (it may restart).
_RECONNECT_S: Final = 120.0
_TERMINAL: Final = frozenset(
    {common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED, common_pb2.JOB_STATE_CANCELLED}
)

# Short YAML names of the proto enums.
_ENUMS: Final[Mapping[tuple[str, ...], str]] = {
    ("precision",): "PRECISION_",
    ("growth", "strategy"): "SELECTION_STRATEGY_",
    ("growth", "blend_schedule"): "BLEND_SCHEDULE_",
    ("slots", "*", "kind"): "SLOT_KIND_",
}


class SpecFileError(Exception):
    """The spec file cannot be read or does not match `JobSpec`."""


def _expand(data: Any, path: tuple[str, ...], prefix: str) -> None:
    if not path or not isinstance(data, dict | list):
        return
    head, rest = path[0], path[1:]
    if head == "*":
        for item in data if isinstance(data, list) else []:
            _expand(item, rest, prefix)
        return
    if not isinstance(data, dict) or head not in data:
        return
    if rest:
        _expand(data[head], rest, prefix)
    elif isinstance(data[head], str) and not data[head].upper().startswith(prefix):
        data[head] = prefix + data[head].upper()


def spec_from_mapping(data: Mapping[str, Any]) -> trainer_pb2.JobSpec:
    """The proto `JobSpec` of a YAML/JSON mapping with the proto's field names.

    Enums may be given by their short names (`precision: bf16`, `strategy:
    ucb1`, `blend_schedule: cosine`, `kind: linear`). `SpecFileError` names
    an unknown field or a bad value.
    """
    plain = yaml.safe_load(yaml.safe_dump(dict(data)))  # a deep copy of plain data
    for path, prefix in _ENUMS.items():
        _expand(plain, path, prefix)
    try:
        return json_format.ParseDict(plain, trainer_pb2.JobSpec())
    except json_format.ParseError as exc:
        raise SpecFileError(str(exc)) from None


def load_spec(path: Path | str) -> trainer_pb2.JobSpec:
    """The job spec in a YAML file (see `spec_from_mapping`)."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise SpecFileError(f"{path}: cannot read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise SpecFileError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise SpecFileError(f"{path}: a job spec is a mapping of JobSpec fields")
    return spec_from_mapping(data)


def _state(value: int) -> str:
    return common_pb2.JobState.Name(value).removeprefix("JOB_STATE_")  # type: ignore[arg-type]


def _seed(value: int) -> str:
    return common_pb2.SeedState.Name(value).removeprefix("SEED_STATE_").lower()  # type: ignore[arg-type]


def _watch(
    stub: trainer_pb2_grpc.TrainerServiceStub, job_id: str, after: int
) -> Iterator[trainer_pb2.JobEvent]:
    """The job's events after `after`, reconnecting (resumably) while the trainer is away."""
    deadline = time.monotonic() + _RECONNECT_S
    cursor = after
    while True:
        try:
            for reply in stub.WatchJob(
                trainer_pb2.WatchJobRequest(job_id=job_id, after_sequence=cursor)
            ):
                cursor = reply.event.sequence
                deadline = time.monotonic() + _RECONNECT_S
                yield reply.event
            return
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.5)  # the trainer restarts; try again until the deadline


def _slots_line(slots: Mapping[str, str]) -> str:
    return "  ".join(f"{k}={v}" for k, v in sorted(slots.items())) or "-"


def train(
    cfg: StartupConfig,
    spec_path: Path | str,
    detach: bool,
    out: Console,
    *,
    agent: str = DEFAULT_AGENT,
    request_id: str = "",
) -> int:
    """Submit the YAML job spec at `spec_path`; unless `detach`, follow it to its end."""
    try:
        spec = load_spec(spec_path)
    except SpecFileError as exc:
        print_error(out, str(exc))
        return EXIT_USAGE
    channel = connect(out, cfg, agent)
    if channel is None:
        return EXIT_UNREACHABLE
    with channel:
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        try:
            submitted = stub.SubmitJob(
                trainer_pb2.SubmitJobRequest(spec=spec, request_id=request_id), timeout=_TIMEOUT_S
            ).job
        except grpc.RpcError as exc:
            return rpc_failure(out, exc, agent)
        out.print(f"submitted [bold]{submitted.job_id}[/] ({_state(submitted.state)})")
        if detach:
            return EXIT_OK
        try:
            return _follow(stub, submitted, out)
        except grpc.RpcError as exc:
            return rpc_failure(out, exc, agent)


def _follow(stub: trainer_pb2_grpc.TrainerServiceStub, job: trainer_pb2.Job, out: Console) -> int:
    slots: dict[str, str] = {s.slot_id: _seed(s.state) for s in job.slots}
    with Progress(
        TextColumn("[bold]{task.fields[state]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(),
        console=out,
        transient=False,
    ) as progress:
        task = progress.add_task(
            job.job_id, total=job.progress.total_steps or None, state=_state(job.state), stats=""
        )
        for event in _watch(stub, job.job_id, 0):
            kind = event.WhichOneof("payload")
            if kind == "progress":
                p = event.progress
                parts = [f"loss {p.train_loss:.4f}"]
                if p.HasField("val_loss"):
                    parts.append(f"val {p.val_loss:.4f}")
                for name in sorted(p.metrics)[:2]:
                    parts.append(f"{name} {p.metrics[name]:.4f}")
                parts.append(f"slots {_slots_line(slots)}")
                progress.update(task, completed=event.step, stats="  ".join(parts))
            elif kind == "slot_transition":
                t = event.slot_transition
                slots[t.slot_id] = _seed(t.to_state)
                progress.console.print(
                    f"step {event.step}: slot {t.slot_id} {_seed(t.from_state)} -> "
                    f"{_seed(t.to_state)} {t.blueprint} ({t.reason})"
                )
            elif kind == "state_change":
                c = event.state_change
                progress.update(task, state=_state(c.to_state))
                if c.to_state == common_pb2.JOB_STATE_RUNNING:
                    total = stub.GetJob(
                        trainer_pb2.GetJobRequest(job_id=job.job_id), timeout=_TIMEOUT_S
                    ).job.progress.total_steps
                    if total:
                        progress.update(task, total=total)
    final = stub.GetJob(trainer_pb2.GetJobRequest(job_id=job.job_id), timeout=_TIMEOUT_S).job
    _print_job(out, final)
    return EXIT_OK if final.state == common_pb2.JOB_STATE_SUCCEEDED else EXIT_FAILED


def _print_job(out: Console, job: trainer_pb2.Job) -> None:
    table = Table(box=None, show_header=False)
    table.add_row("job", job.job_id)
    table.add_row("name", job.spec.name or "-")
    table.add_row("state", _state(job.state))
    if job.message:
        table.add_row("message", job.message)
    p = job.progress
    table.add_row("step", f"{p.step}/{p.total_steps or '?'} (epoch {p.epoch})")
    table.add_row("train_loss", f"{p.train_loss:.6g}")
    if p.HasField("val_loss"):
        table.add_row("val_loss", f"{p.val_loss:.6g}")
    for name in sorted(p.metrics):
        table.add_row(name, f"{p.metrics[name]:.6g}")
    table.add_row("params", str(p.param_count))
    for slot in job.slots:
        table.add_row(
            f"slot {slot.slot_id}",
            f"{_seed(slot.state)} {slot.blueprint} {slot.kernel_id[:12]}".strip(),
        )
    if job.checkpoint_path:
        table.add_row("checkpoint", job.checkpoint_path)
    if job.registered_model.name:
        table.add_row("registered", f"{job.registered_model.name} v{job.registered_model.version}")
    out.print(table)


def jobs(cfg: StartupConfig, out: Console, *, agent: str = DEFAULT_AGENT, limit: int = 100) -> int:
    """A table of the newest `limit` jobs."""
    channel = connect(out, cfg, agent)
    if channel is None:
        return EXIT_UNREACHABLE
    with channel:
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        try:
            reply = stub.ListJobs(
                trainer_pb2.ListJobsRequest(page=common_pb2.PageRequest(page_size=limit)),
                timeout=_TIMEOUT_S,
            )
        except grpc.RpcError as exc:
            return rpc_failure(out, exc, agent)
    table = Table(header_style="bold", box=None)
    for column in ("job", "name", "state", "step", "val_loss", "message"):
        table.add_column(column)
    for j in reply.jobs:
        p = j.progress
        table.add_row(
            j.job_id,
            j.spec.name or "-",
            _state(j.state),
            f"{p.step}/{p.total_steps or '?'}",
            f"{p.val_loss:.4g}" if p.HasField("val_loss") else "-",
            j.message[:60],
        )
    out.print(table)
    return EXIT_OK


def job(cfg: StartupConfig, job_id: str, out: Console, *, agent: str = DEFAULT_AGENT) -> int:
    """The details of one job."""
    channel = connect(out, cfg, agent)
    if channel is None:
        return EXIT_UNREACHABLE
    with channel:
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        try:
            found = stub.GetJob(trainer_pb2.GetJobRequest(job_id=job_id), timeout=_TIMEOUT_S).job
        except grpc.RpcError as exc:
            return rpc_failure(out, exc, agent)
    _print_job(out, found)
    return EXIT_OK


def cancel(
    cfg: StartupConfig, job_id: str, out: Console, *, agent: str = DEFAULT_AGENT, reason: str = ""
) -> int:
    """Cancel a queued or running job (a running one stops after its current step)."""
    channel = connect(out, cfg, agent)
    if channel is None:
        return EXIT_UNREACHABLE
    with channel:
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        try:
            found = stub.CancelJob(
                trainer_pb2.CancelJobRequest(job_id=job_id, reason=reason or "cancelled by cli"),
                timeout=_TIMEOUT_S,
            ).job
        except grpc.RpcError as exc:
            return rpc_failure(out, exc, agent)
    out.print(f"{found.job_id}: {_state(found.state)} {found.message}".rstrip())
    return EXIT_OK
