"""The wire format every channel carries: a fixed header, MessagePack metadata, raw array bytes.

A frame is::

    header   20 bytes  "<4sBBHIQ": magic b"BLZM", version, flags, array count, metadata length,
                        body length (metadata + array bytes)
    metadata msgpack   [user metadata (a map), [[dtype string, [dims...]], ...]]
    arrays             each array's bytes, C order, one after another

Arrays travel as raw bytes with their dtype and shape in the metadata: nothing is pickled, and a
receiver checks that every byte count equals dtype x shape before the application sees anything.
Structured dtypes (e.g. the ledger's 128-byte records) travel as opaque ``V<n>`` items that the
receiver views with its own dtype.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from blazil_ai.errors import BlazilError

MAGIC = b"BLZM"
VERSION = 1
HEADER = struct.Struct("<4sBBHIQ")
HEADER_SIZE = HEADER.size
DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024 * 1024
_ALLOWED_KINDS = frozenset("biufcV")


class FrameError(BlazilError):
    """A frame that breaks the wire format; the message says which rule it broke."""


@dataclass(slots=True)
class Message:
    """One message: metadata (any MessagePack map) and zero or more numpy arrays.

    ``peer`` is filled in by the receiving subscription with where the message came from.
    """

    meta: dict[str, Any] = field(default_factory=dict)
    arrays: list[np.ndarray] = field(default_factory=list)
    peer: str = ""


def _wire_array(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.fields is not None or (a.dtype.kind == "V"):
        a = a.view(np.dtype((np.void, a.dtype.itemsize)))
    if a.dtype.kind not in _ALLOWED_KINDS or a.dtype.hasobject:
        raise FrameError(f"dtype {a.dtype} cannot travel as raw bytes (numeric or fixed-size records only)")
    # np.ascontiguousarray would turn a 0-d array into 1-d.
    return a if a.flags.c_contiguous else a.copy(order="C")


def encode(meta: Mapping[str, Any] | None, arrays: Sequence[np.ndarray] = (),
           max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> list[bytes | memoryview]:
    """Encode a message into buffers (header, metadata, one per array) ready for ``sendmsg``.

    Array buffers are views of the caller's memory, not copies, when the arrays are C-contiguous.
    """
    wire = [_wire_array(a) for a in arrays]
    if len(wire) > 0xFFFF:
        raise FrameError(f"{len(wire)} arrays in one message; at most 65535")
    descr = [[a.dtype.str, list(a.shape)] for a in wire]
    try:
        meta_bytes = msgpack.packb([dict(meta or {}), descr], use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise FrameError(f"metadata cannot be encoded as MessagePack: {e}") from e
    body_len = len(meta_bytes) + sum(a.nbytes for a in wire)
    if HEADER_SIZE + body_len > max_size:
        raise FrameError(f"message of {HEADER_SIZE + body_len} bytes exceeds the maximum of {max_size}")
    parts: list[bytes | memoryview] = [HEADER.pack(MAGIC, VERSION, 0, len(wire), len(meta_bytes), body_len),
                                       meta_bytes]
    parts.extend(memoryview(a).cast("B") for a in wire if a.nbytes)  # type: ignore[arg-type]
    return parts


def encode_bytes(meta: Mapping[str, Any] | None, arrays: Sequence[np.ndarray] = (),
                 max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> bytes:
    """Encode a message into one contiguous ``bytes`` object."""
    return b"".join(encode(meta, arrays, max_size))


def decode_header(buf: bytes | bytearray | memoryview,
                  max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> tuple[int, int, int]:
    """Check a 20-byte header and return ``(array_count, metadata_length, body_length)``."""
    if len(buf) < HEADER_SIZE:
        raise FrameError(f"truncated header: {len(buf)} of {HEADER_SIZE} bytes")
    magic, version, _flags, n_arrays, meta_len, body_len = HEADER.unpack_from(buf)
    if magic != MAGIC:
        raise FrameError(f"bad magic {bytes(magic)!r} (expected {MAGIC!r})")
    if version != VERSION:
        raise FrameError(f"unsupported frame version {version} (this build speaks {VERSION})")
    if HEADER_SIZE + body_len > max_size:
        raise FrameError(f"frame length {HEADER_SIZE + body_len} exceeds the maximum of {max_size}")
    if meta_len > body_len:
        raise FrameError(f"metadata length {meta_len} exceeds body length {body_len}")
    return n_arrays, meta_len, body_len


def decode_body(n_arrays: int, meta_len: int, body: bytes | bytearray | memoryview) -> Message:
    """Decode a frame body whose header has been checked; arrays are views into ``body``."""
    view = memoryview(body)
    try:
        unpacked = msgpack.unpackb(view[:meta_len], raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several unrelated types for bad input
        raise FrameError(f"metadata is not valid MessagePack: {e}") from e
    if (not isinstance(unpacked, list) or len(unpacked) != 2 or not isinstance(unpacked[0], dict)
            or not isinstance(unpacked[1], list)):
        raise FrameError("metadata must be [map, [array descriptors]]")
    meta, descr = unpacked
    if len(descr) != n_arrays:
        raise FrameError(f"header says {n_arrays} arrays, metadata describes {len(descr)}")
    arrays: list[np.ndarray] = []
    offset = meta_len
    for i, d in enumerate(descr):
        try:
            dtype_str, shape = d
            dtype = np.dtype(dtype_str)
            shape = tuple(int(s) for s in shape)
        except Exception as e:
            raise FrameError(f"array {i}: bad descriptor {d!r}: {e}") from e
        if dtype.kind not in _ALLOWED_KINDS or dtype.hasobject or dtype.fields is not None:
            raise FrameError(f"array {i}: dtype {dtype_str!r} is not allowed on the wire")
        if any(s < 0 for s in shape):
            raise FrameError(f"array {i}: negative dimension in shape {shape}")
        nbytes = math.prod(shape) * dtype.itemsize
        if offset + nbytes > len(view):
            raise FrameError(f"array {i}: {dtype_str} x {shape} needs {nbytes} bytes, "
                             f"only {len(view) - offset} remain in the frame")
        arrays.append(np.frombuffer(view, dtype=dtype, count=math.prod(shape), offset=offset).reshape(shape))
        offset += nbytes
    if offset != len(view):
        raise FrameError(f"array byte counts ({offset - meta_len}) do not match the body "
                         f"({len(view) - meta_len} bytes after metadata)")
    return Message(meta=meta, arrays=arrays)


def decode(frame: bytes | bytearray | memoryview, max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> Message:
    """Decode one whole frame (header included)."""
    n_arrays, meta_len, body_len = decode_header(frame, max_size)
    if len(frame) - HEADER_SIZE != body_len:
        raise FrameError(f"frame holds {len(frame) - HEADER_SIZE} body bytes, header says {body_len}")
    return decode_body(n_arrays, meta_len, memoryview(frame)[HEADER_SIZE:])
