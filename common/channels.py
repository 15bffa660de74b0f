"""Outgoing gRPC channels between agents: one way to open them.

Every channel carries the trace context (OpenTelemetry's client interceptors),
the mesh's message size limits and keepalive settings. `agent_channel` finds the
agent through its Redis ready key, falling back to the config.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from common import security, telemetry
from common.config import StartupConfig
from common.grpc_server import MAX_MESSAGE_BYTES
from common.ready import resolve_address

CHANNEL_OPTIONS: Sequence[tuple[str, Any]] = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    # Reconnect quickly after an agent restarts instead of backing off for minutes.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 5_000),
)


def open_channel(target: str, settings: security.Security | None = None) -> grpc.aio.Channel:
    """An aio channel to `host:port` with tracing, the mesh's token/TLS and options."""
    settings = security.current() if settings is None else settings
    interceptors = [*telemetry.client_interceptors(), *settings.aio_client_interceptors()]
    credentials = settings.channel_credentials()
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS, interceptors=interceptors)
    return grpc.aio.secure_channel(
        target, credentials, options=CHANNEL_OPTIONS, interceptors=interceptors
    )


def open_sync_channel(target: str, settings: security.Security | None = None) -> grpc.Channel:
    """A blocking channel (command-line clients) with the mesh's token/TLS and options."""
    settings = security.current() if settings is None else settings
    credentials = settings.channel_credentials()
    if credentials is None:
        channel = grpc.insecure_channel(target, options=list(CHANNEL_OPTIONS))
    else:
        channel = grpc.secure_channel(target, credentials, options=list(CHANNEL_OPTIONS))
    return settings.intercept_sync(channel)


async def agent_channel(cfg: StartupConfig, agent: str) -> grpc.aio.Channel:
    """A channel to `agent`, located through its ready key or the config."""
    host, port = await resolve_address(cfg, agent)
    return open_channel(f"{host}:{port}")
