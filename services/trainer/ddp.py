"""Data-parallel training: the same job on N processes, launched by `torchrun`.

    torchrun --nproc-per-node 2 -m services.trainer.ddp spec.yaml --out runs/spirals

Every rank builds the same `DistributedTrainer` (gloo on CPU, nccl on CUDA,
one GPU per rank) and the ranks stay in lockstep:

- **Data.** Each step serves the batch the single-process job would serve
  (same sampler, same position); rank r trains on the r-th of N near-equal
  pieces of it (`RankShardSampler`). Gradients are weighted by each piece's
  share and summed across ranks, so a step follows the gradient of the whole
  batch as one process would (up to summation order), the step count and
  epochs are those of the single-process job, and checkpoints are
  interchangeable between the two.
- **Gradients.** No `DistributedDataParallel` wrapper: after backward the
  gradients of every parameter in the optimizer are flattened and all-reduced
  (`_synchronize_gradients`), together with the loss and a cancel flag. A
  grafted seed joins the optimizer when grafted, so its gradients are
  combined from that step on and nothing needs re-wrapping (a wrapper would,
  after every graft, cull and rollback). The price: no overlap of
  communication with backward, which small hosts do not miss. Buffers (batch
  norm statistics) are broadcast from rank 0 after each step, as DDP does.
- **Decisions.** Every decision is taken from values that are the same on
  every rank: the all-reduced loss (non-finite skips, spikes, rollbacks) and
  **rank 0's metrics** (each evaluation runs on rank 0 and its numbers are
  broadcast), which drive the plateau detector and the fossilize-or-cull
  judgement; the lifecycle otherwise moves by step counts. So all ranks walk
  the seed lifecycle together.
- **Growth.** Only rank 0 talks to the seed selector and the compiler
  (`ReplicatedGrowthController`): every answer that passes the controller's
  one door to them (`_guarded`) is broadcast as a JSON header plus raw bytes
  (uint8 tensors, nothing pickled); a kernel's bytes are checked against the
  sha256 rank 0 sent before any rank loads them (and `load_kernel` checks the
  kernel's own sha256 on every rank). Followers replay the answers, so every
  rank grafts the same kernel at the same step.
- **Checkpoints.** Rank 0 writes them; the others keep the in-memory copy
  rollbacks need. A resume reads the newest valid checkpoint on rank 0 and
  broadcasts its bytes, so followers need no shared file system.
- **Cancel.** A rank's cancel request travels with the next gradient
  all-reduce; every rank stops after the same step.

A rank that finds the ranks have diverged (damaged bytes, a failure on rank 0
in a growth call) raises `ReplicaDivergenceError`; torchrun then stops the
other ranks. Callbacks run on every rank and must decide alike (a callback that
stops training on one rank only would leave the others waiting).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import hashlib
import importlib
import json
import os
import signal
import socket
import sys
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import IO, Any, Final, TypeVar, cast

import torch
import torch.distributed as dist
from torch import nn

from common import errors as mesh_errors
from common.errors import FailedPreconditionError, GraftmeshError, InvalidArgumentError
from common.kernels import load_kernel
from services.trainer.checkpoint import (
    CheckpointData,
    CheckpointInfo,
    CheckpointStore,
    decode,
    encode,
)
from services.trainer.data import DataBundle, Split
from services.trainer.events import EventSink, TrainingEvent
from services.trainer.export import ExportedModel
from services.trainer.files import sha256_hex
from services.trainer.growth import (
    BlueprintOption,
    GrowthController,
    KernelArtifact,
    KernelLoader,
    KernelSource,
    SeedSelectorClient,
    Selection,
    SelectionRequest,
)
from services.trainer.loop import Trainer, TrainingResult
from services.trainer.sampler import EpochSampler
from services.trainer.seeds import SlotShape
from services.trainer.spec import GrowthSpec, JobSpec, parse_job_spec

__all__ = [
    "Communicator",
    "DistributedTrainer",
    "GrowthFactory",
    "RankShardSampler",
    "ReplicaDivergenceError",
    "ReplicatedGrowthController",
    "main",
    "state_sha256",
]

T = TypeVar("T")

GrowthFactory = Callable[[JobSpec, Path], tuple[SeedSelectorClient, KernelSource]]
"""`factory(spec, out_dir)`: the seed selector and kernel source rank 0 talks to."""

_ROOT: Final = 0
_LENGTH_BYTES: Final = 8


class ReplicaDivergenceError(RuntimeError):
    """The ranks can no longer stay in lockstep (damaged bytes, rank 0 failed); the job stops."""


# --- the wire --------------------------------------------------------------------------------


class Communicator:
    """Collectives over the default process group; tensors live on `device`.

    `device` is the CPU for gloo and the rank's GPU for nccl. Every method is
    a collective: all ranks call it in the same order.
    """

    def __init__(self, rank: int, world_size: int, device: torch.device) -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = device

    @classmethod
    def from_process_group(cls, device: torch.device) -> Communicator:
        """The communicator of this process in the initialised default group."""
        return cls(dist.get_rank(), dist.get_world_size(), device)

    @property
    def is_root(self) -> bool:
        return self.rank == _ROOT

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        """Sum `tensor` over the ranks, in place (the same bits on every rank)."""
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)

    def broadcast(self, tensor: torch.Tensor) -> None:
        """Overwrite `tensor` with rank 0's, in place."""
        if self.world_size > 1:
            dist.broadcast(tensor, src=_ROOT)

    def broadcast_bytes(self, data: bytes | None) -> bytes:
        """Rank 0's `data` on every rank (followers pass None): its length, then its bytes."""
        if self.is_root:
            data = data or b""
            size = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
            self.broadcast(size)
            if data:
                self.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device))
            return data
        size = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.broadcast(size)
        length = int(size.item())
        if length == 0:
            return b""
        buffer = torch.empty(length, dtype=torch.uint8, device=self.device)
        self.broadcast(buffer)
        return bytes(buffer.cpu().numpy().tobytes())

    def broadcast_message(
        self, header: Mapping[str, Any] | None, payload: bytes = b""
    ) -> tuple[dict[str, Any], bytes]:
        """Rank 0's JSON `header` and raw `payload` on every rank (followers pass None).

        The frame is the header's length (8 bytes), the header (UTF-8 JSON)
        and the payload, sent as one uint8 tensor: nothing is pickled.
        """
        if self.is_root:
            if header is None:
                raise InvalidArgumentError("rank 0 must send a header")
            text = json.dumps(dict(header), sort_keys=True).encode()
            frame = len(text).to_bytes(_LENGTH_BYTES, "little") + text + payload
            self.broadcast_bytes(frame)
            return dict(header), payload
        frame = self.broadcast_bytes(None)
        length = int.from_bytes(frame[:_LENGTH_BYTES], "little")
        try:
            received = json.loads(frame[_LENGTH_BYTES : _LENGTH_BYTES + length])
        except ValueError as exc:
            raise ReplicaDivergenceError(f"rank {self.rank}: unreadable message: {exc}") from exc
        return received, frame[_LENGTH_BYTES + length :]


