"""Router: the overhead it adds per request, and what micro-batching buys under load.

Setup (all on loopback, started here and stopped by PID): embedded NATS and Redis, a
registry agent (`python -m services.registry`) holding two models, each registered
with the `production` alias, and two router agents (`python -m services.router`) that
load them from that registry the way they always do (DownloadArtifact, checksums,
`torch.export.load`): one with the default micro-batching (max 32 rows, 500 us wait)
and one with batching off (`max_batch_size: 1`). Both run 2 replicas with one torch
thread each. Baseline process: a bare gRPC server hosting the same exported programs
(`RouterService.Infer` answered inline on its event loop: decode, call, encode).

(a) Overhead: one client, sequential `Infer` calls of a small MLP (8-16-3, one row),
    p50/p99 of: the exported module called in process; a gRPC call to the bare
    server; a gRPC call through the router. Interleaved rounds, so that load from
    elsewhere hits them alike. Target: router - bare <= 0.5 ms at p50. A
    `grpc.health.v1` Check on both servers shows how much of the difference is the
    agent's common server stack (tracing and metrics interceptors, error mapping).
(b) Throughput: 32 concurrent clients (one asyncio gRPC client process: this one),
    each sending one-row requests back to back for a fixed time, through the batching
    router, the non-batching one and the bare server (one request at a time, inline).
    Target: batching >= 2x the non-batching router, for a model whose compute is what
    batching amortises (MLP 1024-4096-4096-1024-10: about 7 ms for one row, under 1 ms
    per row in batches of 32, on one core). The small MLP is measured too: its cost is
    all transport, which batching cannot amortise.

Run with `python -m bench router`. Bounded to about two minutes.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from torch import nn

from common.channels import open_channel
from common.health import HealthStatus, check_health
from common.infra import EmbeddedServer
from common.kernels import load_program, save_program, sha256_hex, streamline
from common.process import orphan_proof, wait_exit
from common.stubs import (
    common_pb2,
    registry_pb2,
    registry_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
)
from services.router.tensors import tensor_from_proto, tensor_to_proto
from tests.ports import free_port

_ROOT = Path(__file__).resolve().parents[1]
AGENT_START_S = 120.0
AGENT_STOP_S = 15.0
OVERHEAD_TARGET_MS = 0.5
THROUGHPUT_TARGET = 2.0
LATENCY_CALLS = 600
LATENCY_ROUNDS = 6
CLIENTS = 32
THROUGHPUT_S = 4.0
WARMUP_S = 1.0

SMALL = (8, 16, 3)
WIDE = (1024, 4096, 4096, 1024, 10)


def _mlp(dims: tuple[int, ...], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(dims):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).eval()


def _export(module: nn.Module, in_features: int) -> bytes:
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(
        module, (torch.randn(4, in_features),), dynamic_shapes=({0: batch},)
    )
    return save_program(program)


def _pcts(samples_ns: list[int]) -> tuple[float, float]:
    ordered = sorted(samples_ns)
    p50 = ordered[len(ordered) // 2] / 1e6
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] / 1e6
    return p50, p99


def _fmt(p: tuple[float, float]) -> str:
    return f"p50 {p[0]:7.3f} ms   p99 {p[1]:7.3f} ms"


# -- the bare server (runs in a process of its own) -------------------------------------


def bare_server(port: int, models_file: str) -> None:
    """Serve `RouterService.Infer` of the programs in `models_file`, inline, until killed."""
    specs = json.loads(Path(models_file).read_text())
    modules: dict[str, nn.Module] = {}
    for name, spec in specs.items():
        data = Path(spec["path"]).read_bytes()
        module = streamline(load_program(data, spec["sha256"]).module())
        for parameter in module.parameters():
            parameter.requires_grad_(False)
        modules[name] = module
    torch.set_num_threads(1)

    class Bare(router_pb2_grpc.RouterServiceServicer):
        async def Infer(
            self, request: router_pb2.InferRequest, context: Any
        ) -> router_pb2.InferResponse:
            x = tensor_from_proto(request.inputs["x"], "inputs[x]")
            with torch.inference_mode():
                y = modules[request.model.name](x)
            return router_pb2.InferResponse(
                outputs=[tensor_to_proto(y)], model_name=request.model.name, version=1
            )

        async def GetRoutes(self, request: Any, context: Any) -> Any:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "a bare server serves Infer only")

        async def SetRoute(self, request: Any, context: Any) -> Any:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "a bare server serves Infer only")

        async def GetStats(self, request: Any, context: Any) -> Any:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "a bare server serves Infer only")

    async def serve() -> None:
        server = grpc.aio.server()
        router_pb2_grpc.add_RouterServiceServicer_to_server(Bare(), server)
        health_pb2_grpc.add_HealthServicer_to_server(health_aio.HealthServicer(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(serve())


# -- processes -----------------------------------------------------------------------


def _agent_env(
    name: str, module_env: dict[str, str], run_dir: Path, infra: dict[str, str]
) -> tuple[dict[str, str], int, int]:
    port, health_port = free_port(), free_port()
    env = {
        **os.environ,
        "GRAFTMESH_AGENT": name,
        "GRAFTMESH_MACHINE": "bench",
        "GRAFTMESH_HOST": "127.0.0.1",
        "GRAFTMESH_PORT": str(port),
        "GRAFTMESH_HEALTH_PORT": str(health_port),
        "GRAFTMESH_METRICS_PORT": "0",
        "GRAFTMESH_NATS_URL": infra["nats"],
        "GRAFTMESH_REDIS_URL": infra["redis"],
        "GRAFTMESH_RUN_DIR": str(run_dir),
        "GRAFTMESH_LOG_LEVEL": "WARNING",
        **module_env,
    }
    env.pop("GRAFTMESH_CONFIG", None)
    return env, port, health_port


async def _spawn(argv: list[str], env: dict[str, str], log: Path) -> asyncio.subprocess.Process:
    command, preexec = orphan_proof(argv)
    with log.open("wb") as out:
        return await asyncio.create_subprocess_exec(
            *command, cwd=_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=preexec
        )


async def _wait_healthy(proc: asyncio.subprocess.Process, health_port: int, log: Path) -> None:
    deadline = time.monotonic() + AGENT_START_S
    while time.monotonic() < deadline and proc.returncode is None:
        result = await check_health("127.0.0.1", health_port, 0.5)
        if result.status is HealthStatus.HEALTHY:
            return
        await asyncio.sleep(0.1)
    tail = (await asyncio.to_thread(log.read_text, errors="replace"))[-2000:]
    raise RuntimeError(f"{log.stem} did not become healthy:\n{tail}")


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        os.kill(proc.pid, signal.SIGTERM)
    if await wait_exit(proc, AGENT_STOP_S) is None:
        os.kill(proc.pid, signal.SIGKILL)
        await proc.wait()


async def _register(stub: Any, name: str, model_bytes: bytes, in_features: int, out: int) -> None:
    manifest = json.dumps({"host_template": "mlp"}).encode()
    files = {"model.pt2": model_bytes, "manifest.json": manifest}
    signature = registry_pb2.InputSignature(
        inputs=[
            common_pb2.TensorSpec(name="x", dtype=common_pb2.DTYPE_FLOAT32, shape=[-1, in_features])
        ],
        outputs=[common_pb2.TensorSpec(name="y", dtype=common_pb2.DTYPE_FLOAT32, shape=[-1, out])],
    )
    metadata = registry_pb2.ModelVersionMetadata(
        name=name,
        input_signature=signature,
        files=[
            registry_pb2.ArtifactFile(name=n, sha256=sha256_hex(b), size_bytes=len(b))
            for n, b in files.items()
        ],
        aliases=["production"],
        actor="bench",
    )

    async def messages() -> Any:
        yield registry_pb2.RegisterModelRequest(metadata=metadata)
        for file_name, data in files.items():
            for offset in range(0, len(data), 1 << 20):
                yield registry_pb2.RegisterModelRequest(
                    chunk=registry_pb2.FileChunk(
                        file_name=file_name,
                        chunk=common_pb2.ArtifactChunk(
                            data=data[offset : offset + (1 << 20)], offset=offset
                        ),
                    )
                )

    await stub.RegisterModel(messages(), timeout=60)


def _request(name: str, x: torch.Tensor) -> router_pb2.InferRequest:
    return router_pb2.InferRequest(
        model=common_pb2.ModelRef(name=name, alias="production"),
        inputs={"x": tensor_to_proto(x)},
    )


async def _ready(stub: Any, request: router_pb2.InferRequest) -> None:
    deadline = time.monotonic() + AGENT_START_S
    while True:
        try:
            await stub.Infer(request, timeout=30)
            return
        except grpc.aio.AioRpcError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


# -- measurements --------------------------------------------------------------------


async def _latencies(
    cycles: dict[str, Callable[[], Awaitable[None]]],
) -> dict[str, tuple[float, float]]:
    samples: dict[str, list[int]] = {label: [] for label in cycles}
    for cycle in cycles.values():
        for _ in range(50):
            await cycle()
    for _ in range(LATENCY_ROUNDS):
        for label, cycle in cycles.items():
            for _ in range(LATENCY_CALLS // LATENCY_ROUNDS):
                start = time.perf_counter_ns()
                await cycle()
                samples[label].append(time.perf_counter_ns() - start)
    return {label: _pcts(values) for label, values in samples.items()}


async def _throughput(stub: Any, request: router_pb2.InferRequest) -> tuple[float, float]:
    """Requests per second of CLIENTS back-to-back clients, and their p50 latency in ms."""
    done = 0
    latencies: list[int] = []
    measuring = False
    stop_at = time.monotonic() + WARMUP_S + THROUGHPUT_S

    async def client() -> None:
        nonlocal done
        while time.monotonic() < stop_at:
            start = time.perf_counter_ns()
            await stub.Infer(request, timeout=30)
            if measuring:
                done += 1
                latencies.append(time.perf_counter_ns() - start)

    async def clock() -> None:
        nonlocal measuring
        await asyncio.sleep(WARMUP_S)
        measuring = True

    await asyncio.gather(clock(), *(client() for _ in range(CLIENTS)))
    return done / THROUGHPUT_S, statistics.median(latencies) / 1e6


async def _run() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-router-") as tmp:
        run_dir = Path(tmp)
        nats_server = EmbeddedServer.nats("127.0.0.1", free_port(), run_dir)
        redis_port = free_port()
        redis_server = EmbeddedServer.redis("127.0.0.1", redis_port, run_dir)
        await asyncio.gather(nats_server.start(), redis_server.start())
        infra = {"nats": nats_server.url, "redis": f"redis://127.0.0.1:{redis_port}/0"}
        procs: list[asyncio.subprocess.Process] = []
        channels: list[grpc.aio.Channel] = []
        try:
            await _measure(run_dir, infra, procs, channels)
        finally:
            for channel in channels:
                await channel.close()
            await asyncio.gather(*(_stop(p) for p in procs))
            await asyncio.gather(nats_server.stop(), redis_server.stop())


async def _measure(
    run_dir: Path,
    infra: dict[str, str],
    procs: list[asyncio.subprocess.Process],
    channels: list[grpc.aio.Channel],
) -> None:
    started = time.monotonic()
    small, wide = _mlp(SMALL, 1), _mlp(WIDE, 2)
    small_bytes, wide_bytes = _export(small, SMALL[0]), _export(wide, WIDE[0])
    models = {}
    for name, data in (("small", small_bytes), ("wide", wide_bytes)):
        path = run_dir / f"{name}.pt2"
        path.write_bytes(data)
        models[name] = {"path": str(path), "sha256": sha256_hex(data)}
    (run_dir / "models.json").write_text(json.dumps(models))

    env, registry_port, registry_health = _agent_env("bench-registry", {}, run_dir, infra)
    registry_log = run_dir / "registry.log"
    procs.append(await _spawn([sys.executable, "-m", "services.registry"], env, registry_log))
    routers: dict[str, tuple[int, int, Path]] = {}
    for label, batching in (("batching", {}), ("no-batching", {"max_batch_size": 1})):
        config = {
            "registry_address": f"127.0.0.1:{registry_port}",
            "replicas": 2,
            "torch_threads": 1,
            "batching": batching,
            "preload": {"small": ["production"], "wide": ["production"]},
            "canary": {"enabled": False},
            "drift": {"enabled": False},
        }
        env, port, health = _agent_env(
            f"bench-router-{label}", {"ROUTER_CONFIG": json.dumps(config)}, run_dir, infra
        )
        log = run_dir / f"router-{label}.log"
        procs.append(await _spawn([sys.executable, "-m", "services.router"], env, log))
        routers[label] = (port, health, log)
    bare_port = free_port()
    procs.append(
        await _spawn(
            [
                sys.executable,
                "-c",
                "import sys; from bench.bench_router import bare_server; "
                "bare_server(int(sys.argv[1]), sys.argv[2])",
                str(bare_port),
                str(run_dir / "models.json"),
            ],
            {**os.environ},
            run_dir / "bare.log",
        )
    )
    await _wait_healthy(procs[0], registry_health, registry_log)
    registry_channel = open_channel(f"127.0.0.1:{registry_port}")
    channels.append(registry_channel)
    registry_stub = registry_pb2_grpc.RegistryServiceStub(registry_channel)
    await _register(registry_stub, "small", small_bytes, SMALL[0], SMALL[-1])
    await _register(registry_stub, "wide", wide_bytes, WIDE[0], WIDE[-1])
    stubs: dict[str, Any] = {}
    for (label, (port, health, log)), proc in zip(routers.items(), procs[1:3], strict=True):
        await _wait_healthy(proc, health, log)
        channel = open_channel(f"127.0.0.1:{port}")
        channels.append(channel)
        stubs[label] = router_pb2_grpc.RouterServiceStub(channel)
    bare_channel = open_channel(f"127.0.0.1:{bare_port}")
    channels.append(bare_channel)
    stubs["bare"] = router_pb2_grpc.RouterServiceStub(bare_channel)
    x_small, x_wide = torch.randn(1, SMALL[0]), torch.randn(1, WIDE[0])
    small_request, wide_request = _request("small", x_small), _request("wide", x_wide)
    for stub in stubs.values():
        await _ready(stub, small_request)
        await _ready(stub, wide_request)
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(
        f"setup: registry + 2 routers + bare server up and loaded in "
        f"{time.monotonic() - started:.1f} s; machine load {load}; {os.cpu_count()} cores"
    )

    torch.set_num_threads(1)
    small_module = streamline(load_program(small_bytes, sha256_hex(small_bytes)).module())

    async def in_process() -> None:
        with torch.inference_mode():
            small_module(x_small)

    async def bare() -> None:
        await stubs["bare"].Infer(small_request, timeout=10)

    async def routed() -> None:
        await stubs["batching"].Infer(small_request, timeout=10)

    check = health_pb2.HealthCheckRequest(service="")
    bare_health: Any = health_pb2_grpc.HealthStub(bare_channel)
    router_health: Any = health_pb2_grpc.HealthStub(channels[1])

    async def bare_floor() -> None:
        await bare_health.Check(check, timeout=10)

    async def router_floor() -> None:
        await router_health.Check(check, timeout=10)

    lat = await _latencies(
        {
            "in-process": in_process,
            "bare": bare,
            "router": routed,
            "bare-floor": bare_floor,
            "router-floor": router_floor,
        }
    )
    print(
        f"(a) overhead: one client, sequential Infer of MLP {'-'.join(map(str, SMALL))}, "
        f"one row, {LATENCY_CALLS} calls per line in {LATENCY_ROUNDS} interleaved rounds"
    )
    print(f"latency  exported module, in process          {_fmt(lat['in-process'])}")
    print(f"latency  gRPC to a bare server (inline)       {_fmt(lat['bare'])}")
    print(f"latency  gRPC through the router              {_fmt(lat['router'])}")
    added = lat["router"][0] - lat["bare"][0]
    verdict = "ok" if added <= OVERHEAD_TARGET_MS else "MISS"
    print(
        f"added    router - bare                       p50 {added:7.3f} ms   p99 "
        f"{lat['router'][1] - lat['bare'][1]:7.3f} ms   [p50<={OVERHEAD_TARGET_MS:g}ms: {verdict}]"
    )
    stack = lat["router-floor"][0] - lat["bare-floor"][0]
    print(
        f"floor    grpc.health Check: bare {lat['bare-floor'][0]:6.3f} ms, router agent "
        f"{lat['router-floor'][0]:6.3f} ms (p50): the agent's server stack (tracing, metrics, "
        f"error mapping) accounts for {stack:6.3f} ms of the added time"
    )

    print(
        f"(b) throughput: {CLIENTS} concurrent clients, one-row Infer, {THROUGHPUT_S:g} s per "
        f"line after {WARMUP_S:g} s warm-up"
    )
    for model, request, target in (
        (WIDE, wide_request, True),
        (SMALL, small_request, False),
    ):
        shape = "-".join(map(str, model))
        results = {}
        for label in ("batching", "no-batching", "bare"):
            results[label] = await _throughput(stubs[label], request)
            rate, p50 = results[label]
            print(
                f"throughput  MLP {shape:<24} {label:<12} {rate:7.0f} req/s   "
                f"client p50 {p50:7.2f} ms"
            )
        ratio = results["batching"][0] / max(results["no-batching"][0], 1e-9)
        verdict = "ok" if ratio >= THROUGHPUT_TARGET else "MISS"
        goal = f"   [>={THROUGHPUT_TARGET:g}x: {verdict}]" if target else "   (transport-bound)"
        print(f"ratio       MLP {shape:<24} batching / no-batching   {ratio:5.2f}x{goal}")


def main() -> None:
    asyncio.run(_run())
