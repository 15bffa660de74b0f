"""The compiler agent as a real process: Compile, GetKernel, lists, stats, errors, its store.

One agent serves most tests (starting one costs seconds: torch); each test uses
blueprints or slot sizes of its own, so what one test compiles is a miss for no
other. Counters are compared before and after. Restarting gets its own agent.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from common.health import HealthStatus, check_health
from common.kernels import load_kernel
from common.stubs import common_pb2, compiler_pb2, compiler_pb2_grpc
from tests.integration.mesh import ROOT
from tests.ports import free_port
from tests.wait import wait_until

pytestmark = pytest.mark.integration

TIMEOUT_S = 120  # a cold compile on a busy 2-core machine


class CompilerProc:
    """`python -m services.compiler` on free ports, with its run dir under `run_dir`."""

    def __init__(self, run_dir: Path, nats_url: str, redis_url: str, name: str) -> None:
        self.name = name
        self.run_dir = run_dir
        self.port = free_port()
        self.health_port = free_port()
        self.log = run_dir / f"{name}.log"
        env = {
            **os.environ,
            "GRAFTMESH_AGENT": name,
            "GRAFTMESH_GROUP": "core",
            "GRAFTMESH_MACHINE": "mainpc",
            "GRAFTMESH_HOST": "127.0.0.1",
            "GRAFTMESH_PORT": str(self.port),
            "GRAFTMESH_HEALTH_PORT": str(self.health_port),
            "GRAFTMESH_NATS_URL": nats_url,
            "GRAFTMESH_REDIS_URL": redis_url,
            "GRAFTMESH_RUN_DIR": str(run_dir),
            # Tests never judge timings: no kernel is refused for its latency on a busy machine.
            "GRAFTMESH_COMPILER_MAX_LATENCY_RATIO": "1e9",
        }
        env.pop("GRAFTMESH_CONFIG", None)
        env.pop("GRAFTMESH_METRICS_PORT", None)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "services.compiler"],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = compiler_pb2_grpc.CompilerServiceStub(self.channel)

    def health(self) -> Any:
        return asyncio.run(check_health("127.0.0.1", self.health_port, 0.5))

    def wait_healthy(self) -> None:
        try:
            wait_until(lambda: self.health().status is HealthStatus.HEALTHY, 60, "compiler healthy")
        except AssertionError:
            raise AssertionError(self.log.read_text()[-5000:]) from None

    def stop(self) -> int:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)

    def kill(self) -> None:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def start_agent(run_dir: Path, nats_url: str, redis_url: str, name: str) -> CompilerProc:
    agent = CompilerProc(run_dir, nats_url, redis_url, name)
    try:
        agent.wait_healthy()
    except BaseException:
        agent.kill()
        raise
    return agent


@pytest.fixture(scope="module")
def agent(
    tmp_path_factory: pytest.TempPathFactory, system_nats_url: str, system_redis_url: str
) -> Iterator[CompilerProc]:
    run_dir = tmp_path_factory.mktemp("compiler-agent")
    proc = start_agent(run_dir, system_nats_url, system_redis_url, f"compiler{os.getpid()}")
    try:
        yield proc
    finally:
        proc.kill()


def linear(features: int) -> compiler_pb2.SlotSpec:
    return compiler_pb2.SlotSpec(
        linear=compiler_pb2.LinearSlotShape(in_features=features, out_features=features)
    )


def conv2d(channels: int, height: int, width: int) -> compiler_pb2.SlotSpec:
    shape = compiler_pb2.Conv2dSlotShape(
        in_channels=channels, out_channels=channels, height=height, width=width
    )
    return compiler_pb2.SlotSpec(conv2d=shape)


def by_name(name: str, target: compiler_pb2.SlotSpec) -> compiler_pb2.CompileRequest:
    return compiler_pb2.CompileRequest(
        blueprint=compiler_pb2.BlueprintSpec(name=name), target=target
    )


def by_ir(ir: dict[str, Any], target: compiler_pb2.SlotSpec) -> compiler_pb2.CompileRequest:
    """A request with `ir` (the JSON form of BlueprintIR) given as a BlueprintIR message."""
    message = compiler_pb2.BlueprintIR()
    message.ParseFromString(_ir_message(ir).SerializeToString())
    return compiler_pb2.CompileRequest(
        blueprint=compiler_pb2.BlueprintSpec(ir=message), target=target
    )


def _ir_message(ir: dict[str, Any]) -> compiler_pb2.BlueprintIR:
    from google.protobuf import json_format

    return json_format.ParseDict(ir, compiler_pb2.BlueprintIR())


def rpc_error(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as failed:
        call()
    error: grpc.RpcError = failed.value
    return error


def details(error: grpc.RpcError) -> str:
    return error.details() or ""


def download(agent: CompilerProc, kernel_id: str, **request: Any) -> tuple[Any, bytes]:
    """GetKernel's first message and the bytes of the chunks, checked to be contiguous."""
    messages = list(
        agent.stub.GetKernel(
            compiler_pb2.GetKernelRequest(kernel_id=kernel_id, **request), timeout=TIMEOUT_S
        )
    )
    assert messages and messages[0].WhichOneof("part") == "info"
    data = bytearray()
    expected_offset = request.get("offset", 0)
    for message in messages[1:]:
        assert message.WhichOneof("part") == "chunk"
        assert message.chunk.offset == expected_offset
        data += message.chunk.data
        expected_offset += len(message.chunk.data)
    return messages[0].info, bytes(data)


