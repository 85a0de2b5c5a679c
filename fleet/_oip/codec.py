"""Tensors of the Open Inference Protocol to and from NumPy arrays. No I/O here.

Three encodings: JSON ``data`` (REST), raw little-endian bytes (the REST binary tensor
extension and gRPC's ``raw_*_contents``; BYTES elements each prefixed by a 4-byte
little-endian length) and gRPC's typed ``contents``. Every tensor is checked against
the model's declared metadata, and errors name the tensor, the model and what was
expected.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from fleet.oip import DATATYPES

_LEN = struct.Struct("<I")


class OIPError(Exception):
    """A request the protocol refuses: the HTTP status and the gRPC status name."""

    def __init__(self, message: str, status: int = 400, code: str = "INVALID_ARGUMENT"):
        super().__init__(message)
        self.status = status
        self.code = code


def dtype(datatype: str) -> np.dtype[Any]:
    return np.dtype(DATATYPES[datatype]).newbyteorder("<") if datatype != "BYTES" \
        else np.dtype(object)


def check(spec: dict[str, Any], datatype: Any, shape: Any, what: str, model: str) -> list[int]:
    """The tensor's shape, if its datatype and shape fit the declared spec."""
    name = spec["name"]
    if datatype != spec["datatype"]:
        raise OIPError(f"{what} {name!r} of model {model!r} has datatype {datatype!r}; the "
                       f"model declares {spec['datatype']}")
    if not isinstance(shape, list | tuple) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise OIPError(f"{what} {name!r} of model {model!r}: shape must be a list of "
                       f"non-negative sizes, got {shape!r}")
    want = spec["shape"]
    if len(shape) != len(want) or any(w != -1 and w != d for w, d in zip(want, shape,
                                                                          strict=True)):
        raise OIPError(f"{what} {name!r} of model {model!r} has shape {list(shape)}; the model "
                       f"declares {want} (-1: any size)")
    return [int(d) for d in shape]


def _count(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _flatten(data: Any, out: list[Any]) -> None:
    if isinstance(data, list):
        for item in data:
            _flatten(item, out)
    else:
        out.append(data)


def from_json(spec: dict[str, Any], tensor: dict[str, Any], model: str) -> np.ndarray:
    """An input tensor given as JSON ``data`` (flat or nested, row-major)."""
    shape = check(spec, tensor.get("datatype"), tensor.get("shape"), "input", model)
    data = tensor.get("data")
    if data is None:
        raise OIPError(f"input {spec['name']!r} of model {model!r} has no 'data' (nor a "
                       "binary_data_size parameter)")
    flat: list[Any] = []
    _flatten(data, flat)
    if len(flat) != _count(shape):
        raise OIPError(f"input {spec['name']!r} of model {model!r} holds {len(flat)} "
                       f"values; shape {shape} needs {_count(shape)}")
    datatype = spec["datatype"]
    try:
        if datatype == "BYTES":
            arr = np.empty(len(flat), dtype=object)
            arr[:] = [v.encode() if isinstance(v, str) else bytes(v) for v in flat]
        elif datatype == "BOOL":
            if not all(isinstance(v, bool) for v in flat):
                raise TypeError("BOOL values must be true or false")
            arr = np.asarray(flat, dtype=np.bool_)
        else:
            if any(isinstance(v, bool | str) or v is None for v in flat):
                raise TypeError(f"{datatype} values must be numbers")
            arr = np.asarray(flat, dtype=dtype(datatype))
    except (TypeError, ValueError, OverflowError) as exc:
        raise OIPError(f"input {spec['name']!r} of model {model!r}: {exc}") from None
    return arr.reshape(shape)


def from_raw(spec: dict[str, Any], datatype: Any, shape: Any, raw: bytes | memoryview,
             what: str, model: str) -> np.ndarray:
    """A tensor sent as raw little-endian bytes."""
    shape = check(spec, datatype, shape, what, model)
    n = _count(shape)
    if spec["datatype"] == "BYTES":
        items = unpack_bytes(raw, f"{what} {spec['name']!r} of model {model!r}")
        if len(items) != n:
            raise OIPError(f"{what} {spec['name']!r} of model {model!r} holds {len(items)} "
                           f"elements; shape {shape} needs {n}")
        arr = np.empty(n, dtype=object)
        arr[:] = items
        return arr.reshape(shape)
    dt = dtype(spec["datatype"])
    if len(raw) != n * dt.itemsize:
        raise OIPError(f"{what} {spec['name']!r} of model {model!r} has {len(raw)} bytes; "
                       f"shape {shape} of {spec['datatype']} needs {n * dt.itemsize}")
    return np.frombuffer(raw, dtype=dt).reshape(shape)


def unpack_bytes(raw: bytes | memoryview, where: str) -> list[bytes]:
    items: list[bytes] = []
    view = memoryview(raw)
    at = 0
    while at < len(view):
        if at + 4 > len(view):
            raise OIPError(f"{where}: BYTES data ends inside an element's 4-byte length")
        (size,) = _LEN.unpack_from(view, at)
        at += 4
        if at + size > len(view):
            raise OIPError(f"{where}: a BYTES element of {size} bytes runs past the data")
        items.append(bytes(view[at:at + size]))
        at += size
    return items


def to_raw(arr: np.ndarray, datatype: str) -> bytes:
    """An array as raw little-endian bytes (BYTES length-prefixed)."""
    if datatype == "BYTES":
        return b"".join(_LEN.pack(len(b)) + b for b in (_as_bytes(v) for v in arr.ravel()))
    return np.ascontiguousarray(arr, dtype=dtype(datatype)).tobytes()


def to_json(arr: np.ndarray, datatype: str) -> list[Any]:
    """An array as JSON ``data``, flat and row-major (BYTES as UTF-8 text)."""
    if datatype == "BYTES":
        return [_as_bytes(v).decode("utf-8", "replace") for v in arr.ravel()]
    return arr.ravel().tolist()  # type: ignore[no-any-return]


def _as_bytes(v: Any) -> bytes:
    if isinstance(v, bytes):
        return v
    if isinstance(v, str):
        return v.encode()
    return str(v).encode()


def output(spec: dict[str, Any], value: Any, model: str) -> np.ndarray:
    """A model's output as an array of its declared datatype and shape."""
    name, datatype = spec["name"], spec["datatype"]
    try:
        arr = np.asarray(value) if datatype != "BYTES" else np.asarray(value, dtype=object)
    except Exception as exc:
        raise OIPError(f"output {name!r} of model {model!r} is not an array: {exc}", 500,
                       "INTERNAL") from None
    if datatype != "BYTES" and arr.dtype != dtype(datatype):
        want = dtype(datatype)
        if not np.can_cast(arr.dtype, want, casting="same_kind"):
            raise OIPError(f"output {name!r} of model {model!r} is {arr.dtype}, which does "
                           f"not convert to the declared {datatype}", 500, "INTERNAL")
        arr = arr.astype(want)
    try:
        check(spec, datatype, list(arr.shape), "output", model)
    except OIPError as exc:
        raise OIPError(str(exc), 500, "INTERNAL") from None
    return arr
