"""Where the alerts engine's state lives between runs: a NATS key-value bucket.

The state sits next to the durable consumer it goes with (same NATS), so an
alerts agent that moves to another machine carries on where it stopped. The
value is zlib-compressed JSON (`encode_state`/`decode_state`), one key per
durable consumer name.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from typing import Any, Protocol

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

__all__ = [
    "DEFAULT_STATE_BUCKET",
    "KvStateStore",
    "StateStore",
    "decode_state",
    "encode_state",
]

DEFAULT_STATE_BUCKET = "graftmesh_alerts"


class StateStore(Protocol):
    """Saves and loads one blob (the whole of the surface)."""

    async def load(self) -> bytes | None:
        """The saved blob, or None when nothing was saved yet."""

    async def save(self, data: bytes) -> None:
        """Replace the saved blob; raises when it was not saved."""


def encode_state(state: Mapping[str, Any]) -> bytes:
    """Compact JSON, zlib-compressed."""
    return zlib.compress(json.dumps(state, separators=(",", ":")).encode(), level=1)


def decode_state(data: bytes) -> dict[str, Any]:
    """The state `encode_state` wrote; ValueError when `data` is not one."""
    try:
        state = json.loads(zlib.decompress(data))
    except (zlib.error, ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"unreadable alerts state: {err}") from None
    if not isinstance(state, dict):
        raise ValueError("unreadable alerts state: not a JSON object")
    return state


class KvStateStore:
    """One key of a JetStream key-value bucket (file storage, one revision kept)."""

    def __init__(self, kv: KeyValue, key: str) -> None:
        self._kv = kv
        self.key = key

    @classmethod
    async def open(
        cls, js: JetStreamContext, key: str, bucket: str = DEFAULT_STATE_BUCKET
    ) -> KvStateStore:
        """The store of `key` in `bucket`, creating the bucket when it does not exist."""
        try:
            kv = await js.key_value(bucket)
        except nats.js.errors.BucketNotFoundError:
            try:
                kv = await js.create_key_value(
                    KeyValueConfig(
                        bucket=bucket,
                        description="graftmesh alerts engine state, by durable consumer",
                        history=1,
                        storage=StorageType.FILE,
                    )
                )
            except nats.js.errors.BadRequestError:
                # Another alerts agent created it in between.
                kv = await js.key_value(bucket)
        return cls(kv, key)

    async def load(self) -> bytes | None:
        try:
            entry = await self._kv.get(self.key)
        except nats.js.errors.KeyNotFoundError:
            return None
        return entry.value

    async def save(self, data: bytes) -> None:
        await self._kv.put(self.key, data)
