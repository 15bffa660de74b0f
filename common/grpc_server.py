"""The gRPC aio server every agent runs: health, reflection, tracing, metrics, error mapping.

`ServerCallInterceptor` is the one place where exceptions become gRPC statuses
(through `common.errors.to_grpc_status`; servicers just raise), and where each
call gets its server span (continuing the caller's trace from the `traceparent`
metadata) and its metrics.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from common import security, telemetry
from common.errors import GraftmeshError, to_grpc_status

_log = logging.getLogger(__name__)

InternalErrorHook = Callable[[str, BaseException], None]
# The context type servicer methods take (request and response types left open).
Context = grpc.aio.ServicerContext[Any, Any]

# Large artifacts stream in chunks, but single tensors for inference can be sizeable.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
SERVER_OPTIONS: Sequence[tuple[str, Any]] = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
)


# From a fast in-process call (0.5 ms) to a long upload (10 s).
RPC_SECONDS_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0
)  # fmt: skip


_TRACE_KEYS = frozenset({"traceparent", "tracestate", "baggage"})
_tracer = trace.get_tracer("graftmesh.grpc")


def _caller_context(context: grpc.aio.ServicerContext[Any, Any]) -> Any:
    """The trace context the caller sent in its metadata (W3C `traceparent`), if any."""
    carrier = {k: v for k, v in context.invocation_metadata() or () if k in _TRACE_KEYS}
    return propagate.extract(carrier) if carrier else None


def _server_span(
    method: str, context: grpc.aio.ServicerContext[Any, Any], attributes: dict[str, str]
) -> Any:
    """The call's SERVER span, child of the caller's; the wrappers set its status."""
    return _tracer.start_as_current_span(
        method,
        context=_caller_context(context),
        kind=SpanKind.SERVER,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    )


class ServerCallInterceptor(grpc.aio.ServerInterceptor):
    """Each call's server span, its metrics, and its exceptions turned into statuses.

    A `GraftmeshError` becomes its own code with its message. Anything else is a
    bug: INTERNAL with a generic message, logged with its stack trace and handed
    to `on_internal_error` (the agent reports it to the error bus).

    The span is started here with OpenTelemetry's API rather than by its gRPC
    instrumentation's server interceptor: that one rebuilds its wrappers on every
    call, which cost ~0.2 ms per call here (most of a loopback call's overhead);
    these wrappers are built once per method.
    """

    def __init__(self, on_internal_error: InternalErrorHook | None = None) -> None:
        self._on_internal_error = on_internal_error
        self._wrapped: dict[
            str, tuple[grpc.RpcMethodHandler[Any, Any], grpc.RpcMethodHandler[Any, Any]]
        ] = {}
        meter = telemetry.meter("graftmesh.grpc")
        self._calls = meter.create_counter(
            "graftmesh_rpc_server_calls", description="RPCs handled, by method and status code"
        )
        self._duration = meter.create_histogram(
            "graftmesh_rpc_server_duration_seconds",
            unit="s",
            description="RPC handling time",
            # OpenTelemetry's default buckets are sized for milliseconds.
            explicit_bucket_boundaries_advisory=RPC_SECONDS_BUCKETS,
        )

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        # Wrapping allocates four closures and a handler: do it once per method, not per call.
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap_handler(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap_handler(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(method, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(method, handler.stream_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(method, handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        assert handler.stream_stream is not None
        return grpc.stream_stream_rpc_method_handler(
            self._wrap_stream(method, handler.stream_stream),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _wrap_unary(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        attributes = {"rpc.system": "grpc", "rpc.method": method}

        async def wrapper(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            with _server_span(method, context, attributes) as span:
                try:
                    return await behavior(request, context)
                except grpc.aio.AbortError:
                    code = context.code() or grpc.StatusCode.UNKNOWN
                    raise
                except Exception as exc:
                    code = self._report(method, exc)
                    await context.abort(code, to_grpc_status(exc)[1])
                finally:
                    self._record(span, method, code, started)

        return wrapper

    def _wrap_stream(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        attributes = {"rpc.system": "grpc", "rpc.method": method}

        async def wrapper(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            with _server_span(method, context, attributes) as span:
                try:
                    result = behavior(request, context)
                    if inspect.isasyncgen(result):
                        async for item in result:
                            yield item
                    else:  # a handler that writes through context.write() and returns None
                        await result
                except grpc.aio.AbortError:
                    code = context.code() or grpc.StatusCode.UNKNOWN
                    raise
                except Exception as exc:
                    code = self._report(method, exc)
                    await context.abort(code, to_grpc_status(exc)[1])
                finally:
                    self._record(span, method, code, started)

        return wrapper

    def _report(self, method: str, exc: Exception) -> grpc.StatusCode:
        """The status `exc` maps to (set before aborting, so metrics record it); bugs reported."""
        if not isinstance(exc, GraftmeshError):
            _log.error("unhandled error in %s", method, exc_info=exc)
            if self._on_internal_error is not None:
                self._on_internal_error(method, exc)
        return to_grpc_status(exc)[0]

    def _record(self, span: trace.Span, method: str, code: grpc.StatusCode, started: float) -> None:
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code is not grpc.StatusCode.OK:
            span.set_status(Status(StatusCode.ERROR, code.name))
        attrs = {"rpc.method": method, "rpc.grpc.status_code": code.name}
        self._calls.add(1, attrs)
        self._duration.record(time.perf_counter() - started, attrs)


class GrpcServer:
    """An aio gRPC server with `grpc.health.v1`, reflection and the mesh's interceptors."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        on_internal_error: InternalErrorHook | None = None,
        extra_interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
        settings: security.Security | None = None,
    ) -> None:
        self._security = security.current() if settings is None else settings
        interceptors = [
            ServerCallInterceptor(on_internal_error),
            # Innermost, so refused calls are still counted and traced.
            *self._security.server_interceptors(),
            *extra_interceptors,
        ]
        self.server = grpc.aio.server(interceptors=interceptors, options=SERVER_OPTIONS)
        self.health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._address = f"{host}:{port}"
        self._service_names: list[str] = []
        self.port = port

    def add_services(self, names: Iterable[str]) -> None:
        """Declare full service names (`graftmesh.v1.TrainerService`) for health and reflection."""
        self._service_names.extend(names)

    async def start(self) -> None:
        names = [
            *self._service_names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ]
        reflection.enable_server_reflection(names, self.server)
        credentials = self._security.server_credentials()
        if credentials is None:
            bound = self.server.add_insecure_port(self._address)
        else:
            bound = self.server.add_secure_port(self._address, credentials)
        if bound == 0:
            raise OSError(f"cannot bind gRPC server to {self._address} (port in use?)")
        self.port = bound
        await self.server.start()
        await self.set_serving(True)

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self._service_names):
            await self.health.set(name, status)

    async def stop(self, grace_s: float) -> None:
        """Stop accepting calls; in-flight ones get `grace_s` to finish."""
        await self.set_serving(False)
        await self.server.stop(grace_s)
