"""`RegisterModelRequest` chunks on the wire: `encode_chunk` writes what protobuf writes;
`parse_register_request` reads chunks as views into the message, the rest as protobuf does."""

from __future__ import annotations

import os

import pytest
from google.protobuf.message import DecodeError

from common.register_wire import (
    RawChunk,
    encode_chunk,
    parse_register_request,
    serialize_request,
)
from common.stubs import common_pb2, registry_pb2


def chunk_message(name: str, offset: int, data: bytes) -> registry_pb2.RegisterModelRequest:
    return registry_pb2.RegisterModelRequest(
        chunk=registry_pb2.FileChunk(
            file_name=name, chunk=common_pb2.ArtifactChunk(data=data, offset=offset)
        )
    )


@pytest.mark.parametrize("name", ["model.pt2", "", "modèle-é.bin"])
@pytest.mark.parametrize("offset", [0, 1, 300, 1 << 40, -1, -(1 << 63)])
@pytest.mark.parametrize("size", [0, 1, 127, 128, 1 << 20])
def test_a_chunk_reads_as_protobuf_reads_it(name: str, offset: int, size: int) -> None:
    data = os.urandom(size)
    raw = chunk_message(name, offset, data).SerializeToString()
    parsed = parse_register_request(raw)
    decoded = registry_pb2.RegisterModelRequest.FromString(raw)
    assert isinstance(parsed, RawChunk)
    assert (parsed.file_name, parsed.offset, bytes(parsed.data)) == (
        decoded.chunk.file_name,
        decoded.chunk.chunk.offset,
        decoded.chunk.chunk.data,
    )


def test_a_chunks_data_is_a_view_into_the_received_message() -> None:
    raw = chunk_message("model.pt2", 0, b"weights").SerializeToString()
    parsed = parse_register_request(raw)
    assert isinstance(parsed, RawChunk)
    assert parsed.data.obj is raw


def test_a_chunk_with_nothing_set_is_an_empty_chunk() -> None:
    raw = registry_pb2.RegisterModelRequest(chunk=registry_pb2.FileChunk()).SerializeToString()
    assert parse_register_request(raw) == RawChunk("", 0, memoryview(b""))


def test_the_metadata_message_is_parsed_by_protobuf() -> None:
    request = registry_pb2.RegisterModelRequest(
        metadata=registry_pb2.ModelVersionMetadata(
            name="spirals", files=[registry_pb2.ArtifactFile(name="model.pt2", size_bytes=3)]
        )
    )
    assert parse_register_request(request.SerializeToString()) == request


def unknown_field(number: int) -> bytes:
    return bytes([(number << 3) | 0, 1])  # a varint field protobuf keeps as unknown


@pytest.mark.parametrize(
    "raw",
    [
        # Two messages in one: protobuf merges them (the later data and name win).
        chunk_message("a", 0, b"first").SerializeToString()
        + chunk_message("b", 5, b"second").SerializeToString(),
        chunk_message("a", 0, b"x").SerializeToString() + unknown_field(9),
        # An unknown field inside ArtifactChunk.
        registry_pb2.RegisterModelRequest(
            chunk=registry_pb2.FileChunk(
                file_name="a",
                chunk=common_pb2.ArtifactChunk.FromString(
                    common_pb2.ArtifactChunk(data=b"x").SerializeToString() + unknown_field(7)
                ),
            )
        ).SerializeToString(),
        # Metadata then a chunk: the oneof keeps the last one.
        registry_pb2.RegisterModelRequest(
            metadata=registry_pb2.ModelVersionMetadata(name="m")
        ).SerializeToString()
        + chunk_message("a", 0, b"x").SerializeToString(),
    ],
    ids=["merged", "unknown-top-level", "unknown-nested", "metadata-then-chunk"],
)
def test_any_other_encoding_is_left_to_protobuf(raw: bytes) -> None:
    parsed = parse_register_request(raw)
    assert isinstance(parsed, registry_pb2.RegisterModelRequest)
    assert parsed == registry_pb2.RegisterModelRequest.FromString(raw)


@pytest.mark.parametrize(
    "raw",
    [
        chunk_message("model.pt2", 0, b"weights").SerializeToString()[:-3],  # cut short
        b"\x12\x05\x0a\x03\xff\xfe\xfd",  # a file name that is not UTF-8
        b"\x12\x80",  # a length that never ends
    ],
    ids=["truncated", "bad-utf8", "bad-varint"],
)
def test_a_malformed_message_is_refused_as_protobuf_refuses_it(raw: bytes) -> None:
    with pytest.raises(DecodeError):
        registry_pb2.RegisterModelRequest.FromString(raw)
    with pytest.raises(DecodeError):
        parse_register_request(raw)


@pytest.mark.parametrize("name", ["model.pt2", "", "modèle-é.bin", "n" * 200])
@pytest.mark.parametrize("offset", [0, 1, 127, 128, 300, 1 << 40, -1, -(1 << 63), (1 << 63) - 1])
@pytest.mark.parametrize("size", [0, 1, 127, 128, 16383, 16384, 1 << 20])
def test_an_encoded_chunk_is_what_protobuf_writes(name: str, offset: int, size: int) -> None:
    data = os.urandom(size)
    encoded = encode_chunk(name, offset, data)
    assert encoded == chunk_message(name, offset, data).SerializeToString()
    # A view of a larger buffer encodes the same, and reads back as a chunk.
    view = memoryview(b"<" + data + b">")[1 : 1 + size]
    assert encode_chunk(name, offset, view) == encoded
    parsed = parse_register_request(encoded)
    assert isinstance(parsed, RawChunk)
    assert (parsed.file_name, parsed.offset, bytes(parsed.data)) == (name, offset, data)


def test_the_serializer_passes_encoded_chunks_through_and_serialises_messages() -> None:
    encoded = encode_chunk("model.pt2", 5, b"abc")
    assert serialize_request(encoded) is encoded
    metadata = registry_pb2.RegisterModelRequest(
        metadata=registry_pb2.ModelVersionMetadata(name="m")
    )
    assert serialize_request(metadata) == metadata.SerializeToString()
