"""`graftmesh infer`: the router's client side.

`infer` is the whole command; the `graftmesh` CLI maps its options onto it and
exits with what it returns. The router is found through its Redis ready key,
falling back to the config (`common.ready.resolve_address`). Tensors are
encoded and decoded with `struct`: the client side needs no torch.

Exit codes: 0 success; 1 the router is not reachable or could not serve the
request (no replica, deadline, cost limit); 2 bad inputs, or an unknown model,
version or alias (usage).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from typing import Final

import grpc
from rich.console import Console
from rich.table import Table
from rich.text import Text

from common.client_cli import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    connect,
    print_error,
    rpc_failure,
)
from common.config import StartupConfig
from common.stubs import common_pb2, router_pb2, router_pb2_grpc

__all__ = [
    "DEFAULT_AGENT",
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "InputsError",
    "decode_tensor",
    "encode_tensor",
    "infer",
    "parse_inputs",
]

# 3 is reserved for `up`, so a router that cannot be reached is a failed command (1).
DEFAULT_AGENT: Final = "router"
_TIMEOUT_S: Final = 30.0
_DEADLINE_MS: Final = 20_000
# Outputs with more elements than this print their shape and first values only.
_PRINT_LIMIT: Final = 200
# Deeper nesting than any real tensor: bounds the recursion on hostile JSON.
_MAX_RANK: Final = 16

# struct formats (little-endian) of the dtypes the wire carries; bfloat16 is read as
# its 16 raw bits, which are the high half of a float32.
_FORMATS: Final[dict[int, str]] = {
    common_pb2.DTYPE_FLOAT32: "f",
    common_pb2.DTYPE_FLOAT16: "e",
    common_pb2.DTYPE_FLOAT64: "d",
    common_pb2.DTYPE_INT64: "q",
    common_pb2.DTYPE_INT32: "i",
    common_pb2.DTYPE_BOOL: "?",
    common_pb2.DTYPE_UINT8: "B",
    common_pb2.DTYPE_BFLOAT16: "H",
}

Value = float | int | bool
Nested = Value | list["Nested"]


class InputsError(ValueError):
    """The inputs JSON is not a tensor or a mapping of names to tensors."""


def _shape_of(value: object, where: str, depth: int = 0) -> list[int]:
    if depth > _MAX_RANK:
        raise InputsError(f"{where}: nested deeper than {_MAX_RANK} levels")
    if isinstance(value, bool) or not isinstance(value, int | float | list):
        raise InputsError(f"{where}: expected numbers or lists of numbers, got {value!r:.40}")
    if not isinstance(value, list):
        if isinstance(value, float) and not math.isfinite(value):
            raise InputsError(f"{where}: {value} is not a finite number")
        return []
    if not value:
        raise InputsError(f"{where}: an empty list has no shape to infer")
    shapes = [_shape_of(item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value)]
    if any(s != shapes[0] for s in shapes):
        raise InputsError(f"{where}: rows of different lengths (not a rectangular tensor)")
    return [len(value), *shapes[0]]


def _flatten(value: Nested, into: list[float]) -> None:
    if isinstance(value, list):
        for item in value:
            _flatten(item, into)
    else:
        into.append(float(value))


def encode_tensor(value: object, where: str = "inputs") -> common_pb2.Tensor:
    """A float32 `Tensor` of a number or a rectangular nested list of numbers."""
    shape = _shape_of(value, where)
    flat: list[float] = []
    _flatten(value, flat)  # type: ignore[arg-type]  # checked by _shape_of
    return common_pb2.Tensor(
        data=struct.pack(f"<{len(flat)}f", *flat), shape=shape, dtype=common_pb2.DTYPE_FLOAT32
    )


def parse_inputs(
    text: str,
) -> tuple[dict[str, common_pb2.Tensor], list[common_pb2.Tensor]]:
    """The request's `(inputs, args)` of the inputs JSON: a tensor (nested lists of numbers)
    is the model's single input; an object maps input names to tensors. Every tensor is
    float32. `InputsError` says what is wrong and where."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputsError(f"inputs are not JSON: {exc}") from None
    if isinstance(data, dict):
        if not data:
            raise InputsError("inputs name no tensor")
        return {str(k): encode_tensor(v, f"inputs[{k}]") for k, v in data.items()}, []
    return {}, [encode_tensor(data, "inputs")]


