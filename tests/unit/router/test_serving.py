"""One served version with real replicas (threads, exported torch models): batching,
retries on another replica, ejection, deadlines, queue limits, draining, drift."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import torch
from torch import nn

from common.errors import DeadlineExceededError, ResourceExhaustedError, UnavailableError
from services.router import DriftReport, reference_from_samples
from services.router.serving import ServedVersion, VersionState
from services.router.settings import RouterSettings
from tests.unit.router import model_factory as mf
from tests.wait import eventually


class Gate(nn.Module):
    """Runs the inner module once `opened` is set; records each call's batch size."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.opened = threading.Event()
        self.sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(int(x.shape[0]))
        if not self.opened.wait(10):
            raise RuntimeError("gate never opened")
        result: torch.Tensor = self.inner(x)
        return result


class Broken(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        raise RuntimeError("device lost")


def settings(**overrides: Any) -> RouterSettings:
    base: dict[str, Any] = {
        "replicas": 2,
        "batching": {"max_batch_size": 16, "max_wait_us": 2000},
        "ejection": {"consecutive_failures": 2, "base_ejection_s": 30, "jitter": 0},
        "drift": {"enabled": False},
        # Gates block the module they wrap: these tests need the replica threads.
        "inline_max_us": 0,
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return RouterSettings.model_validate(base)


Factory = Callable[..., Any]


@pytest.fixture
async def serve() -> AsyncIterator[Factory]:
    started: list[ServedVersion] = []

    async def make(
        module: nn.Module | None = None,
        reference: dict[str, Any] | None = None,
        on_drift: Callable[[ServedVersion, DriftReport], None] | None = None,
        **overrides: Any,
    ) -> ServedVersion:
        served = ServedVersion(
            "m", 1, mf.loaded(module, reference), settings(**overrides), on_drift=on_drift
        )
        await served.start()
        started.append(served)
        return served

    yield make
    for served in started:
        for replica in served.replicas.values():
            inner = replica.module
            if isinstance(inner, Gate):
                inner.opened.set()
        await served.stop()


async def test_a_request_is_served_by_a_replica_with_its_cost_and_stats(serve: Factory) -> None:
    module = mf.mlp(seed=2)
    served = await serve(module)
    x = torch.randn(3, mf.IN_FEATURES)
    result = await served.infer([x])
    with torch.inference_mode():
        assert torch.allclose(result.outputs[0], module(x), atol=1e-6)
    assert result.replica_id in served.replicas and result.cost > 0
    summary = served.stats.summary()
    assert (summary.requests, summary.errors) == (1, 0)
    assert served.available and served.cost_estimate() is not None


async def test_requests_arriving_while_a_batch_runs_are_batched_and_answered_each(
    serve: Factory,
) -> None:
    module = mf.mlp(seed=4)
    served = await serve(module, replicas=1)
    replica = next(iter(served.replicas.values()))
    gate = Gate(replica.module)
    replica.module = gate
    inputs = [torch.randn(1 + i % 3, mf.IN_FEATURES) for i in range(11)]
    first = asyncio.create_task(served.infer([inputs[0]]))
    await eventually(lambda: gate.sizes == [1], 5, "the first request running")
    rest = [asyncio.create_task(served.infer([x])) for x in inputs[1:]]
    await eventually(lambda: len(served.queue) == 10, 5, "ten requests queued")
    gate.opened.set()
    results = await asyncio.gather(first, *rest)
    assert gate.sizes[0] == 1 and len(gate.sizes) == 2
    assert gate.sizes[1] == sum(x.shape[0] for x in inputs[1:])
    with torch.inference_mode():
        for x, result in zip(inputs, results, strict=True):
            assert torch.allclose(result.outputs[0], module(x), atol=1e-5)


async def test_batches_are_capped_at_max_batch_size(serve: Factory) -> None:
    served = await serve(replicas=1, batching={"max_batch_size": 4})
    replica = next(iter(served.replicas.values()))
    gate = Gate(replica.module)
    replica.module = gate
    first = asyncio.create_task(served.infer([torch.randn(1, mf.IN_FEATURES)]))
    await eventually(lambda: gate.sizes == [1], 5, "the first request running")
    rest = [asyncio.create_task(served.infer([torch.randn(1, mf.IN_FEATURES)])) for _ in range(10)]
    await eventually(lambda: len(served.queue) == 10, 5, "ten requests queued")
    gate.opened.set()
    await asyncio.gather(first, *rest)
    assert gate.sizes == [1, 4, 4, 2]


async def test_without_batching_each_request_runs_alone(serve: Factory) -> None:
    served = await serve(replicas=1, batching={"max_batch_size": 1})
    replica = next(iter(served.replicas.values()))
    gate = Gate(replica.module)
    replica.module = gate
    gate.opened.set()
    await asyncio.gather(*(served.infer([torch.randn(2, mf.IN_FEATURES)]) for _ in range(6)))
    assert gate.sizes == [2] * 6


class ThreadRecorder(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.threads: list[str] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.threads.append(threading.current_thread().name)
        result: torch.Tensor = self.inner(x)
        return result


async def test_work_cheaper_than_the_thread_hand_over_runs_on_the_loop(
    serve: Factory,
) -> None:
    inline = await serve(replicas=1, inline_max_us=1e9)
    never = await serve(replicas=1, inline_max_us=0)
    recorders = []
    for served in (inline, never):
        replica = next(iter(served.replicas.values()))
        recorder = ThreadRecorder(replica.module)
        replica.module = recorder
        recorders.append(recorder)
        # The first request measures the hand-over; the others use what it showed.
        for _ in range(3):
            result = await served.infer([torch.randn(2, mf.IN_FEATURES)])
            assert result.outputs[0].shape == (2, mf.OUT_FEATURES)
        if served is inline:
            # Make the measurement unambiguous on a noisy machine.
            served.handoff_us.value = 1e9
            await served.infer([torch.randn(2, mf.IN_FEATURES)])
    here = threading.current_thread().name
    assert recorders[0].threads[0].startswith("replica-")
    assert recorders[0].threads[-1] == here
    assert all(t.startswith("replica-") for t in recorders[1].threads)


async def test_a_failing_replica_is_retried_elsewhere_ejected_and_loses_nothing(
    serve: Factory,
) -> None:
    served = await serve()
    bad_id, good_id = sorted(served.replicas)
    broken = Broken()
    served.replicas[bad_id].module = broken
    # The replica that starts failing is the one the picker prefers (the fastest so far).
    served.replicas[bad_id].latency_us.value = 1.0
    results = [await served.infer([torch.randn(2, mf.IN_FEATURES)]) for _ in range(20)]
    assert all(r.replica_id == good_id for r in results)
    assert served.detector.is_ejected(bad_id)
    assert broken.calls == 2  # the ejection threshold; each of them retried on the good one
    assert served.stats.summary().errors == 0
    assert served.replicas[bad_id].stats.summary().errors == broken.calls


async def test_a_request_that_fails_on_every_attempt_is_unavailable(serve: Factory) -> None:
    served = await serve(max_attempts=2)
    for replica in served.replicas.values():
        replica.module = Broken()
    with pytest.raises(UnavailableError, match="2 attempt"):
        await served.infer([torch.randn(1, mf.IN_FEATURES)])
    assert served.stats.summary().errors == 1


async def test_the_deadline_is_honoured_while_queued(serve: Factory) -> None:
    served = await serve(replicas=1)
    replica = next(iter(served.replicas.values()))
    gate = Gate(replica.module)
    replica.module = gate
    blocker = asyncio.create_task(served.infer([torch.randn(1, mf.IN_FEATURES)]))
    await eventually(lambda: gate.sizes == [1], 5, "the replica busy")
    loop_now = asyncio.get_running_loop().time()
    with pytest.raises(DeadlineExceededError):
        await served.infer([torch.randn(1, mf.IN_FEATURES)], deadline=loop_now + 0.05)
    gate.opened.set()
    await blocker
    assert gate.sizes == [1]  # the expired request never ran


async def test_a_full_queue_is_refused_as_resource_exhausted(serve: Factory) -> None:
    served = await serve(replicas=1, batching={"max_queue": 2})
    replica = next(iter(served.replicas.values()))
    gate = Gate(replica.module)
    replica.module = gate
    running = asyncio.create_task(served.infer([torch.randn(1, mf.IN_FEATURES)]))
    await eventually(lambda: gate.sizes == [1], 5, "the replica busy")
    queued = [asyncio.create_task(served.infer([torch.randn(1, mf.IN_FEATURES)])) for _ in range(2)]
    await eventually(lambda: len(served.queue) == 2, 5, "two queued")
    with pytest.raises(ResourceExhaustedError):
        await served.infer([torch.randn(1, mf.IN_FEATURES)])
    gate.opened.set()
    await asyncio.gather(running, *queued)


async def test_draining_finishes_the_queue_then_stops(serve: Factory) -> None:
    served = await serve(replicas=1)
    replica = next(iter(served.replicas.values()))
    gate = Gate(replica.module)
    replica.module = gate
    requests = [
        asyncio.create_task(served.infer([torch.randn(1, mf.IN_FEATURES)])) for _ in range(4)
    ]
    await eventually(lambda: gate.sizes == [1], 5, "the replica busy")
    drain = asyncio.create_task(served.drain(timeout_s=10))
    await eventually(lambda: served.state is VersionState.DRAINING, 5, "draining")
    assert not served.available
    with pytest.raises(UnavailableError, match="draining"):
        await served.infer([torch.randn(1, mf.IN_FEATURES)])
    gate.opened.set()
    await asyncio.gather(*requests)
    await drain
    assert served.state is VersionState.STOPPED


async def test_drift_windows_reach_the_callback(serve: Factory) -> None:
    torch.manual_seed(0)
    reference = reference_from_samples(torch.randn(5000, mf.IN_FEATURES))
    reports: list[DriftReport] = []
    served = await serve(
        reference={"inputs": {"x": reference.model_dump()}},
        on_drift=lambda version, report: reports.append(report),
        drift={"enabled": True, "window_rows": 1024},
    )
    for _ in range(4):
        shifted = torch.randn(512, mf.IN_FEATURES)
        shifted[:, 5] += 2.0
        await served.infer([shifted])
    await eventually(lambda: len(reports) >= 2, 5, "two drift windows")
    assert [f for _, f, _ in reports[0].over(0.2)] == [5]
