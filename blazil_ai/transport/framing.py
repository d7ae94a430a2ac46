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
import os
import struct
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from blazil_ai.errors import BlazilError

MAGIC = b"BLZM"
VERSION = 1
HEADER = struct.Struct("<4sBBHIQ")
HEADER_SIZE = HEADER.size
JOIN_BELOW = 64 * 1024  # frames up to this size are encoded into one buffer (one copy beats an iovec list)


@dataclass(frozen=True, slots=True)
class WireLimits:
    """Every limit a receiver applies to what a peer sends: the one place they are defined.

    The decoders (this module and the native ``_wire``) and the TCP channels read them from ``LIMITS``;
    a frame or a peer that breaks one is refused (``FrameError``, or the connection is closed), never
    allowed to make the receiver allocate for it, raise anything else, or stop serving others.
    """

    max_message_size: int = 64 * 1024 * 1024  # whole frame, header included (a channel may set its own)
    max_hello_size: int = 4096  # a connection's first frame, read before the peer has said who it is
    max_arrays: int = 0xFFFF  # arrays per frame (the header's u16 field)
    max_dims: int = 32  # dimensions per array (numpy's own cap is 64)
    max_meta_depth: int = 64  # nesting the native MessagePack reader takes; deeper goes to the msgpack package
    read_chunk: int = 4096  # a connection's first read buffer: idle connections cost this much each
    read_chunk_max: int = 1024 * 1024  # the read buffer doubles while reads fill it, up to this
    # A frame larger than read_chunk_max gets a buffer of its own that grows from what has arrived, at most
    # doubling per step (and by at least body_step): memory follows the bytes received, never a header's promise.
    body_step: int = 4096
    ready_high: int = 1024  # decoded messages waiting for the application before reading pauses
    reply_queue: int = 16 * 1024 * 1024  # replies queued for a peer that does not read them, before it is dropped


LIMITS = WireLimits()
DEFAULT_MAX_MESSAGE_SIZE = LIMITS.max_message_size
_ALLOWED_KINDS = frozenset("biufcV")
_PLAIN_KINDS = frozenset("biufc")


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
    if type(a) is np.ndarray and a.dtype.kind in _PLAIN_KINDS and a.flags.c_contiguous:
        return a  # the common case, checked first because every message pays for it
    a = np.asarray(a)
    if a.dtype.fields is not None or (a.dtype.kind == "V"):
        a = a.view(np.dtype((np.void, a.dtype.itemsize)))
    if a.dtype.kind not in _ALLOWED_KINDS or a.dtype.hasobject:
        raise FrameError(f"dtype {a.dtype} cannot travel as raw bytes (numeric or fixed-size records only)")
    # np.ascontiguousarray would turn a 0-d array into 1-d.
    return a if a.flags.c_contiguous else a.copy(order="C")


_local = threading.local()


def _packer() -> msgpack.Packer:
    packer = getattr(_local, "packer", None)
    if packer is None:
        packer = _local.packer = msgpack.Packer(use_bin_type=True)
    return packer


