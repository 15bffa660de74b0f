"""Wire tensors and binding inputs to a signature."""

from __future__ import annotations

import pytest
import torch

from common.errors import InvalidArgumentError
from common.stubs import common_pb2
from services.router import (
    Signature,
    TensorSpec,
    bind,
    decode_inputs,
    tensor_from_proto,
    tensor_to_proto,
)

SIG = Signature(
    inputs=(
        TensorSpec("x", torch.float32, (-1, 4)),
        TensorSpec("ids", torch.int64, (-1,)),
    ),
    outputs=(TensorSpec("y", torch.float32, (-1, 2)),),
)


@pytest.mark.parametrize(
    "tensor",
    [
        torch.randn(3, 4),
        torch.randn(2, 2).to(torch.float16),
        torch.randn(5).to(torch.bfloat16),
        torch.randn(2).double(),
        torch.arange(6).reshape(2, 3),
        torch.arange(3, dtype=torch.int32),
        torch.tensor([True, False]),
        torch.arange(4, dtype=torch.uint8),
        torch.tensor(3.5),
        torch.empty(0, 4),
    ],
)
def test_tensors_round_trip_through_the_wire(tensor: torch.Tensor) -> None:
    back = tensor_from_proto(tensor_to_proto(tensor), "t")
    assert back.dtype == tensor.dtype and back.shape == tensor.shape
    assert torch.equal(back, tensor)


def test_wire_bytes_are_row_major_little_endian() -> None:
    message = tensor_to_proto(torch.tensor([[1, 2], [3, 4]], dtype=torch.int32).T)
    assert message.data == b"".join(v.to_bytes(4, "little") for v in (1, 3, 2, 4))


def test_decoded_tensors_are_writable_copies() -> None:
    message = tensor_to_proto(torch.zeros(2))
    decoded = tensor_from_proto(message, "t")
    decoded += 1
    assert tensor_from_proto(message, "t").sum() == 0


@pytest.mark.parametrize(
    ("message", "field"),
    [
        (
            common_pb2.Tensor(data=b"\0" * 12, shape=[2, 2], dtype=common_pb2.DTYPE_FLOAT32),
            "t.data",
        ),
        (common_pb2.Tensor(data=b"", shape=[0], dtype=common_pb2.DTYPE_UNSPECIFIED), "t.dtype"),
        (common_pb2.Tensor(data=b"", shape=[-1], dtype=common_pb2.DTYPE_FLOAT32), "t.shape[0]"),
    ],
)
def test_malformed_tensors_name_the_field(message: common_pb2.Tensor, field: str) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        tensor_from_proto(message, "t")
    assert err.value.field == field


def wire(**tensors: torch.Tensor) -> dict[str, common_pb2.Tensor]:
    return {name: tensor_to_proto(t) for name, t in tensors.items()}


def test_bind_by_name_and_by_position_give_signature_order() -> None:
    x, ids = torch.randn(3, 4), torch.arange(3)
    by_name = bind(decode_inputs(wire(ids=ids, x=x), []), SIG, 1)
    by_position = bind(decode_inputs({}, [tensor_to_proto(x), tensor_to_proto(ids)]), SIG, 1)
    for bound in (by_name, by_position):
        assert torch.equal(bound[0].to_torch(), x) and torch.equal(bound[1].to_torch(), ids)


@pytest.mark.parametrize(
    ("inputs", "field"),
    [
        ({"x": torch.randn(3, 4)}, "inputs[ids]"),
        ({"x": torch.randn(3, 4), "ids": torch.arange(3), "z": torch.zeros(1)}, "inputs[z]"),
        ({"x": torch.randn(3, 4).double(), "ids": torch.arange(3)}, "inputs[x].dtype"),
        ({"x": torch.randn(3, 5), "ids": torch.arange(3)}, "inputs[x].shape[1]"),
        ({"x": torch.randn(3, 4, 1), "ids": torch.arange(3)}, "inputs[x].shape"),
        ({"x": torch.randn(3, 4), "ids": torch.arange(2)}, "inputs[ids].shape[0]"),
        ({"x": torch.randn(0, 4), "ids": torch.arange(0)}, "inputs[x].shape[0]"),
    ],
)
def test_bad_inputs_name_the_field(inputs: dict[str, torch.Tensor], field: str) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        bind(decode_inputs(wire(**inputs), []), SIG, 1)
    assert err.value.field == field


def test_wrong_number_of_args_and_both_forms_at_once_are_refused() -> None:
    with pytest.raises(InvalidArgumentError) as err:
        bind(decode_inputs({}, [tensor_to_proto(torch.randn(1, 4))]), SIG, 1)
    assert err.value.field == "args"
    with pytest.raises(InvalidArgumentError) as err:
        decode_inputs(wire(x=torch.randn(1, 4)), [tensor_to_proto(torch.randn(1, 4))])
    assert err.value.field == "inputs"


def test_a_batch_over_the_models_limit_is_refused() -> None:
    limited = Signature(SIG.inputs, SIG.outputs, max_batch=2)
    with pytest.raises(InvalidArgumentError) as err:
        bind(decode_inputs(wire(x=torch.randn(3, 4), ids=torch.arange(3)), []), limited, 1)
    assert err.value.field == "inputs[x].shape[0]"


def test_batchable_only_when_every_input_and_output_has_a_dynamic_batch_dim() -> None:
    assert SIG.batchable
    fixed = Signature((TensorSpec("x", torch.float32, (4, 4)),))
    assert not fixed.batchable
