"""Outgoing gRPC channels between agents: one way to open them.

Every channel carries the trace context (OpenTelemetry's client interceptors),
the mesh's message size limits and keepalive settings. `agent_channel` finds the
agent through its Redis ready key, falling back to the config.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from common import telemetry
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


def open_channel(target: str) -> grpc.aio.Channel:
    """An aio channel to `host:port` with tracing and the mesh's options."""
    return grpc.aio.insecure_channel(
        target, options=CHANNEL_OPTIONS, interceptors=telemetry.client_interceptors()
    )


async def agent_channel(cfg: StartupConfig, agent: str) -> grpc.aio.Channel:
    """A channel to `agent`, located through its ready key or the config."""
    host, port = await resolve_address(cfg, agent)
    return open_channel(f"{host}:{port}")
