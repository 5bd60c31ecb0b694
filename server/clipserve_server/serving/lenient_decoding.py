"""Decoding request messages without letting one malformed message end a stream.

protobuf refuses a whole message whose string field is not valid UTF-8, and gRPC would then
fail the entire call. Instead such a message becomes a ``MalformedRequest`` carrying whatever
identifiers could be recovered from the raw wire format, so that the servicer can answer that
one item with INVALID_ARGUMENT and carry on. A chunk (ScoreChunks, EmbedChunks) that does not
parse is split into its items, and only the malformed ones become ``MalformedRequest``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from clipserve.v1 import scorer_pb2
from google.protobuf.message import DecodeError

# Field numbers of the identifiers that are echoed back (protos/clipserve/v1/scorer.proto):
# request_id is 1 in both requests; query_id and image_id exist in ScoreRequest only.
_REQUEST_ID, _QUERY_ID, _IMAGE_ID = 1, 5, 6
_CHUNK_ITEMS = 1  # `items` in the *RequestChunk messages


@dataclass(frozen=True)
class MalformedRequest:
    request_id: str
    query_id: str
    image_id: str
    reason: str
    model: str = ""  # what the request named cannot be trusted: the default model answers


def parse_score_request(data: bytes) -> scorer_pb2.ScoreRequest | MalformedRequest:
    return _parse(scorer_pb2.ScoreRequest, data)


def parse_embed_request(data: bytes) -> scorer_pb2.EmbedRequest | MalformedRequest:
    request = _parse(scorer_pb2.EmbedRequest, data)
    if isinstance(request, MalformedRequest):  # EmbedRequest has no query_id / image_id
        return MalformedRequest(request.request_id, "", "", request.reason)
    return request


def parse_score_chunk(data: bytes) -> list[scorer_pb2.ScoreRequest | MalformedRequest]:
    return _parse_chunk(scorer_pb2.ScoreRequestChunk, parse_score_request, data)


def parse_embed_chunk(data: bytes) -> list[scorer_pb2.EmbedRequest | MalformedRequest]:
    return _parse_chunk(scorer_pb2.EmbedRequestChunk, parse_embed_request, data)


def _parse_chunk(chunk: Any, parse_item: Callable[[bytes], Any], data: bytes) -> list[Any]:
    try:
        return list(chunk.FromString(data).items)
    except DecodeError:
        pass
    items = [parse_item(value) for number, value in _length_delimited_values(data) if number == _CHUNK_ITEMS]
    if not items:  # not even one item to answer: a malformed message of its own
        items = [parse_item(data)]
    return items


def _parse(message: Any, data: bytes) -> Any:
    try:
        return message.FromString(data)
    except DecodeError as exc:
        fields = _length_delimited_fields(data)

        def text(number: int) -> str:
            return fields.get(number, b"").decode("utf-8", errors="replace")

        reason = "a text field is not valid UTF-8" if fields else f"the message cannot be parsed ({exc})"
        return MalformedRequest(text(_REQUEST_ID), text(_QUERY_ID), text(_IMAGE_ID), reason)


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _length_delimited_fields(data: bytes) -> dict[int, bytes]:
    """The last value of each length-delimited field; {} if the bytes are not protobuf."""
    return dict(_length_delimited_values(data))


def _length_delimited_values(data: bytes) -> list[tuple[int, bytes]]:
    """(field number, value) of every length-delimited field in order; [] if the bytes are not
    protobuf."""
    fields: list[tuple[int, bytes]] = []
    pos = 0
    try:
        while pos < len(data):
            key, pos = _varint(data, pos)
            number, wire_type = key >> 3, key & 7
            if wire_type == 0:
                _, pos = _varint(data, pos)
            elif wire_type == 1:
                pos += 8
            elif wire_type == 5:
                pos += 4
            elif wire_type == 2:
                length, pos = _varint(data, pos)
                fields.append((number, data[pos : pos + length]))
                pos += length
            else:
                return []
    except ValueError:
        return []
    return fields