def _in_buckets(tensors: Iterable[torch.Tensor], apply: Callable[[torch.Tensor], None]) -> None:
    """`apply` to one flat copy per (dtype, device) of `tensors`, then copy the result back."""
    buckets: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for tensor in tensors:
        buckets.setdefault((tensor.dtype, tensor.device), []).append(tensor)
    for bucket in buckets.values():
        flat = torch.cat([t.detach().reshape(-1) for t in bucket])
        apply(flat)
        offset = 0
        for tensor in bucket:
            n = tensor.numel()
            with torch.no_grad():
                tensor.copy_(flat[offset : offset + n].view_as(tensor))
            offset += n


def state_sha256(model: nn.Module) -> str:
    """sha256 over the model's state dict (names, dtypes, shapes, bytes), in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        value = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# --- data -------------------------------------------------------------------------------------


class RankShardSampler(EpochSampler):
    """The single-process batches, each split into `world_size` near-equal pieces; rank's own.

    The position (and `state_dict`) is that of the whole batch, so it resumes
    like `EpochSampler` and agrees with a single-process run of the same job.
    `global_batch` is the size of the whole batch last served.
    """

    def __init__(
        self, size: int, batch_size: int, seed: int, *, rank: int, world_size: int
    ) -> None:
        super().__init__(size, batch_size, seed)
        if not 0 <= rank < world_size:
            raise InvalidArgumentError(f"rank {rank} is outside a world of {world_size}")
        smallest = min(batch_size, size)
        if smallest < world_size:
            raise InvalidArgumentError(
                f"a batch of {smallest} samples cannot be split over {world_size} ranks; raise "
                f"data.batch_size to at least {world_size} or use fewer ranks",
                field="data.batch_size",
            )
        self.rank = rank
        self.world_size = world_size
        self.global_batch = 0

    def next_batch(self) -> torch.Tensor | None:
        batch = super().next_batch()
        if batch is None:
            return None
        self.global_batch = len(batch)
        return batch.tensor_split(self.world_size)[self.rank]


# --- growth -----------------------------------------------------------------------------------


class _OnRankZero:
    """Stands in for the selector and the compiler on followers, which never call them."""

    async def select(self, request: SelectionRequest) -> Selection:
        raise ReplicaDivergenceError("a follower rank asked the seed selector")

    async def report(self, decision_id: str, reward: float, metrics: Mapping[str, float]) -> None:
        raise ReplicaDivergenceError("a follower rank reported to the seed selector")

    async def blueprints(self, slot: SlotShape) -> Sequence[BlueprintOption]:
        raise ReplicaDivergenceError("a follower rank asked the compiler")

    async def compile(
        self, blueprint: str, slot: SlotShape, *, training: bool = True
    ) -> KernelArtifact:
        raise ReplicaDivergenceError("a follower rank asked the compiler")


def _encode_answer(answer: object) -> tuple[dict[str, Any], bytes]:
    if answer is None:
        return {"outcome": "unavailable"}, b""
    if isinstance(answer, KernelArtifact):
        header = {
            "outcome": "kernel",
            "kernel_id": answer.kernel_id,
            "sha256": answer.sha256,
            "param_count": answer.param_count,
            "payload_sha256": sha256_hex(answer.data),
        }
        return header, answer.data
    if isinstance(answer, Selection):
        return {"outcome": "selection", **dataclasses.asdict(answer)}, b""
    if isinstance(answer, bool):
        return {"outcome": "flag", "value": answer}, b""
    if isinstance(answer, Sequence) and all(isinstance(o, BlueprintOption) for o in answer):
        options = [[o.name, o.added_params] for o in answer]
        return {"outcome": "blueprints", "options": options}, b""
    raise ReplicaDivergenceError(f"cannot send a growth answer of type {type(answer).__name__}")


def _decode_answer(header: Mapping[str, Any], payload: bytes, rank: int) -> object:
    outcome = header["outcome"]
    if outcome == "unavailable":
        return None
    if outcome == "kernel":
        actual = sha256_hex(payload)
        if actual != header["payload_sha256"]:
            raise ReplicaDivergenceError(
                f"rank {rank}: kernel {header['kernel_id']} arrived with sha256 {actual}, rank 0 "
                f"sent {header['payload_sha256']}"
            )
        return KernelArtifact(
            str(header["kernel_id"]), str(header["sha256"]), payload, int(header["param_count"])
        )
    if outcome == "selection":
        return Selection(
            str(header["decision_id"]), header["slot_id"], header["blueprint"], header["reason"]
        )
    if outcome == "flag":
        return bool(header["value"])
    if outcome == "blueprints":
        return [BlueprintOption(str(n), int(p)) for n, p in header["options"]]
    raise ReplicaDivergenceError(f"rank {rank}: unknown growth answer {outcome!r}")


def _rebuild_error(name: str, message: str) -> GraftmeshError:
    """The mesh error rank 0 got, as the same class where it can be rebuilt from a message."""
    cls = getattr(mesh_errors, name, None)
    if isinstance(cls, type) and issubclass(cls, GraftmeshError):
        with contextlib.suppress(TypeError):
            return cls(message)
    return GraftmeshError(message)


class ReplicatedGrowthController(GrowthController):
    """A `GrowthController` whose remote answers come from rank 0 (see the module doc).

    Rank 0 passes the real `selector` and `kernels`; the others pass nothing.
    Every rank builds one at the same point (construction is a collective: the
    followers learn whether rank 0 has a selector and a compiler). Other
    arguments are those of `GrowthController`.
    """

    def __init__(
        self,
        spec: GrowthSpec,
        *,
        comm: Communicator,
        selector: SeedSelectorClient | None = None,
        kernels: KernelSource | None = None,
        **kwargs: Any,
    ) -> None:
        self._comm = comm
        header, _ = comm.broadcast_message(
            {"selector": selector is not None, "kernels": kernels is not None}
            if comm.is_root
            else None
        )
        if not comm.is_root:
            stand_in = _OnRankZero()
            selector = stand_in if header["selector"] else None
            kernels = stand_in if header["kernels"] else None
        super().__init__(spec, selector=selector, kernels=kernels, **kwargs)

    def _guarded(self, dependency: str, what: str, make: Callable[[], Awaitable[T]]) -> T | None:
        if not self._comm.is_root:
            return cast("T | None", self._follow(what))
        try:
            answer = super()._guarded(dependency, what, make)
        except GraftmeshError as exc:
            self._comm.broadcast_message(
                {"outcome": "refused", "error": type(exc).__name__, "message": str(exc)}
            )
            raise
        except BaseException as exc:
            self._comm.broadcast_message(
                {"outcome": "failed", "error": type(exc).__name__, "message": str(exc)}
            )
            raise
        header, payload = _encode_answer(answer)
        header.update(available=self.available, reason=self.reason)
        self._comm.broadcast_message(header, payload)
        return answer

    def _follow(self, what: str) -> Any:
        header, payload = self._comm.broadcast_message(None)
        outcome = header["outcome"]
        if outcome == "refused":
            raise _rebuild_error(str(header["error"]), str(header["message"]))
        if outcome == "failed":
            raise ReplicaDivergenceError(
                f"rank 0 failed in growth {what}: {header['error']}: {header['message']}"
            )
        answer = _decode_answer(header, payload, self._comm.rank)
        self._set_available(bool(header["available"]), str(header["reason"]))
        return answer


# --- the trainer ------------------------------------------------------------------------------


class DistributedTrainer(Trainer):
    """A `Trainer` that is one rank of a data-parallel job (see the module doc).

    Takes `Trainer`'s arguments plus `comm`. Rank 0 passes the checkpoint
    store (followers pass None); with growth, every rank passes its
    `ReplicatedGrowthController`. Every public method that evaluates
    (`run`, `evaluate`, `final_metrics`, `validation_loss`) is a collective;
    `export` runs on rank 0 alone.
    """

    def __init__(
        self,
        spec: JobSpec | Mapping[str, Any],
        *,
        comm: Communicator,
        data: DataBundle | None = None,
        events: EventSink | None = None,
        checkpoints: CheckpointStore | None = None,
        growth: GrowthController | None = None,
        kernel_loader: KernelLoader = load_kernel,
        cancel: threading.Event | None = None,
    ) -> None:
        if not comm.is_root and checkpoints is not None:
            raise InvalidArgumentError(
                f"rank {comm.rank} was given a checkpoint store; only rank 0 writes checkpoints"
            )
        if growth is not None and not isinstance(growth, ReplicatedGrowthController):
            raise InvalidArgumentError(
                "a distributed job needs a ReplicatedGrowthController on every rank"
            )
        self._comm = comm
        self._requested_cancel = cancel or threading.Event()
        # The loop only sees a cancel every rank agreed on, at the same step.
        self._agreed_cancel = threading.Event()
        self._local_metrics = False
        super().__init__(
            spec,
            data=data,
            events=events,
            checkpoints=checkpoints,
            growth=growth,
            kernel_loader=kernel_loader,
            cancel=self._agreed_cancel,
        )
        self.sampler = RankShardSampler(
            len(self._train),
            self.spec.data.batch_size,
            self.spec.seed,
            rank=comm.rank,
            world_size=comm.world_size,
        )
        # Same seed, same host on every rank; broadcast anyway, as DDP does, so a factory
        # model that draws its own randomness starts alike too.
        _in_buckets(list(self._model.parameters()) + list(self._model.buffers()), comm.broadcast)

    @property
    def comm(self) -> Communicator:
        return self._comm

    def evaluate(self, split: Split) -> dict[str, float]:
        """Rank 0's metrics of `split` on every rank (followers do not evaluate)."""
        if self._local_metrics:
            return super().evaluate(split)
        metrics = super().evaluate(split) if self._comm.is_root else None
        header, _ = self._comm.broadcast_message(
            {"metrics": metrics} if metrics is not None else None
        )
        return {str(k): float(v) for k, v in header["metrics"].items()}

    def export(self, out_dir: Path | str, *, job: Mapping[str, Any] | None = None) -> ExportedModel:
        """Export the model (rank 0 only; every rank holds the same weights)."""
        if not self._comm.is_root:
            raise FailedPreconditionError(f"rank {self._comm.rank} does not export; rank 0 does")
        self._local_metrics = True
        try:
            return super().export(out_dir, job=job)
        finally:
            self._local_metrics = False

    def _synchronize_gradients(self, loss: torch.Tensor, samples: int) -> torch.Tensor:
        comm = self._comm
        assert isinstance(self.sampler, RankShardSampler)
        share = samples / max(1, self.sampler.global_batch)
        grads = [
            p.grad for g in self._optimizer.param_groups for p in g["params"] if p.grad is not None
        ]

        def reduce(flat: torch.Tensor) -> None:
            flat.mul_(share)
            comm.all_reduce_sum(flat)

        _in_buckets(grads, reduce)
        stats = torch.tensor(
            [float(loss) * share, 1.0 if self._requested_cancel.is_set() else 0.0],
            dtype=torch.float64,
            device=comm.device,
        )
        comm.all_reduce_sum(stats)
        if float(stats[1]) > 0:
            self._agreed_cancel.set()
        buffers = list(self._model.buffers())
        if buffers:
            _in_buckets(buffers, comm.broadcast)
        return torch.tensor(float(stats[0]), dtype=loss.dtype, device=loss.device)

    def _resume_point(self) -> tuple[CheckpointInfo, CheckpointData] | None:
        comm = self._comm
        if comm.is_root:
            found = super()._resume_point()
            if found is None:
                comm.broadcast_message({"found": False})
                return None
            info, data = found
            payload = encode(data)
            comm.broadcast_message(
                {
                    "found": True,
                    "step": info.step,
                    "path": str(info.path),
                    "sha256": info.sha256,
                    "size_bytes": info.size_bytes,
                    "created": info.created,
                    "payload_sha256": sha256_hex(payload),
                },
                payload,
            )
            return found
        header, payload = comm.broadcast_message(None)
        if not header["found"]:
            return None
        if sha256_hex(payload) != header["payload_sha256"]:
            raise ReplicaDivergenceError(f"rank {comm.rank}: the checkpoint arrived damaged")
        info = CheckpointInfo(
            int(header["step"]),
            Path(header["path"]),
            str(header["sha256"]),
            int(header["size_bytes"]),
            float(header["created"]),
        )
        return info, decode(payload)


