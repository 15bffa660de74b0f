"""The micro-batching policy and queue."""

from __future__ import annotations

from services.router import BatchDecision, BatchPolicy, BatchQueue

POLICY = BatchPolicy(max_batch_size=4, max_wait_us=500)


def test_nothing_queued_or_no_free_replica_waits_for_an_event() -> None:
    assert POLICY.decide(0, 0, free_replicas=2, busy_replicas=0) == BatchDecision(0)
    assert POLICY.decide(3, 900, free_replicas=0, busy_replicas=2) == BatchDecision(0)


def test_a_full_batch_goes_at_once() -> None:
    assert POLICY.decide(9, 0, free_replicas=1, busy_replicas=1) == BatchDecision(4)


def test_an_idle_version_sends_at_once_without_waiting() -> None:
    assert POLICY.decide(1, 0, free_replicas=2, busy_replicas=0) == BatchDecision(1)


def test_while_another_batch_runs_the_queue_waits_up_to_max_wait() -> None:
    assert POLICY.decide(2, 100, free_replicas=1, busy_replicas=1) == BatchDecision(0, 400)
    assert POLICY.decide(2, 500, free_replicas=1, busy_replicas=1) == BatchDecision(2)


def test_max_batch_one_turns_batching_off() -> None:
    off = BatchPolicy(max_batch_size=1, max_wait_us=500)
    assert off.decide(5, 0, free_replicas=1, busy_replicas=1) == BatchDecision(1)


def test_queue_batches_only_requests_of_the_same_key_in_arrival_order() -> None:
    queue: BatchQueue[str] = BatchQueue(BatchPolicy(max_batch_size=8, max_wait_us=0))
    queue.push("a", "a1", 10)
    queue.push("b", "b1", 20)
    queue.push("a", "a2", 30)
    batch, wait = queue.next_batch(100, free_replicas=1, busy_replicas=1)
    assert batch == ["a1", "a2"] and wait is None
    assert queue.next_batch(100, 1, 1) == (["b1"], None)
    assert len(queue) == 0


def test_queue_reports_how_long_to_wait() -> None:
    queue: BatchQueue[str] = BatchQueue(POLICY)
    queue.push("k", "x", 1000)
    assert queue.next_batch(1200, free_replicas=1, busy_replicas=1) == ([], 300)
    assert len(queue) == 1


def test_a_retried_request_goes_before_the_others() -> None:
    queue: BatchQueue[str] = BatchQueue(BatchPolicy(max_batch_size=1, max_wait_us=0))
    queue.push("k", "new", 10)
    queue.push("k", "retried", 20, front=True)
    assert queue.next_batch(30, 1, 0)[0] == ["retried"]


def test_remove_if_takes_out_matching_items() -> None:
    queue: BatchQueue[str] = BatchQueue(POLICY)
    for i, key in enumerate("aab"):
        queue.push(key, f"{key}{i}", i)
    assert sorted(queue.remove_if(lambda item: item.endswith(("0", "2")))) == ["a0", "b2"]
    assert queue.items() == ["a1"] and len(queue) == 1
