"""The wire against hostile peers: the decoders refuse every bad frame with ``FrameError`` (never anything
else), and the ledger server, the fraud server and a pipeline stage keep answering a legitimate client
while peers send random bytes, truncated frames, hostile headers, deep metadata, floods of short-lived and
idle connections and slow senders; afterwards each server's descriptors and memory are back to baseline.

The default run fuzzes a bounded sample; the long sweeps are marked ``slow``
(``BLAZIL_FUZZ_FRAMES`` sets how many frames they send per server).
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from wire_peers import (
    MAX,
    _frame,
    fd_count,
    hello,
    hostile_frame,
    raw,
    read_frame,
    rss_mb,
    served,
    settle,
    train_small_fraud_model,
)

import blazil_ai.ledger as L
from blazil_ai.fraud.server import FraudClient
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
    print(json.dumps({"decoders": [name for name, _ in _decoders()], **counts}))
    return counts


def test_decoders_refuse_hostile_frames_only_with_frame_error() -> None:
    counts = _fuzz_decoders(3000, seed=15)
    assert counts["refused"] > 2000 and counts["decoded"] > 100, counts


@pytest.mark.slow
def test_decoders_refuse_hostile_frames_only_with_frame_error_long() -> None:
    n = int(os.environ.get("BLAZIL_FUZZ_FRAMES", "100000"))
    counts = _fuzz_decoders(n, seed=1515)
    assert counts["frames"] == n


# -- servers under attack ----------------------------------------------------------------------------------


@dataclass
class Target:
    """A server process to attack: where it listens, its stream, and a legitimate client's request."""

    name: str
    pid: int
    uri: str
    stream: int
    answers: Callable[[], bool]  # one legitimate request, answered within 1 s
    alive: Callable[[], bool]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return train_small_fraud_model(tmp_path_factory.mktemp("fraud-model"))


@contextmanager
def _target(name: str, tmp_path: Path, repo_root: Path, model_path: Path | None = None, tiny: Path | None = None):
    if name == "stage":
        from blazil_ai.pipeline.launcher import LocalPipeline
        from blazil_ai.pipeline.sampling import SamplingParams

        assert tiny is not None
        with LocalPipeline(tiny, transport="tcp", threads=1, timeout=20, start_timeout=120) as pipe:
            proc = pipe.procs[0].proc
            assert proc is not None and pipe.client is not None
            client = pipe.client
            uri, stream = pipe.addrs[0]
            # One request round the ring first: every stage-to-stage connection is open before the baseline.
            client.generate([1, 2, 3], SamplingParams(max_new_tokens=2, eos_token_ids=[-1]))
            yield Target(name, proc.pid, uri, stream, lambda: client.ping(1.0)[0] is not None,
                         lambda: proc.poll() is None)
        return
    if name == "ledger":
        args = ["ledger", "serve", "--data", str(tmp_path / "ledger"), "--create", "--listen", "tcp://127.0.0.1:0",
                "--metrics-port", "-1"]
    else:
        args = ["serve", "--data", str(tmp_path / "fraud"), "--model", str(model_path), "--listen",
                "tcp://127.0.0.1:0", "--metrics-port", "0"]
    with served(args, repo_root) as (proc, info):
        uri = info["listen"]
        if name == "ledger":
            client: Any = L.connect(uri, timeout=5)
            ask = lambda: client.submit("lookup_accounts", [1]).result(timeout=1).shape == (0,)  # noqa: E731
        else:
            client = FraudClient(uri, timeout=5)
            ask = lambda: "counts" in client._send("stats", {}).result(timeout=1)["stats"]  # noqa: E731
        try:
            yield Target(name, proc.pid, uri, 1, ask, lambda: proc.poll() is None)
        finally:
            client.close()


def _send(uri: str, data: bytes, rng: random.Random) -> None:
    try:
        with raw(uri, timeout=2) as s:
            if rng.random() < 0.2:  # in pieces
                cuts = sorted(rng.sample(range(len(data) + 1), min(3, len(data) + 1)))
                for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True):
                    s.sendall(data[a:b])
            else:
                s.sendall(data)
    except OSError:
        pass  # the server may close a connection before all of a bad frame has gone