# --- the torchrun entry point -----------------------------------------------------------------


def _load_spec(path: Path) -> JobSpec:
    # The spec file format of `graftmesh train` (proto field names, enum short names).
    from services.trainer.cli import load_spec
    from services.trainer.service import spec_from_proto

    return parse_job_spec(spec_from_proto(load_spec(path)))


def _resolve_factory(ref: str) -> GrowthFactory:
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise InvalidArgumentError(
            f"--growth {ref!r}: use 'grpc', 'none' or 'package.module:factory'"
        )
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise InvalidArgumentError(f"--growth {ref!r}: {exc}") from exc
    return cast(GrowthFactory, factory)


class _RankZeroGrowth:
    """What rank 0 talks to for growth, and the event loop its calls run on."""

    def __init__(self, how: str, spec: JobSpec, out_dir: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.selector: SeedSelectorClient | None = None
        self.kernels: KernelSource | None = None
        self._channels: Any = None
        if not spec.growth.enabled or how == "none":
            return
        if how == "grpc":
            from common.config import load_config
            from services.trainer.clients import (
                AgentChannels,
                GrpcKernelSource,
                GrpcSeedSelectorClient,
            )

            try:
                config = load_config()
            except Exception:  # no config: growth pauses and says so, training goes on
                config = None
            channels = self._channels = AgentChannels(config)
            self.selector = GrpcSeedSelectorClient(
                channels, os.environ.get("GRAFTMESH_TRAINER_SELECTOR", "seed_selector")
            )
            self.kernels = GrpcKernelSource(
                channels, os.environ.get("GRAFTMESH_TRAINER_COMPILER", "compiler")
            )
            return
        self.selector, self.kernels = _resolve_factory(how)(spec, out_dir)

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        if self._channels is not None:
            self.loop.run_until_complete(self._channels.close())
        self.loop.close()


def _event_writer(stream: IO[str], rank: int) -> EventSink:
    def write(event: TrainingEvent) -> None:
        record = {"rank": rank, "type": type(event).__name__, **dataclasses.asdict(event)}
        stream.write(json.dumps(record, default=str) + "\n")
        stream.flush()

    return write


def _single_process_env() -> None:
    """Run as a world of one when started without torchrun."""
    if "RANK" in os.environ:
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(
        RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m services.trainer.ddp",
        description="Train a job spec data-parallel; launch with torchrun --nproc-per-node N.",
    )
    parser.add_argument("spec", type=Path, help="job spec file (the `graftmesh train` format)")
    parser.add_argument("--out", type=Path, required=True, help="folder for everything written")
    parser.add_argument(
        "--growth",
        default="grpc",
        help="where rank 0 grows seeds from: 'grpc' (the selector and compiler agents, found "
        "through GRAFTMESH_CONFIG), 'none', or 'package.module:factory' (a GrowthFactory)",
    )
    parser.add_argument("--job-id", default="", help="job id sent to the seed selector")
    parser.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto")
    parser.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    parser.add_argument("--no-export", action="store_true", help="do not export the model")
    parser.add_argument(
        "--timeout-s", type=float, default=600.0, help="collective timeout (a lost rank)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Train one rank of the job; 0 when it succeeded, 1 when cancelled, 2 for a bad spec.

    Writes to `--out`: `checkpoints/` and `model/` and `result.json` (rank 0),
    and for every rank `rank-<r>.json` (final step, resumed step, `state_sha256`) and
    `events-rank-<r>.jsonl` (its events, one JSON object a line).
    """
    args = _parse_args(argv)
    try:
        spec = _load_spec(args.spec)
    except Exception as exc:
        print(f"error: {args.spec}: {exc}", file=sys.stderr)
        return 2
    _single_process_env()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    torch.set_num_threads(int(os.environ.get("GRAFTMESH_TRAINER_TORCH_THREADS", "1")))
    use_cuda = args.backend == "nccl" or (
        args.backend == "auto" and spec.device != "cpu" and torch.cuda.is_available()
    )
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        spec = spec.model_copy(update={"device": str(device)})
    else:
        device = torch.device("cpu")
        spec = spec.model_copy(update={"device": "cpu"})
    backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.timeout_s))
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    cancel = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        cancel.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    comm = Communicator.from_process_group(device)
    remote = _RankZeroGrowth(args.growth if comm.is_root else "none", spec, out)
    growth: ReplicatedGrowthController | None = None
    try:
        with (out / f"events-rank-{rank}.jsonl").open("a", encoding="utf-8") as events:
            growth = ReplicatedGrowthController(
                spec.growth,
                comm=comm,
                selector=remote.selector,
                kernels=remote.kernels,
                job_id=args.job_id or spec.name,
                seed=spec.seed,
                runner=remote.run,
            )
            trainer = DistributedTrainer(
                spec,
                comm=comm,
                events=_event_writer(events, rank),
                checkpoints=(
                    CheckpointStore(out / "checkpoints", keep=spec.keep_checkpoints)
                    if comm.is_root
                    else None
                ),
                growth=growth,
                cancel=cancel,
            )
            result = trainer.run(resume=not args.no_resume)
        _write_reports(out, trainer, result, export=comm.is_root and not args.no_export)
        dist.barrier()
        return 0 if result.status == "succeeded" else 1
    finally:
        if growth is not None:
            growth.close()
        remote.close()
        dist.destroy_process_group()


def _write_reports(
    out: Path, trainer: DistributedTrainer, result: TrainingResult, *, export: bool
) -> None:
    comm = trainer.comm
    report = {
        "rank": comm.rank,
        "world_size": comm.world_size,
        "status": result.status,
        "step": result.step,
        "resumed_from_step": result.resumed_from_step,
        "state_sha256": state_sha256(trainer.model),
    }
    (out / f"rank-{comm.rank}.json").write_text(json.dumps(report, sort_keys=True))
    if not comm.is_root:
        return
    if export and result.status == "succeeded":
        trainer.export(out / "model", job={"world_size": comm.world_size})
    summary = {
        "status": result.status,
        "step": result.step,
        "epoch": result.epoch,
        "reason": result.reason,
        "metrics": dict(result.metrics),
        "param_count": result.param_count,
        "slots": [s.to_json() for s in result.slots],
        "growth_available": result.growth_available,
        "growth_reason": result.growth_reason,
        "outcomes": list(result.outcomes),
        "world_size": comm.world_size,
    }
    (out / "result.json").write_text(json.dumps(summary, sort_keys=True, default=str))


if __name__ == "__main__":
    sys.exit(main())