def stats(agent: CompilerProc) -> Any:
    return agent.stub.GetStats(compiler_pb2.CompilerServiceGetStatsRequest(), timeout=10)


def kernel_path(run_dir: Path, kernel_id: str) -> Path:
    return run_dir / "compiler" / "kernels" / kernel_id[:2] / f"{kernel_id}.pt2"


# --- compile and download ---------------------------------------------------------------------


def test_second_compile_is_a_cache_hit_with_the_same_kernel(agent: CompilerProc) -> None:
    before = stats(agent)
    request = by_name("bottleneck_mlp", linear(8))
    first = agent.stub.Compile(request, timeout=TIMEOUT_S)
    second = agent.stub.Compile(request, timeout=TIMEOUT_S)
    assert not first.cache_hit and second.cache_hit
    assert first.HasField("kernel") and first.validation.passed
    report = first.validation
    assert report.kernel_latency_us > 0 and report.eager_latency_us > 0
    assert report.latency_ratio == pytest.approx(
        report.kernel_latency_us / report.eager_latency_us, rel=1e-6
    )
    assert second.validation == report  # the stored report, as measured at compile
    assert second.kernel == first.kernel
    assert len(first.kernel.kernel_id) == 64 and len(first.kernel.sha256) == 64
    meta = second.metadata
    assert (meta.kernel_id, meta.blueprint_name, meta.format) == (
        first.kernel.kernel_id,
        "bottleneck_mlp",
        "pt2",
    )
    assert meta.target.linear.in_features == 8 and meta.target.dtype == common_pb2.DTYPE_FLOAT32
    assert meta.param_count > 0 and meta.torch_version == torch.__version__
    assert meta.created_at.seconds > 0 and json.loads(meta.blueprint_json)["name"] == (
        "bottleneck_mlp"
    )
    after = stats(agent)
    assert after.cache_hits - before.cache_hits == 1
    assert after.cache_misses - before.cache_misses == 1
    assert after.compiles - before.compiles == 1
    assert after.cache_entries >= 1 and after.cache_bytes >= first.kernel.size_bytes

    def health_shows_the_hit() -> dict[str, Any]:
        shown: dict[str, Any] = agent.health().reply["details"]
        return shown if shown.get("cache_hits", 0) >= after.cache_hits else {}

    shown = wait_until(health_shows_the_hit, 10, "cache figures in the health details")
    assert shown["kernels"] >= 1 and shown["store_bytes"] >= first.kernel.size_bytes
    assert shown["cache_misses"] >= 1


