"""OpenTelemetry tracing and metrics, set up once per process, and a Prometheus endpoint.

- Traces: a `TracerProvider` named after the agent. Spans are exported over OTLP
  only when the standard `OTEL_EXPORTER_OTLP_ENDPOINT` is set and an OTLP exporter
  is installed; otherwise they still propagate (trace ids in logs and error events).
- Metrics: a `MeterProvider` whose reader is the Prometheus exporter, scraped on
  the agent's metrics port (`GRAFTMESH_METRICS_PORT`).
- gRPC: the interceptors in `common.channels` (client) and `common.grpc_server`
  (server) carry trace context in metadata.
- NATS: `inject_headers` / `extract_context` carry it in message headers.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

_log = logging.getLogger(__name__)


@dataclass
class Telemetry:
    """What `setup_telemetry` made; `shutdown()` flushes spans and stops the scrape server."""

    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    metrics_port: int | None
    _http_server: Any = None

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()
        if self._http_server is not None:
            self._http_server.shutdown()
            self._http_server.server_close()
            self._http_server = None


_current: Telemetry | None = None


def _otlp_exporter() -> SpanExporter | None:
    if not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return None
    try:
        module = importlib.import_module("opentelemetry.exporter.otlp.proto.grpc.trace_exporter")
    except ImportError:
        _log.warning("OTEL_EXPORTER_OTLP_ENDPOINT is set but no OTLP exporter is installed")
        return None
    exporter: SpanExporter = module.OTLPSpanExporter()
    return exporter


def setup_telemetry(
    service: str,
    machine: str,
    *,
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
    span_exporter: SpanExporter | None = None,
) -> Telemetry:
    """Install the global tracer and meter providers for this process (once).

    `metrics_port` starts a Prometheus scrape endpoint on `metrics_host`; 0 or
    None serves none. `span_exporter` overrides the OTLP choice (tests pass an
    in-memory one).
    """
    global _current  # noqa: PLW0603 -- OpenTelemetry's providers are process-global by design
    if _current is not None:
        return _current
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import start_http_server

    resource = Resource.create(
        {"service.name": service, "service.namespace": "graftmesh", "host.name": machine}
    )
    exporter = span_exporter or _otlp_exporter()
    if exporter is not None:
        tracer_provider = TracerProvider(resource=resource)
        tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
    else:
        # Nothing would receive the spans: record none. Trace ids are still made and
        # passed on (logs, error events, outgoing calls), spans just cost less.
        tracer_provider = TracerProvider(resource=resource, sampler=ALWAYS_OFF)
    trace.set_tracer_provider(tracer_provider)

    meter_provider = MeterProvider(resource=resource, metric_readers=[PrometheusMetricReader()])
    metrics.set_meter_provider(meter_provider)

    http_server = None
    if metrics_port:
        http_server, _thread = start_http_server(metrics_port, addr=metrics_host)
    _current = Telemetry(tracer_provider, meter_provider, metrics_port or None, http_server)
    return _current


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def meter(name: str) -> metrics.Meter:
    return metrics.get_meter(name)


def inject_headers(headers: dict[str, str] | None = None) -> dict[str, str]:
    """`headers` plus the current trace context (W3C `traceparent`), for a NATS message."""
    carrier: dict[str, str] = dict(headers or {})
    propagate.inject(carrier)
    return carrier


def extract_context(headers: Mapping[str, str] | None) -> otel_context.Context:
    """The trace context a NATS message carried, to start a child span from."""
    return propagate.extract(dict(headers or {}))


def current_trace_id() -> str | None:
    """The active span's trace id as 32 hex digits, or None outside any span."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None
