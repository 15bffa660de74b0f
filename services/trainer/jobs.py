"""Training jobs: their records in SQLite and the order they run in.

`JobStore` keeps one row per job in `<run_dir>/trainer/jobs.db` (stdlib
`sqlite3`, WAL): the submitted spec (the proto `JobSpec` as JSON), the state
(the `JobState` enum names of `common.proto`, without the prefix), timestamps,
the latest progress, the message (why it failed, was cancelled, or how growth
went), the latest checkpoint, and the result (metrics, export folder,
registered version). Each job's files live in `<run_dir>/trainer/jobs/<id>/`.

Scheduling is pure (`runnable`, `recover`): jobs run first in, first out, at
most `max_jobs` at once. A trainer that restarts finds its RUNNING jobs (the
previous process died under them) and puts them back at the head of the queue
in their original order; they resume from their last checkpoint.

The store is safe to use from several threads (one connection behind a lock).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Final

from common.errors import InvalidArgumentError, NotFoundError

__all__ = [
    "TERMINAL",
    "JobRecord",
    "JobState",
    "JobStore",
    "Recovery",
    "new_job_id",
    "recover",
    "runnable",
]

DEFAULT_PAGE_SIZE: Final = 100
MAX_PAGE_SIZE: Final = 1000


class JobState(StrEnum):
    """A job's state: the `JobState` enum of `common.proto`, without its prefix."""

    PENDING = "PENDING"
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL: Final = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


@dataclass(frozen=True)
class JobRecord:
    """One job as stored. `order` is its submission number (FIFO key)."""

    job_id: str
    order: int
    spec: Mapping[str, Any]
    state: JobState
    created_at: float
    request_id: str = ""
    started_at: float | None = None
    finished_at: float | None = None
    message: str = ""
    progress: Mapping[str, Any] = field(default_factory=dict)
    slots: Sequence[Mapping[str, Any]] = ()
    checkpoint_path: str = ""
    result: Mapping[str, Any] = field(default_factory=dict)
    last_event_sequence: int = 0
    cancel_requested: bool = False


def new_job_id() -> str:
    """A fresh job id: `job-` and 12 hex digits (safe in NATS subjects and paths)."""
    return f"job-{uuid.uuid4().hex[:12]}"


# --- pure scheduling ------------------------------------------------------------------------


def runnable(jobs: Sequence[JobRecord], max_jobs: int) -> list[JobRecord]:
    """The QUEUED jobs to start now: oldest first, up to the free capacity.

    Capacity is `max_jobs` minus the RUNNING jobs; a job whose cancel was
    requested is never started.
    """
    running = sum(1 for j in jobs if j.state is JobState.RUNNING)
    free = max(0, max_jobs - running)
    queued = sorted(
        (j for j in jobs if j.state is JobState.QUEUED and not j.cancel_requested),
        key=lambda j: j.order,
    )
    return queued[:free]


@dataclass(frozen=True)
class Recovery:
    """What a restarted trainer does with the jobs its predecessor left behind."""

    resume: tuple[str, ...]
    """RUNNING jobs put back in the queue, to resume from their checkpoints."""
    cancel: tuple[str, ...]
    """Jobs whose cancel was requested before the restart: they end CANCELLED."""


def recover(jobs: Sequence[JobRecord]) -> Recovery:
    """Decide the fate of unfinished jobs after a restart (nothing ever stays RUNNING)."""
    resume, cancel = [], []
    for job in sorted(jobs, key=lambda j: j.order):
        if job.state.terminal:
            continue
        if job.cancel_requested:
            cancel.append(job.job_id)
        elif job.state is JobState.RUNNING:
            resume.append(job.job_id)
    return Recovery(tuple(resume), tuple(cancel))