def test_get_kernel_streams_checked_bytes_that_load_and_train(agent: CompilerProc) -> None:
    compiled = agent.stub.Compile(by_name("layer_norm_mlp", linear(8)), timeout=TIMEOUT_S)
    kernel_id = compiled.kernel.kernel_id
    info, data = download(agent, kernel_id, chunk_size=1000)
    assert info.kernel == compiled.kernel and info.metadata.kernel_id == kernel_id
    assert info.validation.passed and info.hits >= 1
    assert len(data) == compiled.kernel.size_bytes > 1000  # several chunks
    assert hashlib.sha256(data).hexdigest() == info.kernel.sha256

    kernel = load_kernel(data, info.kernel.sha256)
    x, target = torch.randn(16, 8), torch.randn(16, 8)
    before = kernel(x).detach()
    assert before.abs().max() == 0  # grafts without changing the host
    optimiser = torch.optim.SGD(kernel.parameters(), lr=0.1)
    (kernel(x) - target).square().mean().backward()
    optimiser.step()
    assert (kernel(x) - before).abs().max() > 0

    _, tail = download(agent, kernel_id, offset=len(data) - 100)
    assert tail == data[-100:]  # an interrupted download resumes


def test_concurrent_compiles_of_one_blueprint_build_it_once(agent: CompilerProc) -> None:
    before = stats(agent)
    request = by_name("conv_bottleneck", conv2d(4, 5, 5))
    with ThreadPoolExecutor(4) as pool:
        # A channel each: four separate clients.
        def compile_once(_: int) -> Any:
            with grpc.insecure_channel(f"127.0.0.1:{agent.port}") as channel:
                stub = compiler_pb2_grpc.CompilerServiceStub(channel)
                return stub.Compile(request, timeout=TIMEOUT_S)

        results = list(pool.map(compile_once, range(4)))
    assert len({r.kernel.kernel_id for r in results}) == 1
    assert all(r.validation.passed for r in results)
    after = stats(agent)
    assert after.compiles - before.compiles == 1


def test_kernel_failing_validation_answers_its_report_without_a_kernel(
    agent: CompilerProc,
) -> None:
    before = stats(agent)
    # A plain linear layer does not start at zero: grafting it would change the host.
    ir = {
        "irVersion": 1,
        "name": "plain_linear",
        "nodes": [
            {"name": "fc", "op": "linear", "inputs": ["input"], "attrs": {"out_features": "out"}}
        ],
        "output": "fc",
    }
    response = agent.stub.Compile(by_ir(ir, linear(6)), timeout=TIMEOUT_S)
    assert not response.HasField("kernel")
    assert not response.validation.passed
    outcomes = {c.name: c.outcome for c in response.validation.checks}
    assert outcomes["zero_at_init"] == compiler_pb2.CHECK_OUTCOME_FAILED
    assert outcomes["loads"] == compiler_pb2.CHECK_OUTCOME_PASSED
    after = stats(agent)
    assert after.compile_failures - before.compile_failures == 1
    assert after.compiles == before.compiles


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_of", "field"),
    [
        pytest.param(
            lambda: by_ir(
                {
                    "name": "bad_size",
                    "nodes": [
                        {
                            "name": "fc",
                            "op": "linear",
                            "inputs": ["input"],
                            "attrs": {"out_features": -3},
                        }
                    ],
                    "output": "fc",
                },
                linear(8),
            ),
            "blueprint.ir.nodes[0].attrs.out_features",
            id="negative-size",
        ),
        pytest.param(
            lambda: by_ir(
                {
                    "name": "bad_op",
                    "nodes": [
                        {
                            "name": "fc",
                            "op": "linear",
                            "inputs": ["input"],
                            "attrs": {"out_features": 8},
                        },
                        {"name": "weird", "op": "teleport", "inputs": ["fc"]},
                    ],
                    "output": "weird",
                },
                linear(8),
            ),
            "blueprint.ir.nodes[1].op",
            id="unknown-op",
        ),
        pytest.param(
            lambda: compiler_pb2.CompileRequest(
                blueprint=compiler_pb2.BlueprintSpec(
                    ir_json=json.dumps(
                        {
                            "name": "dangling",
                            "nodes": [
                                {"name": "act", "op": "relu", "inputs": ["nowhere"]},
                            ],
                            "output": "act",
                        }
                    )
                ),
                target=linear(8),
            ),
            "blueprint.ir_json.nodes[0].inputs[0]",
            id="ir-json-unknown-input",
        ),
        pytest.param(
            lambda: compiler_pb2.CompileRequest(
                blueprint=compiler_pb2.BlueprintSpec(name="bottleneck_mlp"),
                target=compiler_pb2.SlotSpec(
                    linear=compiler_pb2.LinearSlotShape(in_features=8, out_features=4)
                ),
            ),
            "target.linear.out_features",
            id="slot-changes-shape",
        ),
        pytest.param(
            lambda: by_name("conv3x3", linear(8)), "target", id="blueprint-for-another-slot-kind"
        ),
        pytest.param(
            lambda: compiler_pb2.CompileRequest(
                blueprint=compiler_pb2.BlueprintSpec(name="bottleneck_mlp"),
                target=compiler_pb2.SlotSpec(
                    linear=compiler_pb2.LinearSlotShape(in_features=8, out_features=8),
                    dtype=common_pb2.DTYPE_INT64,
                ),
            ),
            "target.dtype",
            id="unsupported-dtype",
        ),
        pytest.param(
            lambda: compiler_pb2.CompileRequest(target=linear(8)), "blueprint", id="no-blueprint"
        ),
    ],
)
def test_invalid_request_is_invalid_argument_naming_the_field(
    agent: CompilerProc, request_of: Any, field: str
) -> None:
    error = rpc_error(lambda: agent.stub.Compile(request_of(), timeout=TIMEOUT_S))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, details(error)
    assert details(error).startswith(f"{field}: "), details(error)


