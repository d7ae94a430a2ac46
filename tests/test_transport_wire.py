"""The native wire fast path (``_wire``) against the reference in ``framing.py``: same bytes, same messages,
same errors. The native module is built by scripts/setup.sh; without it these tests say so and skip."""

from __future__ import annotations

import collections
import os
import subprocess
import sys

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blazil_ai import transport
from blazil_ai.transport import framing, tcp

native = framing.native
pytestmark = pytest.mark.skipif(native is None, reason="the native wire module is not built (scripts/setup.sh "
                                                        "builds it) or BLAZIL_PURE_PYTHON_WIRE is set")

scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False)
           | st.text(max_size=300) | st.binary(max_size=300))
metadata = st.recursive(scalars, lambda inner: st.lists(inner, max_size=20)
                        | st.dictionaries(st.text(max_size=20) | st.integers(-1000, 1000), inner, max_size=20),
                        max_leaves=60)
dtypes = st.sampled_from(["u1", "i1", "<i2", "<u4", "<i8", "<f4", "<f8", "<c8", "?", ">f4", "<u8"])
shapes = st.lists(st.integers(0, 5), max_size=4)


def _arrays(draw_dtypes: list[str], draw_shapes: list[list[int]]) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 100, size=s).astype(d) for d, s in zip(draw_dtypes, draw_shapes, strict=False)]


def _joined(parts: list) -> bytes:
    return b"".join(bytes(p) for p in parts)


@settings(max_examples=300, deadline=None)
@given(meta=st.dictionaries(st.text(max_size=10), metadata, max_size=8),
       kinds=st.lists(dtypes, max_size=4), dims=st.lists(shapes, min_size=4, max_size=4))
def test_native_encode_writes_the_reference_bytes_and_decodes_back(meta, kinds, dims) -> None:
    arrays = _arrays(kinds, dims)
    ours = native.encode(meta, arrays, framing.DEFAULT_MAX_MESSAGE_SIZE)
    reference = framing._py_encode(meta, arrays, framing.DEFAULT_MAX_MESSAGE_SIZE)
    assert _joined(ours) == _joined(reference)
    frame = _joined(ours)
    n_arrays, meta_len, _ = framing.decode_header(frame)
    fast = native.decode_body(n_arrays, meta_len, bytearray(frame[framing.HEADER_SIZE:]))
    slow = framing._py_decode_body(n_arrays, meta_len, bytearray(frame[framing.HEADER_SIZE:]))
    assert fast.meta == slow.meta == msgpack.unpackb(msgpack.packb(meta), strict_map_key=False)
    assert len(fast.arrays) == len(slow.arrays) == len(arrays)
    for f, s, a in zip(fast.arrays, slow.arrays, arrays, strict=True):
        assert f.dtype == s.dtype and f.shape == s.shape == a.shape
        assert f.flags.writeable and f.flags.aligned == s.flags.aligned
        np.testing.assert_array_equal(f, a)


def test_cases_the_native_path_hands_to_the_reference() -> None:
    odd = [np.arange(10)[::2], np.zeros(3, dtype=[("a", "<i4"), ("b", "<f8")]), np.arange(6, dtype=">i4")]
    for meta in ({"t": (1, 2)}, {"big": 2**64 - 1}, {"np": 1}, None, {}):
        assert _joined(native.encode(meta, odd, 1 << 26)) == _joined(framing._py_encode(meta, odd, 1 << 26))
    with pytest.raises(framing.FrameError, match="cannot be encoded"):
        native.encode({"x": np.int64(3)}, [], 1 << 20)
    with pytest.raises(framing.FrameError, match="cannot be encoded"):
        native.encode({"x": 2**64}, [], 1 << 20)
    with pytest.raises(framing.FrameError, match="exceeds the maximum"):
        native.encode({}, [np.zeros(100, np.uint8)], 64)
    with pytest.raises(framing.FrameError, match="cannot travel"):
        native.encode({}, [np.array(["a"])], 1 << 20)
    # After a refused message, the next one still encodes cleanly.
    assert framing.decode(_joined(native.encode({"ok": 1}, [], 1 << 20))).meta == {"ok": 1}
    # Large frames come back as header+metadata, then the caller's own array memory.
    big = np.arange(100_000, dtype=np.float32)
    parts = native.encode({}, [big], 1 << 26)
    assert len(parts) == 2 and np.shares_memory(np.frombuffer(parts[1], np.float32), big)


