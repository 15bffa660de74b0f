"""Agent-to-agent channels: found through the ready key or the config; what each call sends.

`open_channel` sends the token and the trace context on every call kind; here a
real gRPC aio server on loopback answers each kind with the metadata it
received, and spans go to an in-memory exporter on this process's tracer provider.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, StatusCode, TraceFlags

from common.channels import agent_channel, open_channel
from common.config import parse_config
from common.grpc_server import GrpcServer
from common.security import Security
from tests.ports import free_port

pytestmark = pytest.mark.integration


def _config(port: int, redis_url: str) -> Any:
    return parse_config(
        {
            "version": 1,
            "machine": "mainpc",
            "infra": {"redis_url": redis_url},
            "machines": {"mainpc": {"host": "127.0.0.1"}},
            "agent_groups": {
                "core": {
                    "machine": "mainpc",
                    "agents": {
                        "registry": {"module": "x", "port": port, "health_check_port": free_port()},
                    },
                }
            },
        }
    )


async def test_agent_channel_falls_back_to_the_config_and_reaches_the_server(
    system_redis_url: str,
) -> None:
    server = GrpcServer("127.0.0.1", free_port())
    await server.start()
    try:
        cfg = _config(server.port, system_redis_url)
        async with await agent_channel(cfg, "registry") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(0.5)


async def test_open_channel_to_nothing_fails_with_unavailable() -> None:
    async with open_channel(f"127.0.0.1:{free_port()}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=2
            )
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


# -- what every call sends ------------------------------------------------------------

TOKEN = "channel-token-51c2"
TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
PARENT_SPAN_ID = 0x00F067AA0BA902B7
SERVICE = "test.Echo"


def _seen(context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    keys = ("authorization", "traceparent")
    found = {k: v for k, v in context.invocation_metadata() or () if k in keys}
    return json.dumps(found).encode()


async def _unary_unary(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    if request == b"fail":
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "asked to fail")
    return _seen(context)


async def _unary_stream(
    request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
) -> AsyncIterator[bytes]:
    yield _seen(context)


async def _stream_unary(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
) -> bytes:
    async for _ in requests:
        pass
    return _seen(context)


async def _stream_stream(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
) -> AsyncIterator[bytes]:
    async for _ in requests:
        pass
    yield _seen(context)


@pytest.fixture
async def server_port() -> AsyncIterator[int]:
    server = grpc.aio.server()
    handlers = {
        "UU": grpc.unary_unary_rpc_method_handler(_unary_unary),
        "US": grpc.unary_stream_rpc_method_handler(_unary_stream),
        "SU": grpc.stream_unary_rpc_method_handler(_stream_unary),
        "SS": grpc.stream_stream_rpc_method_handler(_stream_stream),
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
    port = server.add_insecure_port(f"127.0.0.1:{free_port()}")
    await server.start()
    yield port
    await server.stop(None)


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    """Finished spans of this process (an SDK provider that records, installed once)."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()


async def _all_kinds(channel: grpc.aio.Channel) -> list[dict[str, str]]:
    """What the server saw on one call of each kind."""

    async def two() -> AsyncIterator[bytes]:
        yield b"a"
        yield b"b"

    answers = [
        await channel.unary_unary(f"/{SERVICE}/UU")(b"x", timeout=5),
        *[m async for m in channel.unary_stream(f"/{SERVICE}/US")(b"x", timeout=5)],
        await channel.stream_unary(f"/{SERVICE}/SU")(two(), timeout=5),
        *[m async for m in channel.stream_stream(f"/{SERVICE}/SS")(two(), timeout=5)],
    ]
    return [json.loads(a) for a in answers]


def _parent(sampled: bool) -> NonRecordingSpan:
    flags = TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
    return NonRecordingSpan(
        SpanContext(TRACE_ID, PARENT_SPAN_ID, is_remote=True, trace_flags=flags)
    )


async def test_token_and_trace_context_on_every_call_kind(
    server_port: int, spans: InMemorySpanExporter
) -> None:
    spans.clear()
    channel = open_channel(f"127.0.0.1:{server_port}", Security(token=TOKEN))
    try:
        with trace.use_span(_parent(sampled=True)):
            seen = await _all_kinds(channel)
    finally:
        await channel.close()
    assert len(seen) == 4
    for metadata in seen:
        assert metadata["authorization"] == f"Bearer {TOKEN}"
        version, trace_id, _span, flags = metadata["traceparent"].split("-")
        assert (version, int(trace_id, 16), flags) == ("00", TRACE_ID, "01")
    # Calls with a unary response get a CLIENT span, child of the caller's, whose id is
    # what the server was sent; streamed responses pass the caller's context on.
    finished = {s.name: s for s in spans.get_finished_spans()}
    assert set(finished) == {f"/{SERVICE}/UU", f"/{SERVICE}/SU"}
    uu, su = finished[f"/{SERVICE}/UU"], finished[f"/{SERVICE}/SU"]
    for span, metadata in ((uu, seen[0]), (su, seen[2])):
        assert span.kind is SpanKind.CLIENT
        assert span.parent is not None and span.parent.span_id == PARENT_SPAN_ID
        assert span.context.trace_id == TRACE_ID
        assert int(metadata["traceparent"].split("-")[2], 16) == span.context.span_id
        assert span.attributes is not None and span.attributes["rpc.grpc.status_code"] == 0
    for metadata in (seen[1], seen[3]):
        assert int(metadata["traceparent"].split("-")[2], 16) == PARENT_SPAN_ID


async def test_failed_call_marks_its_span_and_still_raises(
    server_port: int, spans: InMemorySpanExporter
) -> None:
    spans.clear()
    channel = open_channel(f"127.0.0.1:{server_port}", Security())
    try:
        with trace.use_span(_parent(sampled=True)), pytest.raises(grpc.aio.AioRpcError) as info:
            await channel.unary_unary(f"/{SERVICE}/UU")(b"fail", timeout=5)
    finally:
        await channel.close()
    assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    (span,) = spans.get_finished_spans()
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "FAILED_PRECONDITION: asked to fail"
    assert span.attributes is not None
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.FAILED_PRECONDITION.value[0]


async def test_unsampled_trace_travels_without_spans(
    server_port: int, spans: InMemorySpanExporter
) -> None:
    spans.clear()
    channel = open_channel(f"127.0.0.1:{server_port}", Security())
    try:
        with trace.use_span(_parent(sampled=False)):
            unsampled = await _all_kinds(channel)
        outside = await _all_kinds(channel)
    finally:
        await channel.close()
    for metadata in unsampled:
        assert "authorization" not in metadata
        assert metadata["traceparent"] == f"00-{TRACE_ID:032x}-{PARENT_SPAN_ID:016x}-00"
    # Outside any trace, a call with a unary response starts one (this provider records
    # root spans); a streamed one sends nothing.
    roots = spans.get_finished_spans()
    assert [s.name for s in roots] == [f"/{SERVICE}/UU", f"/{SERVICE}/SU"]
    assert all(s.parent is None and s.context.trace_id != TRACE_ID for s in roots)
    assert [m.get("traceparent", "").split("-")[1:2] for m in outside] == [
        [f"{roots[0].context.trace_id:032x}"],
        [],
        [f"{roots[1].context.trace_id:032x}"],
        [],
    ]
    assert all("authorization" not in m for m in outside)