def test_forced_rebuild_is_unimplemented(agent: CompilerProc) -> None:
    request = by_name("bottleneck_mlp", linear(8))
    request.force = True
    error = rpc_error(lambda: agent.stub.Compile(request, timeout=30))
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED
    assert details(error).startswith("force: ")


def test_blueprint_past_the_limits_is_resource_exhausted(agent: CompilerProc) -> None:
    # Self-attention over 64 x 64 = 4096 positions: past the attention limit.
    error = rpc_error(
        lambda: agent.stub.Compile(by_name("attention_head", conv2d(4, 64, 64)), timeout=30)
    )
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, details(error)
    assert "tokens" in details(error)
    chain = [{"name": "n0", "op": "relu", "inputs": ["input"]}] + [
        {"name": f"n{i}", "op": "relu", "inputs": [f"n{i - 1}"]} for i in range(1, 40)
    ]
    too_many = by_ir({"name": "long", "nodes": chain, "output": "n39"}, linear(8))
    error = rpc_error(lambda: agent.stub.Compile(too_many, timeout=30))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, details(error)


def test_unknown_kernel_and_blueprint_are_not_found(agent: CompilerProc) -> None:
    missing = rpc_error(lambda: download(agent, "0" * 64))
    assert missing.code() == grpc.StatusCode.NOT_FOUND
    unknown = rpc_error(lambda: agent.stub.Compile(by_name("no_such_blueprint", linear(8))))
    assert unknown.code() == grpc.StatusCode.NOT_FOUND
    assert "no_such_blueprint" in details(unknown)
    malformed = rpc_error(lambda: download(agent, "not-an-id"))
    assert malformed.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(malformed).startswith("kernel_id: ")


# --- lists ------------------------------------------------------------------------------------


def test_list_blueprints_lists_the_catalogue_with_parameter_counts(agent: CompilerProc) -> None:
    every = agent.stub.ListBlueprints(compiler_pb2.ListBlueprintsRequest(), timeout=10).blueprints
    assert len(every) >= 10
    assert all(b.description and b.slot_kinds and b.param_count > 0 for b in every)
    convs = agent.stub.ListBlueprints(
        compiler_pb2.ListBlueprintsRequest(slot_kind=common_pb2.SLOT_KIND_CONV2D), timeout=10
    ).blueprints
    assert convs and all(common_pb2.SLOT_KIND_CONV2D in b.slot_kinds for b in convs)
    assert len(convs) < len(every)
    at_eight = agent.stub.ListBlueprints(
        compiler_pb2.ListBlueprintsRequest(target=linear(8)), timeout=10
    ).blueprints
    mlp = next(b for b in at_eight if b.name == "bottleneck_mlp")
    assert mlp.param_count_target.linear.in_features == 8
    compiled = agent.stub.Compile(by_name("bottleneck_mlp", linear(8)), timeout=TIMEOUT_S)
    assert mlp.param_count == compiled.metadata.param_count


