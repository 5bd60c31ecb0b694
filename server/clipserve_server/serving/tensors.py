"""Open Inference Protocol tensors <-> numpy arrays, with checks that name the offending tensor.

A tensor arrives as a name, a datatype (``FP32``, ``BYTES``...), a shape and its elements,
either typed in ``contents`` or as bytes in the request's ``raw_input_contents`` (what
tritonclient sends): flattened, row-major, little-endian; a ``BYTES`` element is a 4-byte
little-endian length and then that many bytes. Answers go out the raw way too.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..utils.errors import ErrorKind, ItemError

# The protocol's datatypes: numpy's little-endian dtype and the typed field of InferTensorContents.
_DATATYPES: dict[str, tuple[str, str]] = {
    "BOOL": ("?", "bool_contents"),
    "UINT8": ("u1", "uint_contents"),
    "UINT16": ("<u2", "uint_contents"),
    "UINT32": ("<u4", "uint_contents"),
    "UINT64": ("<u8", "uint64_contents"),
    "INT8": ("i1", "int_contents"),
    "INT16": ("<i2", "int_contents"),
    "INT32": ("<i4", "int_contents"),
    "INT64": ("<i8", "int64_contents"),
    "FP16": ("<f2", ""),  # raw bytes only: protobuf has no 16-bit float
    "FP32": ("<f4", "fp32_contents"),
    "FP64": ("<f8", "fp64_contents"),
    "BYTES": ("O", "bytes_contents"),
}
_LENGTH = struct.Struct("<I")


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a model: what ModelMetadata lists and ModelInfer checks."""

    name: str
    datatype: str
    shape: tuple[int, ...]  # -1: any size


def invalid(message: str) -> ItemError:
    return ItemError(ErrorKind.INVALID_INPUT, message)


def _shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def read_inputs(request: Any, specs: Sequence[TensorSpec], model: str, *, max_items: int) -> dict[str, np.ndarray]:
    """The inputs of a ModelInferRequest by name, each checked against its spec (datatype,
    rank, fixed dimensions) and against its own shape. Which inputs must be there is the
    model's to say; an input the model does not take is refused. A batch ([-1] input) of more
    than ``max_items`` is refused from its shape, before any element is read."""
    known = {spec.name: spec for spec in specs}
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise invalid(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs: one per input, in order"
        )
    arrays: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(request.inputs):
        spec = known.get(tensor.name)
        if spec is None:
            raise invalid(f"model {model!r} has no input {tensor.name!r} (it takes {', '.join(known)})")
        if tensor.name in arrays:
            raise invalid(f"input {tensor.name!r} is given twice")
        if tensor.datatype != spec.datatype:
            raise invalid(f"input {tensor.name!r} must be {spec.datatype}, not {tensor.datatype or 'no datatype'}")
        shape = tuple(tensor.shape)
        if (
            len(shape) != len(spec.shape)
            or any(want not in (-1, got) for want, got in zip(spec.shape, shape))
            or min(shape, default=0) < 0
        ):
            raise invalid(
                f"input {tensor.name!r} has shape {_shape(shape)}; "
                f"model {model!r} takes {_shape(spec.shape)} (-1: any size)"
            )
        if spec.shape == (-1,) and shape[0] > max_items:
            raise invalid(
                f"input {tensor.name!r} has {shape[0]} elements, over the {max_items}-item limit "
                f"of one call (--max-items-per-message {max_items}); send them in several calls"
            )
        arrays[tensor.name] = _array(tensor, raw[index] if raw else None, shape)
    return arrays