@pytest.mark.parametrize("mutate, fault", [
    (lambda b: b.__setitem__(framing.HEADER_SIZE, 0xC1), "not valid MessagePack"),
    (lambda b: b.__setitem__(slice(-1, None), b"") or b.extend(b"\x00\x00"), "do not match"),
    (lambda b: b.__setitem__(slice(-10, None), b""), "only"),
])
def test_bad_bodies_get_the_reference_error(mutate, fault) -> None:
    frame = bytearray(framing.encode_bytes({"x": 1}, [np.arange(4, dtype=np.int32)]))
    mutate(frame)
    n_arrays, meta_len, _ = framing.HEADER.unpack_from(frame)[3:6]
    with pytest.raises(framing.FrameError, match=fault):
        native.decode_body(n_arrays, meta_len, bytearray(frame[framing.HEADER_SIZE:]))


def test_parse_frames_stops_where_python_must_look() -> None:
    good = [framing.encode_bytes({"i": i}, [np.full(3, i, np.int16)]) for i in range(5)]
    framing.decode(good[0])  # the dtype cache knows int16 now
    bad = bytearray(good[0])
    bad[0:4] = b"NOPE"
    partial = good[1][:-3]
    buf = bytearray(b"".join(good[:3]) + bytes(bad) + b"".join(good[3:]) + partial)
    ready: collections.deque = collections.deque()
    stop = native.parse_frames(buf, 0, len(buf), 1 << 20, "peer:1", ready)
    assert stop == sum(map(len, good[:3]))
    assert [m.meta["i"] for m in ready] == [0, 1, 2] and all(m.peer == "peer:1" for m in ready)
    after_bad = stop + len(bad)
    stop = native.parse_frames(buf, after_bad, len(buf), 1 << 20, "peer:1", ready)
    assert stop == len(buf) - len(partial)  # the incomplete frame stays for the next read
    assert [m.meta["i"] for m in ready] == [0, 1, 2, 3, 4]
    assert ready[3].arrays[0].tolist() == [3, 3, 3]


def test_native_whole_frame_decode_matches_the_reference() -> None:
    frame = framing.encode_bytes({"k": [1, "two", None]}, [np.arange(6, dtype="<f4").reshape(2, 3)])
    ours, ref = native.decode(bytearray(frame), 1 << 20), framing._py_decode(bytearray(frame), 1 << 20)
    assert ours.meta == ref.meta and ours.arrays[0].tolist() == ref.arrays[0].tolist()
    with pytest.raises(framing.FrameError, match="body bytes"):
        native.decode(frame + b"x", 1 << 20)
    with pytest.raises(framing.FrameError, match="exceeds the maximum"):
        native.decode(frame, 32)


def test_tcp_receive_with_spin_and_the_pure_python_path(monkeypatch) -> None:
    monkeypatch.setattr(tcp, "_SPIN_NS", 200_000)  # receive() polls 200 us before it sleeps
    with transport.subscription("tcp://127.0.0.1:0", 3) as sub, transport.publication(sub.uri, 3) as pub:
        for i in range(50):
            pub.send({"i": i}, [np.full(4, i, np.int64)])
            m = sub.receive(timeout=5)
            assert m is not None and m.meta == {"i": i} and m.arrays[0].tolist() == [i] * 4
        assert sub.receive(timeout=0.05) is None  # nothing more: the wait ends on time
    # The same round trip with the native module turned off, in a fresh interpreter.
    code = ("import numpy as np\nfrom blazil_ai import transport\nfrom blazil_ai.transport import framing\n"
            "assert framing.native is None\n"
            "with transport.subscription('tcp://127.0.0.1:0', 3) as s, transport.publication(s.uri, 3) as p:\n"
            "    p.send({'x': 1}, [np.arange(3)])\n"
            "    m = s.receive(timeout=5)\n"
            "    assert m.meta == {'x': 1} and m.arrays[0].tolist() == [0, 1, 2]\n"
            "print('pure ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "BLAZIL_PURE_PYTHON_WIRE": "1"})
    assert out.returncode == 0 and "pure ok" in out.stdout, out.stderr


@pytest.mark.parametrize("count, ndim", [(15, 1), (16, 1), (17, 2), (1, 15), (1, 16), (2, 17)])
def test_array_counts_and_ranks_at_the_messagepack_size_edges(count, ndim) -> None:
    # 16 elements is where a MessagePack array needs its 16-bit header instead of the one-byte form.
    arrays = [np.full((1,) * ndim, i, dtype=np.int32) for i in range(count)]
    frame = _joined(native.encode({"n": count}, arrays, 1 << 26))
    assert frame == _joined(framing._py_encode({"n": count}, arrays, 1 << 26))
    m = native.decode(frame, 1 << 26)
    assert m.meta == {"n": count} and [a.shape for a in m.arrays] == [(1,) * ndim] * count
    assert [int(a.ravel()[0]) for a in m.arrays] == list(range(count))