# --- the store ------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    ord INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL UNIQUE,
    request_id TEXT NOT NULL DEFAULT '',
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    message TEXT NOT NULL DEFAULT '',
    progress TEXT NOT NULL DEFAULT '{}',
    slots TEXT NOT NULL DEFAULT '[]',
    checkpoint_path TEXT NOT NULL DEFAULT '',
    result TEXT NOT NULL DEFAULT '{}',
    last_event_sequence INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_request ON jobs (request_id) WHERE request_id != '';
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state);
"""

_COLUMNS = (
    "ord, job_id, request_id, spec, state, created_at, started_at, finished_at, message, "
    "progress, slots, checkpoint_path, result, last_event_sequence, cancel_requested"
)
_JSON_FIELDS = ("spec", "progress", "slots", "result")
_UPDATABLE = frozenset(
    {
        "state",
        "started_at",
        "finished_at",
        "message",
        "progress",
        "slots",
        "checkpoint_path",
        "result",
        "last_event_sequence",
        "cancel_requested",
    }
)


def _row(row: tuple[Any, ...]) -> JobRecord:
    return JobRecord(
        order=row[0],
        job_id=row[1],
        request_id=row[2],
        spec=json.loads(row[3]),
        state=JobState(row[4]),
        created_at=row[5],
        started_at=row[6],
        finished_at=row[7],
        message=row[8],
        progress=json.loads(row[9]),
        slots=tuple(json.loads(row[10])),
        checkpoint_path=row[11],
        result=json.loads(row[12]),
        last_event_sequence=row[13],
        cancel_requested=bool(row[14]),
    )


class JobStore:
    """The trainer's jobs in `<root>/jobs.db`, their files in `<root>/jobs/<id>/`."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            self.root / "jobs.db", check_same_thread=False, isolation_level=None
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def job_dir(self, job_id: str) -> Path:
        """The folder of a job's checkpoints and exported model."""
        return self.root / "jobs" / job_id

    def create(self, spec: Mapping[str, Any], *, request_id: str = "") -> tuple[JobRecord, bool]:
        """A new QUEUED job, or (with a known `request_id`) the job it made before.

        The flag says whether a job was created.
        """
        with self._lock:
            if request_id:
                found = self._db.execute(
                    f"SELECT {_COLUMNS} FROM jobs WHERE request_id = ?", (request_id,)
                ).fetchone()
                if found is not None:
                    return _row(found), False
            job_id = new_job_id()
            self._db.execute(
                "INSERT INTO jobs (job_id, request_id, spec, state, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (
                    job_id,
                    request_id,
                    json.dumps(spec, sort_keys=True),
                    JobState.QUEUED,
                    time.time(),
                ),
            )
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,)
            ).fetchone()
        return _row(row), True

    def by_request(self, request_id: str) -> JobRecord | None:
        """The job a submit with `request_id` created, if any."""
        with self._lock:
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE request_id = ?", (request_id,)
            ).fetchone()
        return None if row is None else _row(row)

    def get(self, job_id: str) -> JobRecord:
        with self._lock:
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,)
            ).fetchone()
        if row is None:
            raise NotFoundError(f"no job {job_id!r}")
        return _row(row)

    def update(self, job_id: str, **changes: Any) -> JobRecord:
        """Change some fields of a job (see `JobRecord`); the job as it is now."""
        unknown = set(changes) - _UPDATABLE
        if unknown:
            raise ValueError(f"not updatable: {', '.join(sorted(unknown))}")
        values = {
            k: json.dumps(v, sort_keys=True) if k in _JSON_FIELDS else v for k, v in changes.items()
        }
        if "state" in values:
            values["state"] = JobState(values["state"]).value
        if "cancel_requested" in values:
            values["cancel_requested"] = int(bool(values["cancel_requested"]))
        sets = ", ".join(f"{k} = ?" for k in values)
        with self._lock:
            cursor = self._db.execute(
                f"UPDATE jobs SET {sets} WHERE job_id = ?", (*values.values(), job_id)
            )
        if cursor.rowcount == 0:
            raise NotFoundError(f"no job {job_id!r}")
        return self.get(job_id)

    def all(self, states: Sequence[JobState] = ()) -> list[JobRecord]:
        """Every job (in `states`, when given), oldest first."""
        return list(self._select(states, newest_first=False))

    def page(
        self, states: Sequence[JobState], page_size: int, page_token: str
    ) -> tuple[list[JobRecord], str, int]:
        """One page of jobs, newest first: the jobs, the next page token ("" at the end), the total.

        The token encodes the filter; reusing it with another filter is INVALID_ARGUMENT.
        """
        size = DEFAULT_PAGE_SIZE if page_size <= 0 else min(page_size, MAX_PAGE_SIZE)
        key = ",".join(sorted(s.value for s in states))
        before: int | None = None
        if page_token:
            token_key, _, raw = page_token.partition("@")
            if token_key != key or not raw.isdigit():
                raise InvalidArgumentError(
                    "page_token was not issued for this filter", field="page.page_token"
                )
            before = int(raw)
        rows = list(self._select(states, newest_first=True, before=before, limit=size + 1))
        total = self._count(states)
        more = len(rows) > size
        rows = rows[:size]
        token = f"{key}@{rows[-1].order}" if more and rows else ""
        return rows, token, total

    def _where(self, states: Sequence[JobState], before: int | None) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        args: list[Any] = []
        if states:
            clauses.append(f"state IN ({', '.join('?' for _ in states)})")
            args.extend(JobState(s).value for s in states)
        if before is not None:
            clauses.append("ord < ?")
            args.append(before)
        return (f"WHERE {' AND '.join(clauses)}" if clauses else ""), args

    def _select(
        self,
        states: Sequence[JobState],
        *,
        newest_first: bool,
        before: int | None = None,
        limit: int | None = None,
    ) -> Iterator[JobRecord]:
        where, args = self._where(states, before)
        sql = (
            f"SELECT {_COLUMNS} FROM jobs {where} ORDER BY ord {'DESC' if newest_first else 'ASC'}"
        )
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return (_row(r) for r in rows)

    def _count(self, states: Sequence[JobState]) -> int:
        where, args = self._where(states, None)
        with self._lock:
            (count,) = self._db.execute(f"SELECT COUNT(*) FROM jobs {where}", args).fetchone()
        return int(count)
