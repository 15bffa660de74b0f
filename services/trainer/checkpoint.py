"""Checkpoint files: atomic, checksummed, the last K kept, no pickle.

A checkpoint is one safetensors file, `step-<step>.safetensors`, holding the
tensors (`t/<name>`), opaque byte blobs such as kernel archives (`b/<name>`,
as uint8 tensors) and the JSON state (in the safetensors metadata); beside it
`step-<step>.json` records its sha256 and size. Both are written atomically,
data first: a checkpoint exists once its record does. Loading checks the
sha256 of the bytes before parsing anything; `load_latest` walks back from
the newest checkpoint past any that is damaged or unreadable (and lists them
in `rejected`). A failed write raises and leaves every earlier checkpoint as
it was. What goes into a checkpoint is the loop's business (`state.py`); this
module only stores and verifies.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from common.errors import IntegrityError
from services.trainer.files import sha256_hex, write_atomic

__all__ = ["FORMAT_VERSION", "CheckpointData", "CheckpointInfo", "CheckpointStore"]

FORMAT_VERSION: Final = 1
_STATE_KEY: Final = "graftmesh.checkpoint.state"
_RECORD = re.compile(r"step-(\d{9,})\.json")


@dataclass
class CheckpointData:
    """What one checkpoint holds: tensors, byte blobs, and JSON-ready state."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckpointInfo:
    """A written checkpoint: its step, data file, sha256 and size."""

    step: int
    path: Path
    sha256: str
    size_bytes: int
    created: float


def encode(data: CheckpointData) -> bytes:
    """The safetensors bytes of `data` (tensors copied to CPU, contiguous, unshared)."""
    tensors = {
        f"t/{k}": v.detach().to("cpu", copy=True).contiguous() for k, v in data.tensors.items()
    }
    for name, blob in data.blobs.items():
        tensors[f"b/{name}"] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    state = json.dumps(data.state, sort_keys=True, allow_nan=False)
    return save_tensors(tensors, metadata={_STATE_KEY: state})


def decode(raw: bytes) -> CheckpointData:
    """The inverse of `encode`; `IntegrityError` for anything malformed."""
    try:
        header_size = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + header_size])
        state = json.loads(header["__metadata__"][_STATE_KEY])
        tensors = load_tensors(raw)
    except Exception as exc:
        raise IntegrityError(f"checkpoint is not readable: {type(exc).__name__}: {exc}") from exc
    data = CheckpointData(state=state)
    for key, value in tensors.items():
        kind, _, name = key.partition("/")
        if kind == "t":
            data.tensors[name] = value
        elif kind == "b":
            data.blobs[name] = value.numpy().tobytes()
        else:
            raise IntegrityError(f"checkpoint holds an unexpected entry {key!r}")
    return data


class CheckpointStore:
    """The checkpoints of one job in `root` (see the module doc).

    `write` writes one file atomically; it is a parameter so a caller can put
    the files elsewhere (and tests can make a write fail).
    """

    def __init__(
        self,
        root: Path | str,
        *,
        keep: int = 3,
        write: Callable[[Path, bytes], None] = write_atomic,
    ) -> None:
        if keep < 1:
            raise ValueError("keep must be >= 1")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self._write = write
        self.rejected: list[tuple[Path, str]] = []
        for leftover in self.root.glob(".*.tmp"):  # an interrupted write
            leftover.unlink(missing_ok=True)

    def save(self, step: int, data: CheckpointData) -> CheckpointInfo:
        """Write a checkpoint for `step` (replacing one of the same step), then prune."""
        raw = encode(data)
        path = self.root / f"step-{step:09d}.safetensors"
        info = CheckpointInfo(step, path, sha256_hex(raw), len(raw), time.time())
        record = {
            "format": FORMAT_VERSION,
            "step": step,
            "file": path.name,
            "sha256": info.sha256,
            "size_bytes": info.size_bytes,
            "created": info.created,
        }
        record_path = self.root / f"step-{step:09d}.json"
        # An older record of the same step must not vouch for the new data file meanwhile.
        record_path.unlink(missing_ok=True)
        self._write(path, raw)
        self._write(record_path, json.dumps(record, sort_keys=True).encode())
        self._prune()
        return info

    def checkpoints(self) -> list[CheckpointInfo]:
        """Every recorded checkpoint, newest first (records only; nothing verified yet)."""
        found = []
        for record_path in self.root.glob("step-*.json"):
            if not _RECORD.fullmatch(record_path.name):
                continue
            try:
                record = json.loads(record_path.read_bytes())
                info = CheckpointInfo(
                    int(record["step"]),
                    self.root / str(record["file"]),
                    str(record["sha256"]),
                    int(record["size_bytes"]),
                    float(record["created"]),
                )
            except (OSError, ValueError, KeyError, TypeError) as exc:
                self.rejected.append((record_path, f"unreadable record: {exc}"))
                continue
            found.append(info)
        return sorted(found, key=lambda i: i.step, reverse=True)

    def load(self, info: CheckpointInfo) -> CheckpointData:
        """The verified contents of a checkpoint; `IntegrityError` when damaged."""
        try:
            raw = info.path.read_bytes()
        except OSError as exc:
            raise IntegrityError(f"checkpoint {info.path.name} unreadable: {exc}") from exc
        actual = sha256_hex(raw)
        if actual != info.sha256:
            raise IntegrityError(
                f"checkpoint {info.path.name}: sha256 {actual} does not match the recorded "
                f"{info.sha256}"
            )
        data = decode(raw)
        if data.state.get("format") not in (None, FORMAT_VERSION):
            raise IntegrityError(f"checkpoint {info.path.name} has format {data.state['format']}")
        return data

    def load_latest(self) -> tuple[CheckpointInfo, CheckpointData] | None:
        """The newest checkpoint that verifies, or None; damaged ones go to `rejected`."""
        for info in self.checkpoints():
            try:
                return info, self.load(info)
            except IntegrityError as exc:
                self.rejected.append((info.path, str(exc)))
        return None

    def _prune(self) -> None:
        for old in self.checkpoints()[self.keep :]:
            (self.root / f"step-{old.step:09d}.json").unlink(missing_ok=True)
            old.path.unlink(missing_ok=True)


def json_ready(value: Any) -> Any:
    """`value` with tuples turned into lists and numpy/torch scalars into Python numbers."""
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value
