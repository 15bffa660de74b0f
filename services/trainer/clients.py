"""The trainer's gRPC clients: the seed selector, the compiler, and the registry upload.

`GrpcSeedSelectorClient` and `GrpcKernelSource` implement the core's
`SeedSelectorClient` and `KernelSource` protocols over `SeedSelectorService`
and `CompilerService`. Channels come from `common.channels.agent_channel`
(ready key first, config second) through an `AgentChannels` cache, which
forgets a channel after an UNAVAILABLE so the next call looks the agent up
again (it may have restarted elsewhere). Failed calls raise the mesh's errors
(`common.errors.from_rpc_error`): breakers and retries live in the growth
controller, which tells an outage (`UnavailableError`) from a refusal.

`register_model` uploads an exported model folder with `RegisterModel`:
metadata first (files with sha256 and size, metrics, tags, lineage, input
signature, reference input statistics), then each file in chunks.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import grpc
import torch

from common.channels import agent_channel
from common.config import StartupConfig
from common.errors import (
    FailedPreconditionError,
    NotFoundError,
    UnavailableError,
    from_rpc_error,
)
from common.register_wire import REGISTER_MODEL_METHOD, encode_chunk, serialize_request
from common.stubs import (
    common_pb2,
    compiler_pb2,
    compiler_pb2_grpc,
    registry_pb2,
    seed_selector_pb2,
    seed_selector_pb2_grpc,
)
from services.trainer.files import sha256_hex
from services.trainer.growth import BlueprintOption, KernelArtifact, Selection, SelectionRequest
from services.trainer.seeds import SlotShape

__all__ = [
    "UPLOAD_CHUNK_BYTES",
    "AgentChannels",
    "GrpcKernelSource",
    "GrpcSeedSelectorClient",
    "input_statistics",
    "register_model",
]

UPLOAD_CHUNK_BYTES: Final = 1 << 20
_HISTOGRAM_BINS: Final = 20
_MODEL_FILES: Final = ("model.pt2", "model.safetensors", "manifest.json")

_STRATEGIES: Final = {
    "ucb1": seed_selector_pb2.SELECTION_STRATEGY_UCB1,
    "thompson": seed_selector_pb2.SELECTION_STRATEGY_THOMPSON,
    "epsilon_greedy": seed_selector_pb2.SELECTION_STRATEGY_EPSILON_GREEDY,
    "linucb": seed_selector_pb2.SELECTION_STRATEGY_LINUCB,
}


class AgentChannels:
    """aio channels to named agents, opened on first use and dropped after an outage.

    Must be used from the event loop the channels belong to.
    """

    def __init__(self, config: StartupConfig | None) -> None:
        self._config = config
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def get(self, agent: str) -> grpc.aio.Channel:
        channel = self._channels.get(agent)
        if channel is not None:
            return channel
        if self._config is None:
            raise UnavailableError(f"no config to find agent {agent!r} in (GRAFTMESH_CONFIG)")
        try:
            channel = await agent_channel(self._config, agent)
        except NotFoundError as exc:
            raise UnavailableError(f"agent {agent!r} not found: {exc}") from exc
        self._channels[agent] = channel
        return channel

    async def forget(self, agent: str) -> None:
        channel = self._channels.pop(agent, None)
        if channel is not None:
            await channel.close()

    async def close(self) -> None:
        for agent in list(self._channels):
            await self.forget(agent)


async def _call(channels: AgentChannels, agent: str, rpc: Any, request: Any) -> Any:
    """`rpc(request)` with gRPC errors turned into mesh errors; the channel dropped on outage."""
    try:
        return await rpc(request)
    except grpc.RpcError as exc:
        error = from_rpc_error(exc)
        if isinstance(error, UnavailableError):
            await channels.forget(agent)
        raise error from None


class GrpcSeedSelectorClient:
    """`SeedSelectorClient` over `SeedSelectorService` of agent `agent`."""

    def __init__(self, channels: AgentChannels, agent: str) -> None:
        self._channels = channels
        self.agent = agent

    async def _stub(self) -> seed_selector_pb2_grpc.SeedSelectorServiceStub:
        return seed_selector_pb2_grpc.SeedSelectorServiceStub(await self._channels.get(self.agent))

    async def select(self, request: SelectionRequest) -> Selection:
        arms = [
            seed_selector_pb2.Arm(
                slot_id=a.slot_id,
                blueprint=a.blueprint,
                slot_features=dict(a.features),
                added_params=a.added_params,
                slot_state=common_pb2.SeedState.Value(f"SEED_STATE_{a.slot_state.upper()}"),
            )
            for a in request.arms
        ]
        message = seed_selector_pb2.SelectRequest(
            job_id=request.job_id,
            arms=arms,
            strategy=_STRATEGIES.get(
                request.strategy or "", seed_selector_pb2.SELECTION_STRATEGY_UNSPECIFIED
            ),
            strategy_params=dict(request.strategy_params),
            max_concurrent_seeds=request.max_concurrent_seeds,
            active_seeds=request.active_seeds,
        )
        if request.param_budget is not None:
            message.param_budget = request.param_budget
        if request.rng_seed is not None:
            message.rng_seed = request.rng_seed
        stub = await self._stub()
        reply = await _call(self._channels, self.agent, stub.Select, message)
        if not reply.has_decision:
            return Selection(reply.decision_id, None, None, reply.no_decision_reason)
        return Selection(
            reply.decision_id, reply.chosen.slot_id, reply.chosen.blueprint, "chosen by the bandit"
        )

    async def report(self, decision_id: str, reward: float, metrics: Mapping[str, float]) -> None:
        stub = await self._stub()
        await _call(
            self._channels,
            self.agent,
            stub.Report,
            seed_selector_pb2.ReportRequest(
                decision_id=decision_id, reward=reward, metrics=dict(metrics)
            ),
        )


def _slot_spec(slot: SlotShape) -> compiler_pb2.SlotSpec:
    if slot.kind == "linear":
        (features,) = slot.dims
        return compiler_pb2.SlotSpec(
            linear=compiler_pb2.LinearSlotShape(in_features=features, out_features=features)
        )
    channels, height, width = slot.dims
    return compiler_pb2.SlotSpec(
        conv2d=compiler_pb2.Conv2dSlotShape(
            in_channels=channels, out_channels=channels, height=height, width=width
        )
    )


class GrpcKernelSource:
    """`KernelSource` over `CompilerService` of agent `agent`.

    `CompileRequest` has no graph-mode field, so an eval-mode compile
    (`training=False`) returns the training-mode kernel: a kernel with batch
    norm then keeps using batch statistics in eval mode.
    """

    def __init__(self, channels: AgentChannels, agent: str) -> None:
        self._channels = channels
        self.agent = agent

    async def _stub(self) -> compiler_pb2_grpc.CompilerServiceStub:
        return compiler_pb2_grpc.CompilerServiceStub(await self._channels.get(self.agent))

    async def blueprints(self, slot: SlotShape) -> Sequence[BlueprintOption]:
        stub = await self._stub()
        kind = common_pb2.SLOT_KIND_LINEAR if slot.kind == "linear" else common_pb2.SLOT_KIND_CONV2D
        reply = await _call(
            self._channels,
            self.agent,
            stub.ListBlueprints,
            compiler_pb2.ListBlueprintsRequest(slot_kind=kind, target=_slot_spec(slot)),
        )
        return [BlueprintOption(b.name, int(b.param_count)) for b in reply.blueprints]

    async def compile(
        self, blueprint: str, slot: SlotShape, *, training: bool = True
    ) -> KernelArtifact:
        stub = await self._stub()
        reply = await _call(
            self._channels,
            self.agent,
            stub.Compile,
            compiler_pb2.CompileRequest(
                blueprint=compiler_pb2.BlueprintSpec(name=blueprint), target=_slot_spec(slot)
            ),
        )
        if not reply.HasField("kernel"):
            failed = [
                c for c in reply.validation.checks if c.outcome == compiler_pb2.CHECK_OUTCOME_FAILED
            ]
            why = "; ".join(f"{c.name}: {c.detail}" for c in failed) or "validation failed"
            raise FailedPreconditionError(f"kernel for {blueprint!r} refused: {why}")
        data = await self._download(reply.kernel.kernel_id)
        if sha256_hex(data) != reply.kernel.sha256:
            raise UnavailableError(f"kernel {reply.kernel.kernel_id} arrived damaged")
        return KernelArtifact(
            reply.kernel.kernel_id, reply.kernel.sha256, data, int(reply.metadata.param_count)
        )

    async def _download(self, kernel_id: str) -> bytes:
        stub = await self._stub()
        parts: list[bytes] = []
        try:
            call: Any = stub.GetKernel(compiler_pb2.GetKernelRequest(kernel_id=kernel_id))
            async for message in call:
                if message.HasField("chunk"):
                    parts.append(message.chunk.data)
        except grpc.RpcError as exc:
            error = from_rpc_error(exc)
            if isinstance(error, UnavailableError):
                await self._channels.forget(self.agent)
            raise error from None
        return b"".join(parts)


# --- the registry upload ----------------------------------------------------------------------


def input_statistics(inputs: torch.Tensor, *, name: str = "x") -> registry_pb2.ReferenceStatistics:
    """`ReferenceStatistics` of the training inputs `(N, ...)`: per feature along dim 1.

    Features are the entries of dim 1 (columns of a table, channels of an
    image); the histogram covers every element.
    """
    x = inputs.detach().float().cpu()
    if x.dim() <= 2:
        flat = x.reshape(x.shape[0], -1)  # (N, F)
    else:
        flat = x.transpose(0, 1).reshape(x.shape[1], -1).T  # (N * H * W, C)
    low, high = float(x.min()), float(x.max())
    if high <= low:
        high = low + 1.0
    counts = torch.histc(x, bins=_HISTOGRAM_BINS, min=low, max=high)
    edges = torch.linspace(low, high, _HISTOGRAM_BINS + 1)
    stats = registry_pb2.InputStatistics(
        name=name,
        feature_dim=1,
        mean=flat.mean(0).tolist(),
        std=flat.std(0, unbiased=False).tolist(),
        min=flat.min(0).values.tolist(),
        max=flat.max(0).values.tolist(),
        histogram_edges=edges.tolist(),
        histogram_counts=[int(c) for c in counts.tolist()],
    )
    return registry_pb2.ReferenceStatistics(sample_count=int(x.shape[0]), inputs=[stats])


_DTYPES: Final = {
    "float32": common_pb2.DTYPE_FLOAT32,
    "float16": common_pb2.DTYPE_FLOAT16,
    "bfloat16": common_pb2.DTYPE_BFLOAT16,
    "float64": common_pb2.DTYPE_FLOAT64,
    "int64": common_pb2.DTYPE_INT64,
    "int32": common_pb2.DTYPE_INT32,
    "bool": common_pb2.DTYPE_BOOL,
    "uint8": common_pb2.DTYPE_UINT8,
}


def _tensor_specs(entries: Sequence[Mapping[str, Any]]) -> list[common_pb2.TensorSpec]:
    return [
        common_pb2.TensorSpec(
            name=str(e["name"]),
            dtype=_DTYPES.get(str(e["dtype"]), common_pb2.DTYPE_UNSPECIFIED),
            shape=[int(d) for d in e["shape"]],
        )
        for e in entries
    ]


def upload_metadata(
    export_dir: Path,
    *,
    name: str,
    job_id: str,
    tags: Mapping[str, str],
    statistics: registry_pb2.ReferenceStatistics,
) -> registry_pb2.ModelVersionMetadata:
    """The first message of a `RegisterModel` upload of `export_dir`."""
    manifest = json.loads((export_dir / "manifest.json").read_text())
    files = []
    for file_name in _MODEL_FILES:
        data = (export_dir / file_name).read_bytes()
        files.append(
            registry_pb2.ArtifactFile(name=file_name, sha256=sha256_hex(data), size_bytes=len(data))
        )
    return registry_pb2.ModelVersionMetadata(
        name=name,
        description=f"trained by job {job_id}",
        metrics={k: float(v) for k, v in manifest.get("metrics", {}).items()},
        tags=dict(tags),
        lineage=registry_pb2.Lineage(
            job_id=job_id, kernel_ids=list(manifest.get("kernel_ids", []))
        ),
        input_signature=registry_pb2.InputSignature(
            inputs=_tensor_specs(manifest.get("inputs", [])),
            outputs=_tensor_specs(manifest.get("outputs", [])),
        ),
        reference_statistics=statistics,
        files=files,
        actor=f"trainer:{job_id}",
    )


async def _upload_stream(
    export_dir: Path, metadata: registry_pb2.ModelVersionMetadata, chunk_bytes: int
) -> AsyncIterator[registry_pb2.RegisterModelRequest | bytes]:
    """The metadata message, then each file's chunks already encoded (see `register_wire`)."""
    yield registry_pb2.RegisterModelRequest(metadata=metadata)
    for listed in metadata.files:
        data = memoryview(await asyncio.to_thread((export_dir / listed.name).read_bytes))
        for start in range(0, len(data), chunk_bytes):
            yield encode_chunk(listed.name, start, data[start : start + chunk_bytes])


async def register_model(
    channel: grpc.aio.Channel,
    export_dir: Path,
    *,
    name: str,
    job_id: str,
    tags: Mapping[str, str],
    statistics: registry_pb2.ReferenceStatistics,
    chunk_bytes: int = UPLOAD_CHUNK_BYTES,
    timeout_s: float = 300.0,
) -> registry_pb2.ModelVersion:
    """Upload the model in `export_dir` as a new version of `name`; the stored version.

    Raises the mesh error of a failed upload (`UnavailableError` when the
    registry is away).
    """
    metadata = await asyncio.to_thread(
        upload_metadata, export_dir, name=name, job_id=job_id, tags=tags, statistics=statistics
    )
    register = channel.stream_unary(
        REGISTER_MODEL_METHOD,
        request_serializer=serialize_request,
        response_deserializer=registry_pb2.RegisterModelResponse.FromString,
    )
    try:
        reply = await register(_upload_stream(export_dir, metadata, chunk_bytes), timeout=timeout_s)
    except grpc.RpcError as exc:
        raise from_rpc_error(exc) from None
    version: registry_pb2.ModelVersion = reply.model_version
    return version