def _array(tensor: Any, raw: bytes | None, shape: tuple[int, ...]) -> np.ndarray:
    name = tensor.name
    dtype, field = _DATATYPES[tensor.datatype]
    count = math.prod(shape)
    if raw is None and not field:
        raise invalid(f"input {name!r}: {tensor.datatype} travels in raw_input_contents only")
    if tensor.datatype == "BYTES":
        if raw is None and len(tensor.contents.bytes_contents) != count:  # counted before it is copied out
            raise invalid(
                f"input {name!r} has {len(tensor.contents.bytes_contents)} elements; "
                f"its shape {_shape(shape)} needs {count}"
            )
        values = _unpack_bytes(raw, name, count) if raw is not None else list(tensor.contents.bytes_contents)
        array = np.empty(len(values), dtype=object)
        array[:] = values
    elif raw is not None:
        width = np.dtype(dtype).itemsize
        if len(raw) != count * width:
            raise invalid(
                f"input {name!r}: {len(raw)} bytes of {tensor.datatype} for shape {_shape(shape)}, "
                f"which needs {count * width}"
            )
        array = np.frombuffer(raw, dtype=dtype)
    else:
        array = np.asarray(getattr(tensor.contents, field), dtype=dtype)
    if array.size != count:
        raise invalid(f"input {name!r} has {array.size} elements; its shape {_shape(shape)} needs {count}")
    try:
        return array.reshape(shape)
    except ValueError:  # no elements, but dimensions no array can have ([0, 2**62, 3])
        raise invalid(f"input {name!r}: no array can have the shape {_shape(shape)}") from None


def _unpack_bytes(raw: bytes, name: str, count: int) -> list[bytes]:
    """At most ``count`` + 1 elements (one more is enough to say the shape is wrong)."""
    values: list[bytes] = []
    offset = 0
    while offset < len(raw) and len(values) <= count:
        if offset + _LENGTH.size > len(raw):
            raise invalid(f"input {name!r}: BYTES element {len(values)} has a truncated length prefix")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += _LENGTH.size
        if offset + length > len(raw):
            raise invalid(
                f"input {name!r}: BYTES element {len(values)} claims {length} bytes; {len(raw) - offset} are left"
            )
        values.append(raw[offset : offset + length])
        offset += length
    return values


def raw_bytes(array: np.ndarray, datatype: str) -> bytes:
    """``array``'s elements as raw tensor contents of ``datatype``."""
    if datatype == "BYTES":
        return b"".join(_LENGTH.pack(len(value)) + value for value in array.reshape(-1))
    return np.ascontiguousarray(array, dtype=_DATATYPES[datatype][0]).tobytes()


def text_of(value: bytes, name: str) -> str:
    """A BYTES element read as UTF-8 text."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise invalid(f"input {name!r}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def raw_from_json(data: Any, datatype: str, name: str) -> bytes:
    """A tensor's elements as the REST protocol's JSON gives them (a flat or nested list;
    BYTES as strings) in raw tensor contents, so that both faces read inputs one way."""
    if datatype not in _DATATYPES:
        raise invalid(f"input {name!r}: unknown datatype {datatype!r} (one of {', '.join(_DATATYPES)})")
    try:
        if datatype == "BYTES":
            values = np.array(data, dtype=object).reshape(-1)
            array = np.empty(len(values), dtype=object)
            array[:] = [value.encode("utf-8") if isinstance(value, str) else bytes(value) for value in values]
            return raw_bytes(array, datatype)
        return raw_bytes(np.asarray(data, dtype=_DATATYPES[datatype][0]), datatype)
    except (TypeError, ValueError) as exc:
        raise invalid(f"input {name!r}: its data is not a list of {datatype}: {exc}") from None


def json_from_raw(raw: bytes, datatype: str) -> list[Any]:
    """Raw tensor contents as the REST protocol's JSON ``data`` (flat; BYTES as text)."""
    if datatype == "BYTES":
        # The server's own output: every element it holds (each takes at least its length prefix).
        elements = _unpack_bytes(raw, "output", len(raw) // _LENGTH.size)
        return [value.decode("utf-8", errors="replace") for value in elements]
    values = np.frombuffer(raw, dtype=_DATATYPES[datatype][0]).tolist()
    if datatype.startswith("FP"):
        # JSON has no NaN (a failed pair's score): null, which JSON parsers accept everywhere and
        # tritonclient's as_numpy reads back as NaN; json.dumps would write NaN, which they refuse.
        return [v if math.isfinite(v) else None for v in values]
    return values
