"""Tensors on the wire (`graftmesh.v1.Tensor`) and a model's input signature. No I/O.

`decode_inputs` turns a request's tensors into torch tensors (checking each
one's bytes against its shape and dtype); `bind` checks them against a
version's `Signature` and puts them in call order. Every problem is an
`InvalidArgumentError` whose field is the request path (`inputs[x].shape[1]`,
`args[0].dtype`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from common.errors import InvalidArgumentError
from common.stubs import common_pb2

__all__ = [
    "DecodedInputs",
    "Signature",
    "TensorSpec",
    "WireTensor",
    "bind",
    "check_wire",
    "decode_inputs",
    "dtype_from_proto",
    "dtype_to_proto",
    "tensor_from_proto",
    "tensor_to_proto",
]

_TO_TORCH: dict[common_pb2.DType.ValueType, torch.dtype] = {
    common_pb2.DTYPE_FLOAT32: torch.float32,
    common_pb2.DTYPE_FLOAT16: torch.float16,
    common_pb2.DTYPE_BFLOAT16: torch.bfloat16,
    common_pb2.DTYPE_FLOAT64: torch.float64,
    common_pb2.DTYPE_INT64: torch.int64,
    common_pb2.DTYPE_INT32: torch.int32,
    common_pb2.DTYPE_BOOL: torch.bool,
    common_pb2.DTYPE_UINT8: torch.uint8,
}
_FROM_TORCH: dict[torch.dtype, common_pb2.DType.ValueType] = {v: k for k, v in _TO_TORCH.items()}
_ITEMSIZE: dict[torch.dtype, int] = {
    d: torch.empty((), dtype=d).element_size() for d in _FROM_TORCH
}
# Dtypes numpy has: their bytes come straight from `Tensor.numpy()`.
_NUMPY_DTYPES = frozenset(_FROM_TORCH) - {torch.bfloat16}


def dtype_from_proto(dtype: int) -> torch.dtype | None:
    """The torch dtype of a `DType` value; None for DTYPE_UNSPECIFIED or an unknown value."""
    return _TO_TORCH.get(common_pb2.DType.ValueType(dtype))


def dtype_to_proto(dtype: torch.dtype) -> common_pb2.DType.ValueType:
    """The `DType` of a torch dtype; `ValueError` for one the wire cannot carry."""
    try:
        return _FROM_TORCH[dtype]
    except KeyError:
        raise ValueError(f"torch dtype {dtype} has no graftmesh.v1.DType") from None


def _dtype_name(dtype: torch.dtype) -> str:
    return common_pb2.DType.Name(_FROM_TORCH[dtype]) if dtype in _FROM_TORCH else str(dtype)


@dataclass(frozen=True, slots=True)
class WireTensor:
    """A request's tensor whose bytes were checked against its shape and dtype.

    It becomes a torch tensor (`to_torch`) where it is used: on a replica's thread,
    so the event loop makes no torch calls for it.
    """

    data: bytes
    shape: tuple[int, ...]
    dtype: torch.dtype

    def dim(self) -> int:
        return len(self.shape)

    def to_torch(self) -> torch.Tensor:
        """A writable CPU tensor (a copy: the request's bytes are immutable)."""
        if not self.data:
            return torch.empty(self.shape, dtype=self.dtype)
        return torch.frombuffer(bytearray(self.data), dtype=self.dtype).reshape(self.shape)


def check_wire(message: common_pb2.Tensor, field: str) -> WireTensor:
    """`message` checked (dtype, shape, byte count); `InvalidArgumentError` naming `field`."""
    dtype = dtype_from_proto(message.dtype)
    if dtype is None:
        raise InvalidArgumentError(f"must be a known DType, got {message.dtype}", f"{field}.dtype")
    shape = tuple(message.shape)
    for i, size in enumerate(shape):
        if size < 0:
            raise InvalidArgumentError(f"must be >= 0, got {size}", f"{field}.shape[{i}]")
    count = math.prod(shape)
    itemsize = _ITEMSIZE[dtype]
    data = message.data
    if len(data) != count * itemsize:
        raise InvalidArgumentError(
            f"has {len(data)} bytes; shape {list(shape)} of "
            f"{common_pb2.DType.Name(message.dtype)} needs {count * itemsize}",
            f"{field}.data",
        )
    return WireTensor(data, shape, dtype)


def tensor_from_proto(message: common_pb2.Tensor, field: str) -> torch.Tensor:
    """A (writable, CPU) torch tensor of `message`; `InvalidArgumentError` naming `field`."""
    return check_wire(message, field).to_torch()


def tensor_to_proto(tensor: torch.Tensor) -> common_pb2.Tensor:
    """The wire form of `tensor` (moved to the CPU, row-major, little-endian)."""
    dtype = dtype_to_proto(tensor.dtype)
    if tensor.device.type != "cpu" or tensor.requires_grad:
        tensor = tensor.detach().to("cpu")
    if tensor.dtype in _NUMPY_DTYPES:
        # numpy writes C order whatever the strides are.
        data = tensor.numpy().tobytes()
    else:
        flat = tensor.contiguous().reshape(-1)
        data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    return common_pb2.Tensor(data=data, shape=list(tensor.shape), dtype=dtype)


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One input or output: name, dtype and shape (-1 marks a dynamic dimension)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    def describe(self) -> str:
        return f"{self.name}: {_dtype_name(self.dtype)} {list(self.shape)}"


@dataclass(frozen=True, slots=True)
class Signature:
    """A version's inputs and outputs in call order."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...] = ()
    # The largest batch (dim 0) the model takes, when it has a limit.
    max_batch: int | None = None

    @property
    def batchable(self) -> bool:
        """Whether requests can be concatenated along dim 0 and the outputs split back."""
        specs = (*self.inputs, *self.outputs)
        return bool(self.inputs) and all(s.shape and s.shape[0] == -1 for s in specs)

    def to_proto_specs(self) -> list[common_pb2.TensorSpec]:
        return [
            common_pb2.TensorSpec(name=s.name, dtype=dtype_to_proto(s.dtype), shape=list(s.shape))
            for s in self.inputs
        ]


@dataclass(frozen=True, slots=True)
class DecodedInputs:
    """A request's tensors, by name (`inputs`) or by position (`args`)."""

    named: Mapping[str, WireTensor] | None
    positional: Sequence[WireTensor] | None


def decode_inputs(
    inputs: Mapping[str, common_pb2.Tensor], args: Sequence[common_pb2.Tensor]
) -> DecodedInputs:
    """Check a request's `inputs` or `args` (giving both is an error)."""
    if inputs and args:
        raise InvalidArgumentError("give either inputs or args, not both", "inputs")
    if inputs:
        return DecodedInputs(
            {name: check_wire(t, f"inputs[{name}]") for name, t in inputs.items()}, None
        )
    return DecodedInputs(None, [check_wire(t, f"args[{i}]") for i, t in enumerate(args)])


def bind(decoded: DecodedInputs, signature: Signature, version: int) -> list[WireTensor]:
    """The request's tensors in `signature` order, checked against it (`version`: for messages)."""
    specs = signature.inputs
    names = [s.name for s in specs]
    ordered: list[tuple[str, WireTensor]] = []
    if decoded.named is not None:
        for name in decoded.named:
            if name not in names:
                raise InvalidArgumentError(
                    f"v{version} has no input {name!r}; its inputs are {names}", f"inputs[{name}]"
                )
        for name in names:
            if name not in decoded.named:
                raise InvalidArgumentError(f"missing; v{version} needs it", f"inputs[{name}]")
            ordered.append((f"inputs[{name}]", decoded.named[name]))
    else:
        positional = decoded.positional or []
        if len(positional) != len(specs):
            raise InvalidArgumentError(
                f"v{version} takes {len(specs)} input(s) ({names}), got {len(positional)}",
                "args" if positional else "inputs",
            )
        ordered = [(f"args[{i}]", t) for i, t in enumerate(positional)]
    batch: tuple[str, int] | None = None
    for (path, tensor), spec in zip(ordered, specs, strict=True):
        if tensor.dtype != spec.dtype:
            raise InvalidArgumentError(
                f"expected {_dtype_name(spec.dtype)}, got {_dtype_name(tensor.dtype)}",
                f"{path}.dtype",
            )
        if tensor.dim() != len(spec.shape):
            raise InvalidArgumentError(
                f"expected {len(spec.shape)} dimension(s) {list(spec.shape)}, "
                f"got {list(tensor.shape)}",
                f"{path}.shape",
            )
        for i, (want, got) in enumerate(zip(spec.shape, tensor.shape, strict=True)):
            if want >= 0 and want != got:
                raise InvalidArgumentError(f"expected {want}, got {got}", f"{path}.shape[{i}]")
        if signature.batchable:
            if tensor.shape[0] == 0:
                raise InvalidArgumentError("batch size must be >= 1", f"{path}.shape[0]")
            limit = signature.max_batch
            if limit is not None and tensor.shape[0] > limit:
                raise InvalidArgumentError(
                    f"batch size {tensor.shape[0]} is over v{version}'s limit of {limit}",
                    f"{path}.shape[0]",
                )
            if batch is None:
                batch = (path, tensor.shape[0])
            elif tensor.shape[0] != batch[1]:
                raise InvalidArgumentError(
                    f"batch size {tensor.shape[0]} differs from {batch[0]}'s {batch[1]}",
                    f"{path}.shape[0]",
                )
    return [t for _, t in ordered]
