"""The wire against hostile peers: the decoders refuse every bad frame with ``FrameError`` (never anything
else), and the ledger server, the fraud server and a pipeline stage keep answering a legitimate client
while peers send random bytes, truncated frames, hostile headers, deep metadata, floods of short-lived and
idle connections and slow senders; afterwards each server's descriptors and memory are back to baseline.

The default run fuzzes a bounded sample; the long sweeps are marked ``slow``
(``BLAZIL_FUZZ_FRAMES`` sets how many frames they send per server).
"""

from __future__ import annotations

import os
import random

import pytest
from wire_peers import MAX, _frame, hostile_frame

from blazil_ai.transport import framing


def _pure_decode(frame: bytes) -> framing.Message:
    """The reference decoder alone (framing.decode_body may be the native one)."""
    n_arrays, meta_len, body_len = framing.decode_header(frame, MAX)
    if len(frame) - framing.HEADER_SIZE != body_len:
        raise framing.FrameError("length")
    return framing._py_decode_body(n_arrays, meta_len, bytearray(frame[framing.HEADER_SIZE:]))


def _outcome(fn, frame: bytes) -> str:
    try:
        msg = fn(frame)
    except framing.FrameError:
        return "refused"
    except Exception as e:  # noqa: BLE001 - exactly what this test is about
        return f"{type(e).__name__}: {e}"
    return f"ok {sorted(map(str, msg.meta))[:3]} {[(a.dtype.str, a.shape) for a in msg.arrays]}"


def _decoders() -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = [("reference", _pure_decode)]
    if framing.native is not None:
        out.append(("native", lambda f: framing.native.decode(bytearray(f), MAX)))
    return out


@pytest.mark.parametrize("shape", [[0, 2**40, 2**40], [0, 2**63 - 1, 2**63 - 1], [2**64 - 1, 0], [1] * 65,
                                   [0] * 40, [0, -1]])
def test_a_zero_size_array_with_an_impossible_shape_is_a_frame_error(shape) -> None:
    # Before: ValueError / OverflowError escaped both decoders and stopped every server that met the frame.
    frame = _frame({}, [["<f4", shape]])
    for name, fn in _decoders():
        for _ in range(2):  # the second time the dtype is cached and the native path builds the array itself
            assert _outcome(fn, frame) == "refused", name


def _fuzz_decoders(n: int, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    counts = {"frames": 0, "refused": 0, "decoded": 0}
    for _ in range(n):
        frame = hostile_frame(rng)
        got = {name: _outcome(fn, frame) for name, fn in _decoders()}
        for name, outcome in got.items():
            assert outcome == "refused" or outcome.startswith("ok"), f"{name} on {frame[:64]!r}: {outcome}"
        assert len(set(got.values())) == 1, f"decoders disagree on {frame[:64]!r}: {got}"
        counts["frames"] += 1
        counts["refused" if next(iter(got.values())) == "refused" else "decoded"] += 1
    return counts


def test_decoders_refuse_hostile_frames_only_with_frame_error() -> None:
    counts = _fuzz_decoders(3000, seed=15)
    assert counts["refused"] > 2000 and counts["decoded"] > 100, counts


@pytest.mark.slow
def test_decoders_refuse_hostile_frames_only_with_frame_error_long() -> None:
    n = int(os.environ.get("BLAZIL_FUZZ_FRAMES", "50000"))
    counts = _fuzz_decoders(n, seed=1515)
    assert counts["frames"] == n