def _slow_sender(t: Target, out: dict[str, Any]) -> None:
    """Drip one valid request a few bytes at a time (over about a second); the RPC servers answer it."""
    frame = hello(t.stream) + framing.encode_bytes({"op": "stats" if t.name == "fraud" else "lookup_accounts",
                                                    "req": 99}, [np.zeros((1, 2), np.uint64)])
    with raw(t.uri) as s:
        for i in range(0, len(frame), 2):
            s.sendall(frame[i:i + 2])
            out["bytes"] = i + 2
            time.sleep(0.01)
        if t.name != "stage":
            out["answered"] = read_frame(s).meta.get("req") == 99


def attack(t: Target, frames: int, idle: int, short: int, seed: int) -> dict[str, Any]:
    """Send ``frames`` hostile frames, then hold ``idle`` idle connections and open ``short`` short-lived
    ones; check the legitimate client is answered throughout and resources come back to baseline."""
    rng = random.Random(seed)
    for _ in range(3):
        assert t.answers()
    base_fd, base_rss = fd_count(t.pid), rss_mb(t.pid)
    checks = 0
    dripped: dict[str, Any] = {}
    slow = threading.Thread(target=_slow_sender, args=(t, dripped), daemon=True)
    slow.start()
    for i in range(frames):
        greet = hello(t.stream) if rng.random() < 0.6 else b""
        _send(t.uri, greet + b"".join(hostile_frame(rng) for _ in range(rng.randrange(1, 4))), rng)
        if i % 50 == 49:
            assert t.alive(), f"{t.name} exited after {i + 1} frames"
            assert t.answers(), f"{t.name} did not answer within 1 s after {i + 1} frames"
            checks += 1
    held = []
    for i in range(idle):
        s = raw(t.uri)
        if i % 3 == 1:
            s.sendall(hello(t.stream))
        elif i % 3 == 2:  # a slow sender: hello, then a frame that promises 1 MiB and sends 100 bytes
            s.sendall(hello(t.stream) + framing.HEADER.pack(framing.MAGIC, framing.VERSION, 0, 0, 8, 1 << 20)
                      + bytes(100))
        held.append(s)
    assert t.answers(), f"{t.name} did not answer with {idle} idle connections open"
    peak_fd = fd_count(t.pid)
    for s in held:
        s.close()
    for _ in range(short):
        with raw(t.uri):
            pass
    assert t.answers(), f"{t.name} did not answer after {short} short-lived connections"
    slow.join(10)
    assert dripped.get("answered", t.name == "stage"), f"{t.name}: the slow sender's request was not answered"
    fd_after = settle(lambda: fd_count(t.pid), base_fd)
    rss_after = rss_mb(t.pid)
    assert t.alive()
    assert fd_after <= base_fd, f"{t.name}: {fd_after} descriptors open, {base_fd} before"
    assert rss_after < base_rss + 32, f"{t.name}: RSS {rss_after:.0f} MB, {base_rss:.0f} MB before"
    figures = {"server": t.name, "frames": frames, "idle": idle, "short_lived": short, "answered_checks": checks + 2,
               "fd_before": base_fd, "fd_peak": peak_fd, "fd_after": fd_after, "rss_before_mb": round(base_rss, 1),
               "rss_after_mb": round(rss_after, 1), "slow_sender_bytes": dripped.get("bytes")}
    print(json.dumps(figures))
    return figures


@pytest.mark.parametrize("name", ["ledger", "fraud", "stage"])
def test_servers_keep_answering_under_hostile_peers(name, tmp_path, repo_root, request):
    model_path = request.getfixturevalue("model") if name == "fraud" else None
    tiny = request.getfixturevalue("tiny") if name == "stage" else None
    with _target(name, tmp_path, repo_root, model_path, tiny) as t:
        attack(t, frames=1000, idle=100, short=100, seed=15)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ledger", "fraud", "stage"])
def test_servers_keep_answering_under_hostile_peers_long(name, tmp_path, repo_root, request):
    model_path = request.getfixturevalue("model") if name == "fraud" else None
    tiny = request.getfixturevalue("tiny") if name == "stage" else None
    frames = int(os.environ.get("BLAZIL_FUZZ_SERVER_FRAMES", "5000"))
    with _target(name, tmp_path, repo_root, model_path, tiny) as t:
        attack(t, frames=frames, idle=1000, short=1000, seed=1515)
