"""Decoding request messages without letting one malformed message end a stream.

protobuf refuses a whole message whose string field is not valid UTF-8, and gRPC would then
fail the entire call. Instead such a message becomes a ``MalformedRequest`` carrying whatever
identifiers could be recovered from the raw wire format, so that the servicer can answer that
one item with INVALID_ARGUMENT and carry on. A chunk (ScoreChunks, EmbedChunks) that does not
parse is split into its items, and only the malformed ones become ``MalformedRequest``.

What a message costs is bounded before it is parsed: a chunk's items are counted on the wire
(an empty item is two bytes: 16 MB held 8 million of them, each a Python object once parsed)
and one over the limit is refused whole (``TooManyItems``); the fallback reader walks at most
``_FALLBACK_FIELDS`` fields of a message that does not parse.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from clipserve.v1 import scorer_pb2
from google.protobuf.message import DecodeError

from ..utils.errors import ErrorKind, ItemError

# Field numbers of the identifiers that are echoed back (protos/clipserve/v1/scorer.proto):
# request_id is 1 in both requests; query_id and image_id exist in ScoreRequest only.
_REQUEST_ID, _QUERY_ID, _IMAGE_ID = 1, 5, 6
_CHUNK_ITEMS = 1  # `items` in the *RequestChunk messages
# A request has a dozen fields: past this many, the fallback reader has seen what it can recover.
_FALLBACK_FIELDS = 64


class TooManyItems(ItemError):
    """A chunk over ``--max-items-per-message``: the call fails INVALID_ARGUMENT, unparsed."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            ErrorKind.INVALID_INPUT,
            (
                f"the message has more than {limit} items, "
                f"over the limit of one message (--max-items-per-message {limit}); send them in several"
            ),
        )


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


def parse_score_chunk(data: bytes, max_items: int) -> list[scorer_pb2.ScoreRequest | MalformedRequest]:
    return _parse_chunk(scorer_pb2.ScoreRequestChunk, parse_score_request, data, max_items)


def parse_embed_chunk(data: bytes, max_items: int) -> list[scorer_pb2.EmbedRequest | MalformedRequest]:
    return _parse_chunk(scorer_pb2.EmbedRequestChunk, parse_embed_request, data, max_items)


def _parse_chunk(chunk: Any, parse_item: Callable[[bytes], Any], data: bytes, max_items: int) -> list[Any]:
    # Every field takes at least two bytes: a short message cannot be over the limit.
    if len(data) > 2 * max_items and _too_many_fields(data, max_items):
        raise TooManyItems(max_items)
    try:
        return list(chunk.FromString(data).items)
    except DecodeError:
        pass
    items = [
        parse_item(value)
        for number, value in _length_delimited_values(data, max_items + _FALLBACK_FIELDS)
        if number == _CHUNK_ITEMS
    ]
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
    """The last value of each length-delimited field among the first _FALLBACK_FIELDS; {} if
    the bytes are not protobuf."""
    return dict(_length_delimited_values(data, _FALLBACK_FIELDS))


def _too_many_fields(data: bytes, max_items: int) -> bool:
    """Whether ``data`` has more than ``max_items`` + _FALLBACK_FIELDS fields, of any kind:
    walked only that far."""
    limit = max_items + _FALLBACK_FIELDS
    try:
        for walked, _ in enumerate(_fields(data), 1):
            if walked > limit:
                return True
    except ValueError:  # not protobuf from there on: the parsers say what is wrong with it
        pass
    return False


def _length_delimited_values(data: bytes, max_fields: int) -> list[tuple[int, bytes]]:
    """(field number, value) of the length-delimited fields among the first ``max_fields``, in
    order; [] if the bytes are not protobuf."""
    values: list[tuple[int, bytes]] = []
    try:
        for walked, (number, value) in enumerate(_fields(data), 1):
            if value is not None:
                values.append((number, value))
            if walked >= max_fields:
                break
    except ValueError:
        return []
    return values


def _fields(data: bytes) -> Iterator[tuple[int, bytes | None]]:
    """(field number, value of a length-delimited field, else None) for each field in turn;
    raises ValueError where the bytes stop being protobuf."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, pos = _varint(data, pos)
            yield number, None
        elif wire_type == 1:
            pos += 8
            yield number, None
        elif wire_type == 5:
            pos += 4
            yield number, None
        elif wire_type == 2:
            length, pos = _varint(data, pos)
            yield number, data[pos : pos + length]
            pos += length
        else:
            raise ValueError(f"wire type {wire_type}")