def test_list_kernels_pages_through_the_most_recently_used_first(agent: CompilerProc) -> None:
    ids = [
        agent.stub.Compile(
            by_name("low_rank_adapter", linear(n)), timeout=TIMEOUT_S
        ).kernel.kernel_id
        for n in (9, 10, 11)
    ]
    page = compiler_pb2.ListKernelsRequest(
        blueprint_name="low_rank_adapter", page=common_pb2.PageRequest(page_size=2)
    )
    first = agent.stub.ListKernels(page, timeout=10)
    assert [k.kernel.kernel_id for k in first.kernels] == ids[::-1][:2]
    assert first.page.next_page_token
    page.page.page_token = first.page.next_page_token
    second = agent.stub.ListKernels(page, timeout=10)
    assert [k.kernel.kernel_id for k in second.kernels] == [ids[0]]
    assert not second.page.next_page_token
    assert all(k.metadata.blueprint_name == "low_rank_adapter" for k in second.kernels)

    page.blueprint_name = "bottleneck_mlp"  # the token was issued for another filter
    error = rpc_error(lambda: agent.stub.ListKernels(page, timeout=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(error).startswith("page.page_token: ")


# --- the store on disk ------------------------------------------------------------------------


def test_corrupted_kernel_file_is_never_served(agent: CompilerProc) -> None:
    compiled = agent.stub.Compile(by_name("residual_mlp", linear(8)), timeout=TIMEOUT_S)
    kernel_id, sha = compiled.kernel.kernel_id, compiled.kernel.sha256
    path = kernel_path(agent.run_dir, kernel_id)
    size = path.stat().st_size

    with path.open("r+b") as f:
        f.truncate(size // 2)
    # Nothing at all is streamed: no info message, no chunk of the damaged bytes.
    damaged = rpc_error(lambda: download(agent, kernel_id))
    assert damaged.code() == grpc.StatusCode.NOT_FOUND

    def health_reports_it() -> bool:
        return int(agent.health().reply["details"].get("corrupt_detected", 0)) >= 1

    wait_until(health_reports_it, 10, "corrupt_detected in the health details")
    again = agent.stub.Compile(by_name("residual_mlp", linear(8)), timeout=TIMEOUT_S)
    assert not again.cache_hit and again.kernel == compiled.kernel  # rebuilt, same bytes
    info, data = download(agent, kernel_id)
    assert hashlib.sha256(data).hexdigest() == sha == info.kernel.sha256

    with path.open("r+b") as f:  # damaged again; this time Compile is the first to look
        f.seek(size // 2)
        f.write(b"\0" * 16)
    rebuilt = agent.stub.Compile(by_name("residual_mlp", linear(8)), timeout=TIMEOUT_S)
    assert not rebuilt.cache_hit and rebuilt.kernel.sha256 == sha
    assert hashlib.sha256(path.read_bytes()).hexdigest() == sha


@pytest.mark.slow
def test_restarted_agent_still_has_its_kernels(
    tmp_path: Path, system_nats_url: str, system_redis_url: str, unique_name: str
) -> None:
    request = by_name("gated_gelu_mlp", linear(8))
    first = start_agent(tmp_path, system_nats_url, system_redis_url, unique_name)
    try:
        compiled = first.stub.Compile(request, timeout=TIMEOUT_S)
        assert not compiled.cache_hit
    finally:
        assert first.stop() == 0
    second = start_agent(tmp_path, system_nats_url, system_redis_url, unique_name)
    try:
        again = second.stub.Compile(request, timeout=TIMEOUT_S)
        assert again.cache_hit and again.kernel == compiled.kernel
        listed = second.stub.ListKernels(compiler_pb2.ListKernelsRequest(), timeout=10)
        assert [k.kernel.kernel_id for k in listed.kernels] == [compiled.kernel.kernel_id]
        assert stats(second).compiles == 0
        assert second.stop() == 0
    finally:
        second.kill()
