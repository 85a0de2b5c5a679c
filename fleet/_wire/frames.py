"""Frame encoding and parsing. No I/O here.

A frame is a 13-byte header, ``!IBQ`` (payload length, kind, call id), then the
payload. Payloads are pickled (protocol 5) except AUTH's, which are raw bytes of the
handshake (see :mod:`fleet._wire.auth`), so nothing is unpickled before the peer proved
it knows the instance's secret. Until then a parser takes frames of at most
``AUTH_MAX_FRAME`` bytes; after, up to ``MAX_FRAME``.
"""

from __future__ import annotations

import pickle
import struct
from collections.abc import Callable
from typing import Any

from fleet.exceptions import FrameTooLargeError

HEADER = struct.Struct("!IBQ")
HEADER_SIZE = HEADER.size
MAX_FRAME = 1 << 31
AUTH_MAX_FRAME = 64     # the largest handshake message

AUTH = 1      # client -> server, first frame: the secret
CALL = 2      # (method, args, kwargs, meta)
OK = 3        # final value of a call
ERR = 4       # error info of a call (see _wire.errors)
CHUNK = 5     # one streamed item of a call
CANCEL = 6    # caller gave up on the call
CTRL = 7      # control message (dict), both ways
DATA = 8      # caller -> replica: a message for a running call (websocket, body chunk)
CREDIT = 9    # a stream's consumer read this many (chunks, bytes): see fleet._wire.flow

KIND_NAMES = {AUTH: "AUTH", CALL: "CALL", OK: "OK", ERR: "ERR", CHUNK: "CHUNK",
              CANCEL: "CANCEL", CTRL: "CTRL", DATA: "DATA", CREDIT: "CREDIT"}
CREDIT_PAYLOAD = struct.Struct("!II")

__all__ = ["FrameTooLargeError", "FrameParser", "decode", "describe", "encode", "encode_raw"]

_pack_header = HEADER.pack
_unpack_header = HEADER.unpack_from
_dumps = pickle.dumps
_loads = pickle.loads


def encode(kind: int, call_id: int, obj: Any) -> bytes:
    """Pickle obj into one frame; raises TypeError naming the type that cannot be pickled,
    FrameTooLargeError when it does not fit in a frame."""
    try:
        payload = _dumps(obj, 5)
    except Exception as exc:
        raise TypeError(f"cannot serialize {describe(obj)}: {exc}. Values sent between "
                        "fleet processes must be picklable.") from exc
    size = len(payload)
    if size > MAX_FRAME:
        raise FrameTooLargeError(
            f"{describe(obj)} is {size} bytes pickled, over the {MAX_FRAME}-byte limit of "
            "one message between fleet processes; send it in parts (a generator with "
            "stream=True) or pass a reference (a path, a URL) instead")
    return _pack_header(size, kind, call_id) + payload


def encode_raw(kind: int, call_id: int, payload: bytes) -> bytes:
    """A frame whose payload is already bytes."""
    return _pack_header(len(payload), kind, call_id) + payload


def decode(payload: bytes | memoryview) -> Any:
    """Unpickle a frame's payload."""
    return _loads(payload)


def describe(obj: Any) -> str:
    """Name the first part of obj that pickle refuses, for error messages."""
    parts: list[Any] = []
    if isinstance(obj, tuple | list):
        parts = list(obj)
    elif isinstance(obj, dict):
        parts = list(obj.values())
    for part in parts:
        try:
            _dumps(part, 5)
        except Exception:
            return describe(part)
    return f"a value of type {type(obj).__module__}.{type(obj).__qualname__}"


class FrameParser:
    """Accumulates bytes and yields complete frames to a callback; a frame over
    ``limit`` bytes raises ValueError (the connection is then closed)."""

    __slots__ = ("_buf", "_on_frame", "limit")

    def __init__(self, on_frame: Callable[[int, int, bytes], None],
                 limit: int = AUTH_MAX_FRAME) -> None:
        self._buf = bytearray()
        self._on_frame = on_frame
        self.limit = limit

    def feed(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        pos = 0
        end = len(buf)
        on_frame = self._on_frame
        while end - pos >= HEADER_SIZE:
            size, kind, call_id = _unpack_header(buf, pos)
            if size > self.limit:
                raise ValueError(f"frame of {size} bytes exceeds the limit of {self.limit}")
            stop = pos + HEADER_SIZE + size
            if stop > end:
                break
            payload = bytes(buf[pos + HEADER_SIZE:stop])
            pos = stop
            on_frame(kind, call_id, payload)
        if pos:
            del buf[:pos]