def _py_encode(meta: Mapping[str, Any] | None, arrays: Sequence[np.ndarray] = (),
               max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> list[bytes | memoryview]:
    """Encode a message into buffers ready for ``sendmsg`` (the reference for the native ``encode``).

    A frame of up to ``JOIN_BELOW`` bytes comes back as one ``bytes`` object; a larger one as the header
    and metadata followed by each array's buffer, a view of the caller's memory, not a copy.
    """
    if arrays:
        wire = [_wire_array(a) for a in arrays]
        if len(wire) > LIMITS.max_arrays:
            raise FrameError(f"{len(wire)} arrays in one message; at most {LIMITS.max_arrays}")
        descr: list[tuple[str, tuple[int, ...]]] = [(a.dtype.str, a.shape) for a in wire]
    else:
        wire, descr = [], []
    try:
        meta_bytes = _packer().pack([meta if type(meta) is dict else dict(meta or {}), descr])
    except (TypeError, ValueError, OverflowError) as e:
        _local.packer = None  # a failed pack can leave the packer's buffer dirty
        raise FrameError(f"metadata cannot be encoded as MessagePack: {e}") from e
    buffers: list[bytes | memoryview] = [memoryview(a).cast("B") for a in wire if a.nbytes]  # type: ignore[arg-type]
    body_len = len(meta_bytes) + sum(len(b) for b in buffers)
    if HEADER_SIZE + body_len > max_size:
        raise FrameError(f"message of {HEADER_SIZE + body_len} bytes exceeds the maximum of {max_size}")
    head = HEADER.pack(MAGIC, VERSION, 0, len(wire), len(meta_bytes), body_len) + meta_bytes
    if HEADER_SIZE + body_len <= JOIN_BELOW:
        return [b"".join([head, *buffers])]
    return [head, *buffers]


_BODY_LEN = struct.Struct("<Q")


def frame_size(parts: Sequence[bytes | memoryview]) -> int:
    """Total bytes of a frame returned by :func:`encode` (read from its header)."""
    return HEADER_SIZE + _BODY_LEN.unpack_from(parts[0], 12)[0]


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


def _py_decode_body(n_arrays: int, meta_len: int, body: bytes | bytearray | memoryview) -> Message:
    """Decode a frame body whose header has been checked; arrays are views into ``body``.

    The reference for the native ``decode_body``, which hands every case it does not take to this one.
    """
    view = memoryview(body)
    try:
        meta, descr = msgpack.unpackb(view[:meta_len], raw=False, strict_map_key=False)
    except ValueError as e:
        if "unpack" in str(e):  # valid MessagePack, but not a pair
            raise FrameError("metadata must be [map, [array descriptors]]") from e
        raise FrameError(f"metadata is not valid MessagePack: {e}") from e
    except TypeError as e:
        raise FrameError("metadata must be [map, [array descriptors]]") from e
    except Exception as e:  # msgpack raises several unrelated types for bad input
        raise FrameError(f"metadata is not valid MessagePack: {e}") from e
    if type(meta) is not dict or type(descr) is not list:
        raise FrameError("metadata must be [map, [array descriptors]]")
    if len(descr) != n_arrays:
        raise FrameError(f"header says {n_arrays} arrays, metadata describes {len(descr)}")
    arrays: list[np.ndarray] = []
    offset = meta_len
    end = len(view)
    for d in descr:
        try:
            dtype_str, shape = d
            dtype = _DTYPES.get(dtype_str) or _wire_dtype(dtype_str)
            if type(shape) is not list or any(type(n) is not int for n in shape):
                raise ValueError(f"shape {shape!r} is not a list of integers")
            if len(shape) > LIMITS.max_dims:
                raise ValueError(f"{len(shape)} dimensions; at most {LIMITS.max_dims}")
            if shape and min(shape) < 0:
                raise ValueError(f"negative dimension in {shape!r}")
            count = math.prod(shape)
        except FrameError:
            raise
        except Exception as e:
            raise FrameError(f"array {len(arrays)}: bad descriptor {_short(d)}: {e}") from e
        nbytes = count * dtype.itemsize
        if offset + nbytes > end:
            raise FrameError(f"array {len(arrays)}: {dtype_str} x {_short(shape)} needs {nbytes} bytes, "
                             f"only {end - offset} remain in the frame")
        try:
            a = np.frombuffer(view, dtype, count, offset)
            arrays.append(a if len(shape) == 1 else a.reshape(shape))
        except Exception as e:  # e.g. shape [0, 2**40, 2**40]: no bytes, but more elements than numpy can index
            raise FrameError(f"array {len(arrays)}: shape {_short(shape)} cannot be built: {e}") from e
        offset += nbytes
    if offset != end:
        raise FrameError(f"array byte counts ({offset - meta_len}) do not match the body "
                         f"({end - meta_len} bytes after metadata)")
    return Message(meta, arrays)


def _short(value: Any, limit: int = 80) -> str:
    """A peer's value for an error message, cut short (a hostile frame may hold megabytes of it)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


_DTYPES: dict[str, np.dtype] = {}


def _wire_dtype(dtype_str: str) -> np.dtype:
    """Parse and check a dtype string from the wire (cached: a stream repeats a handful of them)."""
    if type(dtype_str) is not str:
        raise FrameError(f"dtype {_short(dtype_str)} is not a string")
    try:
        dtype = np.dtype(dtype_str)
    except Exception as e:
        raise FrameError(f"dtype {_short(dtype_str)} is not a numpy dtype: {e}") from e
    if (dtype.kind not in _ALLOWED_KINDS or dtype.hasobject or dtype.fields is not None
            or dtype.subdtype is not None or dtype.itemsize == 0):
        raise FrameError(f"dtype {_short(dtype_str)} is not allowed on the wire")
    if len(_DTYPES) < 256:
        _DTYPES[dtype_str] = dtype
    return dtype


def _py_decode(frame: bytes | bytearray | memoryview, max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> Message:
    """Decode one whole frame (header included); the reference for the native ``decode``."""
    n_arrays, meta_len, body_len = decode_header(frame, max_size)
    if len(frame) - HEADER_SIZE != body_len:
        raise FrameError(f"frame holds {len(frame) - HEADER_SIZE} body bytes, header says {body_len}")
    return decode_body(n_arrays, meta_len, memoryview(frame)[HEADER_SIZE:])


def _native() -> Any:
    """The compiled fast path (``_wire``, built by scripts/setup.sh), or None to use this module's code.

    ``BLAZIL_PURE_PYTHON_WIRE=1`` turns it off (the tests run both).
    """
    if os.environ.get("BLAZIL_PURE_PYTHON_WIRE", "") not in ("", "0"):
        return None
    try:
        from blazil_ai.transport import _wire  # type: ignore[attr-defined]
    except ImportError:
        return None
    _wire.init(Message, _DTYPES, _py_encode, _py_decode_body, _py_decode, VERSION, JOIN_BELOW, LIMITS.max_dims,
               LIMITS.max_meta_depth)
    return _wire


native = _native()
encode: Callable[[Mapping[str, Any] | None, Sequence[np.ndarray], int], list[bytes | memoryview]]
decode_body: Callable[[int, int, bytes | bytearray | memoryview], Message]
decode: Callable[..., Message]
if native is not None:
    encode, decode_body, decode = native.encode, native.decode_body, native.decode
else:
    encode, decode_body, decode = _py_encode, _py_decode_body, _py_decode
