"""Transport benchmark: one-way throughput and ping-pong latency of each channel, with its anchor.

Anchor (run in the same process run, interleaved with the channels): a plain loopback TCP socket
carrying length-prefixed MessagePack frames written with ``sendall`` and parsed by hand.

Each case prints one JSON line with the channel's figure, the anchor's figure and their ratio
(throughput: channel / anchor, higher is better; latency: channel / anchor, lower is better).
Every figure is the median of ``--reps`` interleaved runs. Receivers run in a separate process.

    python benchmarks/transport.py                  # tcp (and aeron:ipc / aeron:udp when built)
    python benchmarks/transport.py --quick          # fewer messages, for a smoke run
    python benchmarks/transport.py --transports tcp
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import socket
import statistics
import struct
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import numpy as np

from blazil_ai import transport
from blazil_ai.transport import OfferStatus

SIZES = {"64B": 64, "16KiB": 16 * 1024, "3.5MiB": 3584 * 1024}
COUNTS = {"64B": 200_000, "16KiB": 40_000, "3.5MiB": 300}
LEN = struct.Struct("<I")


# -- anchor: plain socket + length-prefixed msgpack ---------------------------------------------------


def _anchor_recv_frames(conn: socket.socket, n: int, on_frame: Callable[[bytes], None]) -> None:
    """Read length-prefixed frames the straightforward way: recv, append, slice whole frames off."""
    buf = bytearray()
    got = 0
    while got < n:
        chunk = conn.recv(1 << 20)
        if not chunk:
            raise ConnectionError("anchor sender went away")
        buf += chunk
        start = 0
        while len(buf) - start >= 4:
            (length,) = LEN.unpack_from(buf, start)
            if len(buf) - start - 4 < length:
                break
            on_frame(bytes(buf[start + 4 : start + 4 + length]))
            start += 4 + length
            got += 1
        del buf[:start]


def _anchor_decode(frame: bytes) -> np.ndarray:
    meta, payload = msgpack.unpackb(frame)
    return np.frombuffer(payload, dtype=np.uint8)


def _anchor_sink(port_q: Any, done_q: Any, n: int) -> None:
    srv = socket.create_server(("127.0.0.1", 0))
    port_q.put(srv.getsockname()[1])
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _anchor_recv_frames(conn, n, _anchor_decode)
    done_q.put(time.perf_counter())  # CLOCK_MONOTONIC: comparable with the sender's clock
    conn.close()


def anchor_throughput(size: int, n: int) -> float:
    ctx = mp.get_context("fork")
    port_q, done_q = ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=_anchor_sink, args=(port_q, done_q, n))
    p.start()
    sock = socket.create_connection(("127.0.0.1", port_q.get(timeout=30)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    payload = np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8)
    t0 = time.perf_counter()
    for i in range(n):
        frame = msgpack.packb([{"i": i}, payload.tobytes()])
        sock.sendall(LEN.pack(len(frame)) + frame)
    elapsed = done_q.get(timeout=300) - t0
    sock.close()
    p.join()
    return n / elapsed


def _anchor_echo(port_q: Any, n: int) -> None:
    srv = socket.create_server(("127.0.0.1", 0))
    port_q.put(srv.getsockname()[1])
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def echo(frame: bytes) -> None:
        conn.sendall(LEN.pack(len(frame)) + frame)

    _anchor_recv_frames(conn, n, echo)
    conn.close()


def anchor_pingpong(n: int) -> list[float]:
    ctx = mp.get_context("fork")
    port_q = ctx.Queue()
    p = ctx.Process(target=_anchor_echo, args=(port_q, n))
    p.start()
    sock = socket.create_connection(("127.0.0.1", port_q.get(timeout=30)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    payload = bytes(64)
    rtts = []
    for i in range(n):
        t = time.perf_counter()
        frame = msgpack.packb([{"i": i}, payload])
        sock.sendall(LEN.pack(len(frame)) + frame)
        got: list[bytes] = []
        _anchor_recv_frames(sock, 1, got.append)
        _anchor_decode(got[0])
        rtts.append(time.perf_counter() - t)
    sock.close()
    p.join()
    return rtts


# -- channels ---------------------------------------------------------------------------------------------


def _channel_sink(uri: str, stream_id: int, uri_q: Any, done_q: Any, n: int) -> None:
    sub = transport.subscription(uri, stream_id)
    uri_q.put(sub.uri)
    got = 0

    def handler(m: transport.Message) -> None:
        nonlocal got
        got += 1

    while got < n:
        if sub.poll(handler, 1024) == 0:
            m = sub.receive(timeout=0.01)  # sleeps in select rather than spinning
            if m is not None:
                handler(m)
    done_q.put(time.perf_counter())  # CLOCK_MONOTONIC: comparable with the sender's clock
    sub.close()


def _offer_all(pub: transport.Publication, payload: np.ndarray, n: int, batch: int) -> None:
    if batch > 1:
        msgs = [transport.Message({}, [payload]) for _ in range(batch)]
        sent = 0
        while sent < n:
            k = pub.offer_batch(msgs[: min(batch, n - sent)], timeout=5.0)
            if k == 0 and not pub.is_connected:
                raise transport.TransportError(f"{pub.uri}: subscriber went away")
            sent += k
        return
    for _ in range(n):
        status = pub.offer({}, [payload], timeout=5.0)
        if status != OfferStatus.OK:
            raise transport.TransportError(f"{pub.uri}: offer failed: {status.name}", status)


def channel_throughput(uri: str, size: int, n: int, stream_id: int, batch: int = 1) -> float:
    ctx = mp.get_context("fork")
    uri_q, done_q = ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=_channel_sink, args=(uri, stream_id, uri_q, done_q, n))
    p.start()
    pub = transport.publication(uri_q.get(timeout=30), stream_id)
    deadline = time.monotonic() + 10
    while not pub.is_connected and time.monotonic() < deadline:
        time.sleep(0.01)
    payload = np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8)
    t0 = time.perf_counter()
    _offer_all(pub, payload, n, batch)
    elapsed = done_q.get(timeout=300) - t0
    pub.close()
    p.join()
    return n / elapsed


def _channel_echo(uri: str, stream_id: int, uri_q: Any, reply_q: Any, n: int) -> None:
    sub = transport.subscription(uri, stream_id)
    uri_q.put(sub.uri)
    pub = transport.publication(reply_q.get(timeout=30), stream_id + 1)
    for _ in range(n):
        m = sub.receive(timeout=30)
        if m is None:
            break
        pub.send(m.meta, m.arrays, timeout=5)
    pub.close()
    sub.close()


def channel_pingpong(uri: str, reply_uri: str, n: int, stream_id: int) -> list[float]:
    ctx = mp.get_context("fork")
    uri_q, reply_q = ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=_channel_echo, args=(uri, stream_id, uri_q, reply_q, n))
    p.start()
    reply = transport.subscription(reply_uri, stream_id + 1)
    reply_q.put(reply.uri)
    pub = transport.publication(uri_q.get(timeout=30), stream_id)
    payload = np.zeros(64, np.uint8)
    deadline = time.monotonic() + 10
    while not pub.is_connected and time.monotonic() < deadline:
        time.sleep(0.01)
    rtts = []
    for i in range(n):
        t = time.perf_counter()
        pub.send({"i": i}, [payload], timeout=5)
        m = reply.receive(timeout=30)
        if m is None:
            raise transport.TransportError(f"{uri}: no echo for message {i}")
        rtts.append(time.perf_counter() - t)
    pub.close()
    reply.close()
    p.join()
    return rtts


# -- transports under test ----------------------------------------------------------------------------------

# name -> (subscription URI for the receiver, subscription URI for the ping-pong reply, offer batch size)
TRANSPORTS: dict[str, tuple[str, str, int]] = {
    "tcp": ("tcp://127.0.0.1:0", "tcp://127.0.0.1:0", 1),
    "tcp+offer_batch": ("tcp://127.0.0.1:0", "tcp://127.0.0.1:0", 64),
    "aeron:ipc": ("aeron:ipc", "aeron:ipc", 64),
    "aeron:udp": ("aeron:udp?endpoint=127.0.0.1:40456", "aeron:udp?endpoint=127.0.0.1:40457", 64),
}


@contextlib.contextmanager
def media_driver_if_needed(names: list[str]) -> Iterator[None]:
    """Start one Aeron media driver for the run when an Aeron transport is measured."""
    if not any(n.startswith("aeron") for n in names):
        yield
        return
    from blazil_ai.transport.media_driver import MediaDriver

    with MediaDriver() as driver:
        os.environ["AERON_DIR"] = str(driver.dir)
        yield


def aeron_available() -> bool:
    try:
        from blazil_ai.transport.aeron_binding import available

        return bool(available())
    except Exception:
        return False


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.array(xs), q))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--transports", default=None, help="comma list of " + ", ".join(TRANSPORTS))
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions per case (median reported)")
    ap.add_argument("--quick", action="store_true", help="a tenth of the messages")
    ap.add_argument("--pings", type=int, default=5000)
    args = ap.parse_args(argv)
    names = args.transports.split(",") if args.transports else ["tcp", "tcp+offer_batch"] + (
        ["aeron:ipc", "aeron:udp"] if aeron_available() else [])
    scale = 0.1 if args.quick else 1.0
    host = {"cpus": os.cpu_count(), "python": sys.version.split()[0], "load1": round(os.getloadavg()[0], 2)}

    with media_driver_if_needed(names):
        stream = 100
        for label, size in SIZES.items():
            n = max(20, int(COUNTS[label] * scale))
            anchor_runs: list[float] = []
            runs: dict[str, list[float]] = {t: [] for t in names}
            for _ in range(args.reps):
                anchor_runs.append(anchor_throughput(size, n))
                for t in names:
                    stream += 2
                    uri, _, batch = TRANSPORTS[t]
                    runs[t].append(channel_throughput(uri, size, n, stream, batch if size <= 16384 else 1))
            anchor = statistics.median(anchor_runs)
            tcp_rate = statistics.median(runs["tcp"]) if "tcp" in runs else None
            for t in names:
                rate = statistics.median(runs[t])
                row: dict[str, Any] = {
                    "case": "throughput", "size": label, "transport": t, "messages": n,
                    "msgs_per_s": round(rate), "MB_per_s": round(rate * size / 1e6, 1),
                    "anchor": "plain socket + length-prefixed msgpack", "anchor_msgs_per_s": round(anchor),
                    "ratio": round(rate / anchor, 3), "reps": args.reps, "host": host}
                if tcp_rate and t != "tcp":
                    row["ratio_vs_tcp_channel"] = round(rate / tcp_rate, 2)
                print(json.dumps(row), flush=True)

        pings = max(200, int(args.pings * scale))
        anchor_lat: list[float] = []
        lat: dict[str, list[float]] = {t: [] for t in names if "+" not in t}  # batching is no latency case
        for _ in range(args.reps):
            anchor_lat += anchor_pingpong(pings)
            for t in lat:
                stream += 2
                uri, reply_uri, _ = TRANSPORTS[t]
                lat[t] += channel_pingpong(uri, reply_uri, pings, stream)
        a50, a99 = pct(anchor_lat, 50) * 1e6, pct(anchor_lat, 99) * 1e6
        tcp50 = pct(lat["tcp"], 50) * 1e6 if "tcp" in lat else None
        for t in lat:
            p50, p99 = pct(lat[t], 50) * 1e6, pct(lat[t], 99) * 1e6
            row = {"case": "pingpong", "size": "64B", "transport": t, "round_trips": len(lat[t]),
                   "p50_us": round(p50, 1), "p99_us": round(p99, 1),
                   "anchor": "plain socket + length-prefixed msgpack", "anchor_p50_us": round(a50, 1),
                   "anchor_p99_us": round(a99, 1), "ratio_p50": round(p50 / a50, 3), "host": host}
            if tcp50 and t != "tcp":
                row["ratio_p50_vs_tcp_channel"] = round(p50 / tcp50, 3)
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
