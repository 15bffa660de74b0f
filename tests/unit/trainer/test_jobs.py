"""The job store (real SQLite files) and the pure scheduling rules."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from common.errors import InvalidArgumentError, NotFoundError
from services.trainer.jobs import JobRecord, JobState, JobStore, recover, runnable


def record(order: int, state: JobState, *, cancel: bool = False) -> JobRecord:
    return JobRecord(
        job_id=f"job-{order}",
        order=order,
        spec={},
        state=state,
        created_at=float(order),
        cancel_requested=cancel,
    )


def test_runnable_starts_the_oldest_queued_jobs_up_to_the_free_capacity() -> None:
    jobs = [
        record(3, JobState.QUEUED),
        record(1, JobState.QUEUED),
        record(2, JobState.RUNNING),
        record(4, JobState.QUEUED),
        record(0, JobState.SUCCEEDED),
    ]
    assert [j.job_id for j in runnable(jobs, 1)] == []
    assert [j.job_id for j in runnable(jobs, 2)] == ["job-1"]
    assert [j.job_id for j in runnable(jobs, 3)] == ["job-1", "job-3"]
    assert [j.job_id for j in runnable(jobs, 10)] == ["job-1", "job-3", "job-4"]


def test_runnable_never_starts_a_job_whose_cancel_was_requested() -> None:
    jobs = [record(1, JobState.QUEUED, cancel=True), record(2, JobState.QUEUED)]
    assert [j.job_id for j in runnable(jobs, 2)] == ["job-2"]


def test_recover_resumes_running_jobs_in_order_and_cancels_requested_ones() -> None:
    jobs = [
        record(5, JobState.RUNNING),
        record(2, JobState.RUNNING),
        record(3, JobState.RUNNING, cancel=True),
        record(4, JobState.QUEUED),
        record(1, JobState.FAILED),
    ]
    plan = recover(jobs)
    assert plan.resume == ("job-2", "job-5")
    assert plan.cancel == ("job-3",)


def test_a_resumed_job_runs_before_jobs_submitted_after_it() -> None:
    jobs = [record(2, JobState.QUEUED), record(1, JobState.RUNNING)]
    plan = recover(jobs)
    requeued = [replace(j, state=JobState.QUEUED) if j.job_id in plan.resume else j for j in jobs]
    assert [j.job_id for j in runnable(requeued, 1)] == ["job-1"]


def test_store_keeps_jobs_across_reopening(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    job, created = store.create({"name": "a"})
    assert created and job.state is JobState.QUEUED
    store.update(job.job_id, state=JobState.RUNNING, progress={"step": 3}, slots=[{"slot_id": "s"}])
    store.close()
    again = JobStore(tmp_path)
    found = again.get(job.job_id)
    assert found.state is JobState.RUNNING and found.progress == {"step": 3}
    assert found.spec == {"name": "a"} and found.slots == ({"slot_id": "s"},)
    assert (tmp_path / "jobs.db").is_file()
    assert again.job_dir(job.job_id) == tmp_path / "jobs" / job.job_id
    again.close()


def test_store_request_id_returns_the_first_job(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    first, created = store.create({}, request_id="r1")
    second, created_again = store.create({}, request_id="r1")
    third, _ = store.create({})
    assert created and not created_again and first.job_id == second.job_id != third.job_id
    assert store.by_request("r1") == first and store.by_request("r2") is None


def test_store_pages_newest_first_with_a_filter_bound_token(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    ids = [store.create({})[0].job_id for _ in range(5)]
    store.update(ids[1], state=JobState.FAILED)
    page, token, total = store.page([], 2, "")
    assert [j.job_id for j in page] == [ids[4], ids[3]] and total == 5 and token
    page, token, _ = store.page([], 2, token)
    assert [j.job_id for j in page] == [ids[2], ids[1]]
    page, token, _ = store.page([], 2, token)
    assert [j.job_id for j in page] == [ids[0]] and token == ""
    queued, _, total = store.page([JobState.QUEUED], 10, "")
    assert ids[1] not in [j.job_id for j in queued] and total == 4
    _, other, _ = store.page([JobState.QUEUED], 1, "")
    with pytest.raises(InvalidArgumentError) as wrong:
        store.page([], 1, other)
    assert wrong.value.field == "page.page_token"


def test_store_unknown_job_is_not_found(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    with pytest.raises(NotFoundError):
        store.get("job-nope")
    with pytest.raises(NotFoundError):
        store.update("job-nope", message="x")
