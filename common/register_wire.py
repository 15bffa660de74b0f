"""`RegisterModelRequest` chunk messages on the wire, both ways, without extra copies.

A 1 MiB chunk goes through the protobuf runtime with several copies of its bytes:
the sender copies it into a message and again into the serialised bytes; the
receiver into the decoded message and again when `.data` is read. For the
canonical encoding of a chunk (each field at most once, as every protobuf library
writes it):

- `encode_chunk` (senders: the trainer, benchmarks) writes it with one copy of the
  data, byte for byte what `SerializeToString` writes; `serialize_request` is the
  request serialiser for a `RegisterModel` call whose stream mixes such bytes with
  messages (the metadata).
- `parse_register_request` (the registry) hands out a view into the received
  message. Anything else (the metadata message, repeated or unknown fields, bad
  wire types) goes through the generated parser, so what is accepted and refused
  is exactly what protobuf accepts and refuses.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.stubs import registry_pb2

__all__ = [
    "REGISTER_MODEL_METHOD",
    "RawChunk",
    "encode_chunk",
    "parse_register_request",
    "serialize_request",
]

REGISTER_MODEL_METHOD = "/graftmesh.v1.RegistryService/RegisterModel"

# Wire types (https://protobuf.dev/programming-guides/encoding/).
_VARINT, _LEN = 0, 2
# RegisterModelRequest.chunk = 2 (FileChunk); FileChunk.file_name = 1, .chunk = 2
# (ArtifactChunk); ArtifactChunk.data = 1, .offset = 2.
_CHUNK = 2
_FILE_NAME, _FILE_CHUNK = 1, 2
_DATA, _OFFSET = 1, 2
_UINT64 = (1 << 64) - 1  # int64 values travel as their 64-bit two's complement


@dataclass(frozen=True, slots=True)
class RawChunk:
    """A `RegisterModelRequest` whose `chunk` is set; `data` is a view into the message."""

    file_name: str
    offset: int
    data: memoryview


class _NotCanonical(Exception):
    """The fast path does not handle this encoding; the generated parser will."""


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while pos < end and shift < 64:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise _NotCanonical


def _fields(buf: memoryview, pos: int, end: int) -> dict[int, tuple[int, int, int]]:
    """Field number -> (wire type, value or start, end) of a message in buf[pos:end]."""
    fields: dict[int, tuple[int, int, int]] = {}
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire_type = key >> 3, key & 7
        if number in fields:
            raise _NotCanonical
        if wire_type == _VARINT:
            value, pos = _varint(buf, pos, end)
            fields[number] = (wire_type, value, pos)
        elif wire_type == _LEN:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise _NotCanonical
            fields[number] = (wire_type, pos, pos + length)
            pos += length
        else:
            raise _NotCanonical
    return fields


def _len_field(fields: dict[int, tuple[int, int, int]], number: int) -> tuple[int, int] | None:
    field = fields.get(number)
    if field is None:
        return None
    wire_type, start, end = field
    if wire_type != _LEN:
        raise _NotCanonical
    return start, end


def _raw_chunk(raw: bytes) -> RawChunk:
    buf = memoryview(raw)
    top = _fields(buf, 0, len(buf))
    span = _len_field(top, _CHUNK)
    if span is None or len(top) != 1:
        raise _NotCanonical
    file_chunk = _fields(buf, *span)
    name_span = _len_field(file_chunk, _FILE_NAME)
    chunk_span = _len_field(file_chunk, _FILE_CHUNK)
    if len(file_chunk) != (name_span is not None) + (chunk_span is not None):
        raise _NotCanonical
    data, offset = buf[0:0], 0
    if chunk_span is not None:
        artifact_chunk = _fields(buf, *chunk_span)
        data_span = _len_field(artifact_chunk, _DATA)
        if data_span is not None:
            data = buf[data_span[0] : data_span[1]]
        offset_field = artifact_chunk.get(_OFFSET)
        if offset_field is not None:
            if offset_field[0] != _VARINT:
                raise _NotCanonical
            offset = offset_field[1] & _UINT64
            if offset >= 1 << 63:  # int64: two's complement
                offset -= 1 << 64
        if len(artifact_chunk) != (data_span is not None) + (offset_field is not None):
            raise _NotCanonical
    try:
        name = str(buf[name_span[0] : name_span[1]], "utf-8") if name_span else ""
    except UnicodeDecodeError:
        raise _NotCanonical from None
    return RawChunk(name, offset, data)


def parse_register_request(raw: bytes) -> registry_pb2.RegisterModelRequest | RawChunk:
    """One received `RegisterModelRequest`: a `RawChunk` for a chunk, else the message."""
    try:
        return _raw_chunk(raw)
    except _NotCanonical:
        return registry_pb2.RegisterModelRequest.FromString(raw)


# -- sending ------------------------------------------------------------------------------


def _varint_bytes(value: int) -> bytes:
    value &= _UINT64  # a negative int64 takes 10 bytes
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _tag(number: int, wire_type: int) -> bytes:
    return _varint_bytes(number << 3 | wire_type)


def encode_chunk(file_name: str, offset: int, data: bytes | memoryview) -> bytes:
    """`RegisterModelRequest(chunk=FileChunk(file_name, ArtifactChunk(data, offset)))`
    serialised, as `SerializeToString` would write it, copying `data` once."""
    size = len(data)
    tail = _tag(_OFFSET, _VARINT) + _varint_bytes(offset) if offset else b""
    data_head = _tag(_DATA, _LEN) + _varint_bytes(size) if size else b""
    artifact_len = len(data_head) + size + len(tail)
    name = file_name.encode()
    name_field = _tag(_FILE_NAME, _LEN) + _varint_bytes(len(name)) + name if name else b""
    chunk_head = _tag(_FILE_CHUNK, _LEN) + _varint_bytes(artifact_len)
    file_chunk_len = len(name_field) + len(chunk_head) + artifact_len
    head = b"".join(
        (
            _tag(_CHUNK, _LEN),
            _varint_bytes(file_chunk_len),
            name_field,
            chunk_head,
            data_head,
        )
    )
    return b"".join((head, data, tail))


def serialize_request(request: registry_pb2.RegisterModelRequest | bytes) -> bytes:
    """A `RegisterModel` request serialiser that passes `encode_chunk`'s bytes through."""
    return request if isinstance(request, bytes) else request.SerializeToString()
