"""Replicas: one worker thread per replica, each running its own module of a version.

Why threads: the work is torch kernels, and torch releases the GIL inside them,
so replica threads compute in parallel while the event loop keeps serving gRPC;
a replica needs no copy of the weights in another process and hands its
results back without serialising tensors. Each replica owns one thread, so a
module never runs two batches at once, and batches of one replica run in the
order they were sent. On CUDA each replica thread issues its work on a stream of
its own, so replicas sharing a GPU overlap.

Turning the requests' bytes into tensors, concatenating them into a batch,
splitting the outputs and encoding them for the wire also happen on the
replica's thread: the event loop makes no torch calls for a request (each would
release and re-take the GIL, and wait for it while replicas compute). Results come back to the loop
through `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from common.logging import get_logger
from common.stubs import common_pb2
from services.router.tensors import WireTensor, tensor_to_proto
from services.router.window import Ewma, SlidingWindow

__all__ = ["BatchOutcome", "Inputs", "Replica", "RequestOutputs"]

_log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class RequestOutputs:
    """One request's outputs, as tensors and in their wire form (made on the replica's thread)."""

    tensors: tuple[torch.Tensor, ...]
    wire: tuple[common_pb2.Tensor, ...]


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    """What one batch gave: per request its outputs, or the error; and the compute time."""

    outputs: list[RequestOutputs] | None
    error: BaseException | None
    compute_s: float


# A request's inputs: checked wire tensors (made torch tensors on the replica's thread)
# or torch tensors.
Inputs = Sequence[torch.Tensor | WireTensor]
# Runs on the replica's thread after a successful batch, with the concatenated inputs.
ObserveHook = Callable[[Sequence[torch.Tensor], int], None]
_Job = tuple[list[Inputs], Callable[[BatchOutcome], None]]


def _torch(requests: list[Inputs]) -> list[list[torch.Tensor]]:
    return [[t.to_torch() if isinstance(t, WireTensor) else t for t in r] for r in requests]


def _as_outputs(result: object) -> tuple[torch.Tensor, ...]:
    if isinstance(result, torch.Tensor):
        return (result,)
    if isinstance(result, tuple | list) and all(isinstance(r, torch.Tensor) for r in result):
        return tuple(result)
    raise TypeError(f"the model returned {type(result).__name__}, not tensors")


class Replica:
    """One copy of a version on one device, served by its own thread.

    `module` may be replaced between batches (the next batch uses the new one).
    The loop-side counters (`in_flight_*`, `latency_us`, `cost`, `stats`) are
    only touched on the event loop.
    """

    def __init__(
        self,
        replica_id: str,
        device: str,
        module: torch.nn.Module,
        *,
        price_per_s: float,
        loop: asyncio.AbstractEventLoop,
        stats_window_s: float,
        clock: Callable[[], float] = time.monotonic,
        observe: ObserveHook | None = None,
    ) -> None:
        self.replica_id = replica_id
        self.device = device
        self.module = module
        self.price_per_s = price_per_s
        self.in_flight_batches = 0
        self.in_flight_requests = 0
        self.latency_us = Ewma()
        self.cost = Ewma()
        self.stats = SlidingWindow(stats_window_s, clock)
        self._loop = loop
        self._observe = observe
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._stream: torch.cuda.Stream | None = None
        if device.startswith("cuda"):
            self._stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        self._thread = threading.Thread(
            target=self._work, name=f"replica-{replica_id}", daemon=True
        )
        self._thread.start()

    def submit(self, requests: list[Inputs], done: Callable[[BatchOutcome], None]) -> None:
        """Run one batch (each request's inputs in call order); `done` runs on the loop."""
        self._jobs.put((requests, done))

    def run_now(self, requests: list[Inputs], *, observe: bool = False) -> BatchOutcome:
        """Run one batch on the calling thread, while the replica's own thread is idle.

        For the warm-up (`observe` False: not counted towards drift) and for
        batches that are cheaper to run inline than to hand over.
        """
        return self._execute(requests, observe=observe)

    async def close(self, timeout_s: float = 10.0) -> None:
        """Let the thread finish the batches sent so far, then end it."""
        self._jobs.put(None)
        await asyncio.to_thread(self._thread.join, timeout_s)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            requests, done = job
            outcome = self._execute(requests, observe=True)
            try:
                self._loop.call_soon_threadsafe(done, outcome)
            except RuntimeError:
                return  # the loop is closed: nobody is waiting any more

    def _execute(self, wire_requests: list[Inputs], *, observe: bool) -> BatchOutcome:
        started = time.perf_counter()
        try:
            requests = _torch(wire_requests)
            with torch.inference_mode(), self._on_stream():
                if len(requests) == 1:
                    inputs = requests[0]
                    sizes = [inputs[0].shape[0] if inputs and inputs[0].dim() else 1]
                else:
                    inputs = [torch.cat(parts) for parts in zip(*requests, strict=True)]
                    sizes = [r[0].shape[0] for r in requests]
                on_device = [t.to(self.device, non_blocking=True) for t in inputs]
                outputs = _as_outputs(self.module(*on_device))
                outputs = tuple(o.to("cpu") for o in outputs)
                if len(requests) == 1:
                    per_request = [outputs]
                else:
                    total = sum(sizes)
                    for o in outputs:
                        if o.dim() == 0 or o.shape[0] != total:
                            raise RuntimeError(
                                f"a batch of {total} rows gave an output of shape "
                                f"{list(o.shape)}; it cannot be split per request"
                            )
                    pieces = [torch.split(o, sizes) for o in outputs]
                    per_request = [tuple(p[i] for p in pieces) for i in range(len(requests))]
            compute_s = time.perf_counter() - started
            results = [
                RequestOutputs(outs, tuple(tensor_to_proto(o) for o in outs))
                for outs in per_request
            ]
        except Exception as exc:
            return BatchOutcome(None, exc, time.perf_counter() - started)
        if observe and self._observe is not None:
            try:
                self._observe(inputs, sum(sizes))
            except Exception:
                _log.exception("drift observation failed", replica=self.replica_id)
        return BatchOutcome(results, None, compute_s)

    @contextlib.contextmanager
    def _on_stream(self) -> Iterator[None]:
        if self._stream is None:
            yield
            return
        with torch.cuda.stream(self._stream):
            yield