def _unflatten(flat: Sequence[Value], shape: Sequence[int]) -> Nested:
    if not shape:
        return flat[0]
    step = len(flat) // shape[0] if shape[0] else 0
    return [_unflatten(flat[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]


def decode_tensor(tensor: common_pb2.Tensor) -> Nested:
    """The values of a wire `Tensor` as nested lists (a bare number for a scalar).

    `ValueError` for a dtype this client cannot read or bytes that do not match the shape.
    """
    fmt = _FORMATS.get(tensor.dtype)
    if fmt is None:
        raise ValueError(f"cannot read dtype {tensor.dtype}")
    count = math.prod(tensor.shape)
    size = struct.calcsize(fmt)
    if len(tensor.data) != count * size:
        raise ValueError(f"{len(tensor.data)} bytes do not hold {list(tensor.shape)} x {fmt}")
    values: list[Value] = list(struct.unpack(f"<{count}{fmt}", tensor.data))
    if tensor.dtype == common_pb2.DTYPE_BFLOAT16:
        values = [struct.unpack("<f", struct.pack("<I", int(v) << 16))[0] for v in values]
    return _unflatten(values, list(tensor.shape))


def _dtype_name(dtype: int) -> str:
    return common_pb2.DType.Name(dtype).removeprefix("DTYPE_").lower()  # type: ignore[arg-type]


def _format_values(tensor: common_pb2.Tensor) -> str:
    count = math.prod(tensor.shape)
    if count > _PRINT_LIMIT:
        head = decode_tensor(
            common_pb2.Tensor(
                data=tensor.data[: _PRINT_LIMIT * struct.calcsize(_FORMATS[tensor.dtype])],
                shape=[_PRINT_LIMIT],
                dtype=tensor.dtype,
            )
        )
        return f"{json.dumps(head)[:-1]}, ... ({count} values)]"
    return json.dumps(decode_tensor(tensor))


def infer(
    cfg: StartupConfig,
    name: str,
    inputs_json: str,
    out: Console,
    *,
    alias: str = "production",
    version: int | None = None,
    agent: str = DEFAULT_AGENT,
    max_cost: float | None = None,
    request_id: str = "",
) -> int:
    """Run one inference of `name` (by `version` when given, else by `alias`) on the
    float32 inputs in `inputs_json` (see `parse_inputs`), and print the outputs with
    the version and replica that served them, the latency and the cost."""
    if version is not None and version < 1:
        print_error(out, f"a version is >= 1, not {version}")
        return EXIT_USAGE
    try:
        named, positional = parse_inputs(inputs_json)
    except InputsError as exc:
        print_error(out, str(exc))
        return EXIT_USAGE
    ref = common_pb2.ModelRef(name=name)
    if version is not None:
        ref.version = version
    else:
        ref.alias = alias
    request = router_pb2.InferRequest(
        model=ref,
        inputs=named,
        args=positional,
        deadline_ms=_DEADLINE_MS,
        request_id=request_id,
    )
    if max_cost is not None:
        request.max_cost = max_cost
    channel = connect(out, cfg, agent)
    if channel is None:
        return EXIT_UNREACHABLE
    with channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        try:
            reply: router_pb2.InferResponse = stub.Infer(request, timeout=_TIMEOUT_S)
        except grpc.RpcError as exc:
            return rpc_failure(out, exc, agent)
    table = Table(box=None, show_header=False)
    for i, tensor in enumerate(reply.outputs):
        try:
            values = _format_values(tensor)
        except ValueError as exc:
            values = f"(unreadable: {exc})"
        table.add_row(
            Text(f"output[{i}]"),
            Text(f"{_dtype_name(tensor.dtype)}{list(tensor.shape)}"),
            Text(values),
        )
    table.add_row("model", Text(f"{reply.model_name} v{reply.version}"))
    table.add_row("replica", Text(reply.replica_id))
    table.add_row("latency", f"{reply.latency_us / 1000:.3f} ms")
    table.add_row("cost", f"{reply.cost:.6g}")
    out.print(table)
    return EXIT_OK
