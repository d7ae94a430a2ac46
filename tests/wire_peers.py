"""Hostile peers for the wire tests: frames that break the format, raw connections, server processes to attack,
and the descriptor and memory figures of a process."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import msgpack
import numpy as np

from blazil_ai.transport import framing

MAX = framing.DEFAULT_MAX_MESSAGE_SIZE
_DTYPES = ["<f4", "<i8", "|u1", "|V128", "<u8", "|b1", "<c16", ">f8", "|V0", "<U4", "O", "<M8[s]", "(2,)f4",
           "f4,f4", "xx", "V99999999999999999", "", "<f2", "|V7"]
_HUGE = [0, 1, -1, 2**31, 2**32, 2**40, 2**62, 2**63 - 1, -(2**63), 2**64 - 1]


def _header(n_arrays: int, meta_len: int, body_len: int, magic: bytes = framing.MAGIC, version: int = 1) -> bytes:
    return framing.HEADER.pack(magic, version, 0, n_arrays & 0xFFFF, meta_len & 0xFFFFFFFF,
                               body_len & 0xFFFFFFFFFFFFFFFF)


def _frame(meta: object, descr: object, body: bytes = b"", n_arrays: int | None = None) -> bytes:
    m = msgpack.packb([meta, descr], use_bin_type=True)
    n = len(descr) if n_arrays is None and isinstance(descr, list) else (n_arrays or 0)
    return _header(n, len(m), len(m) + len(body)) + m + body


def _nested(depth: int) -> object:
    v: object = 1
    for i in range(depth):
        v = [v] if i % 2 else {"k": v}
    return v


def _shape(rng: random.Random) -> object:
    pick = rng.randrange(8)
    if pick == 0:
        return [rng.choice(_HUGE) for _ in range(rng.randrange(1, 5))]
    if pick == 1:
        return [0] + [rng.choice(_HUGE[3:8]) for _ in range(rng.randrange(1, 4))]  # no bytes, huge count
    if pick == 2:
        return [1] * rng.choice([33, 64, 65, 200])
    if pick == 3:
        return rng.choice([None, "3", 1.5, {"a": 1}, [1.5], [True], [[1]], ["x", 2], b"\x01"])
    if pick == 4:
        return [rng.randrange(-3, 4) for _ in range(rng.randrange(0, 4))]
    return [rng.randrange(0, 6) for _ in range(rng.randrange(0, 3))]


def hostile_frame(rng: random.Random, max_size: int = MAX) -> bytes:
    """One frame from a hostile or broken peer (random bytes, bad headers, bad descriptors, deep metadata)."""
    kind = rng.randrange(10)
    if kind == 0:
        return rng.randbytes(rng.randrange(0, 200))
    if kind == 1:  # a header that promises much more than will ever come
        return _header(rng.randrange(3), rng.choice([0, 8, 2**32 - 1]), rng.choice([2**20, max_size - 20, 2**64 - 1]))
    if kind == 2:
        return _header(0, 5, 5, magic=rng.choice([b"BLZN", b"\0\0\0\0"]), version=rng.choice([0, 1, 2, 255])) + \
            rng.randbytes(5)
    if kind == 3:  # hostile array descriptors
        descr = [[rng.choice(_DTYPES), _shape(rng)] for _ in range(rng.randrange(1, 4))]
        return _frame({"op": "create_transfers"}, descr, rng.randbytes(rng.choice([0, 16, 128])),
                      n_arrays=len(descr) + rng.choice([0, 0, 0, 1, -1]))
    if kind == 4:  # deep or odd metadata
        meta = rng.choice([_nested(rng.choice([10, 63, 64, 65, 200, 3000])), [], "x", None, 5,
                           {1: 2}, {"op": _nested(100)}])
        try:
            return _frame(meta, [])
        except (ValueError, msgpack.exceptions.PackException):  # too deep even for the packer
            return _frame({}, [])
    if kind == 5:  # metadata that is not MessagePack, or not [map, list]
        m = rng.choice([b"\xc1", b"\x92", b"\x91\x80", b"\x93\x80\x90\x90", b"\xdd\xff\xff\xff\xff", b"\xc7\x01\x05a",
                        rng.randbytes(12)])
        return _header(0, len(m), len(m)) + m
    good = _frame({"op": "lookup_accounts", "req": 1}, [["<u8", [2, 2]]], np.arange(4, dtype="<u8").tobytes())
    if kind == 6:  # bit flips
        b = bytearray(good)
        for _ in range(rng.randrange(1, 4)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        return bytes(b)
    if kind == 7:  # truncated
        return good[:rng.randrange(len(good))]
    if kind == 8:  # header lengths that disagree with the body
        m = msgpack.packb([{}, []])
        return _header(rng.randrange(3), rng.choice([len(m), len(m) + 9, 2**32 - 1]),
                       rng.choice([len(m), len(m) - 1, len(m) + 40])) + m + rng.randbytes(rng.randrange(40))
    return good



def hello(stream_id: int = 1) -> bytes:
    """The frame a publication opens its connection with."""
    return framing.encode_bytes({"$hello": {"stream_id": stream_id, "version": framing.VERSION}})


def request(op: str, req: int = 1, arrays: list[np.ndarray] | None = None, **meta: object) -> bytes:
    return framing.encode_bytes({"op": op, "req": req, **meta}, arrays or [])


def raw(uri: str, timeout: float = 5.0) -> socket.socket:
    """A plain TCP connection to ``tcp://host:port`` that speaks no protocol unless told to."""
    host, port = uri.split("://", 1)[1].split("?")[0].rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def read_frame(s: socket.socket, timeout: float = 5.0) -> framing.Message:
    """One whole frame off a raw connection (a reply), decoded."""
    s.settimeout(timeout)
    buf = b""
    while len(buf) < framing.HEADER_SIZE or len(buf) < framing.HEADER_SIZE + framing.decode_header(buf)[2]:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {len(buf)} bytes")
        buf += chunk
    return framing.decode(buf[:framing.HEADER_SIZE + framing.decode_header(buf)[2]])


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def settle(fn, target: float, timeout: float = 10.0) -> float:
    """Poll ``fn()`` until it is <= ``target`` or ``timeout`` passes; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v <= target or time.monotonic() > deadline:
            return v
        time.sleep(0.1)


@contextmanager
def served(args: list[str], repo_root: Path) -> Iterator[tuple[subprocess.Popen[str], dict]]:
    """``python -m blazil_ai *args --json`` (a server) running; yields the process and its ready line.

    Its log goes to a file (``proc.log``): a pipe nobody reads would stall a server that logs every
    hostile peer."""
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, "-m", "blazil_ai", *args, "--json"], stdout=subprocess.PIPE,
                            stderr=log, text=True, env=env)
    proc.log = log  # type: ignore[attr-defined]
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            proc.wait(10)
            raise RuntimeError(f"server did not start: {stderr_tail(proc)}")
        yield proc, json.loads(line)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def stderr_tail(proc: subprocess.Popen[str], lines: int = 20) -> str:
    """The last lines a server process logged."""
    log = proc.log  # type: ignore[attr-defined]
    log.seek(0)
    return "\n".join(log.read().splitlines()[-lines:])


def train_small_fraud_model(out: Path) -> Path:
    """A small fraud model (seeded) for a ``blazil serve`` process."""
    from blazil_ai.datasets.samples import _write_features
    from blazil_ai.models.fraud import train_fraud_model

    return train_fraud_model(_write_features(out, seed=0, n=2000), out / "models", seed=0)
