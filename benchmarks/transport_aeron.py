"""Aeron fast paths beside the TCP channel and the plain-socket anchor, in the same run.

benchmarks/transport.py measures every channel through the common interface (``offer``/``offer_batch`` of
Message objects, ``poll`` with a Python handler per message); there Python's encode/decode dominates and
every transport looks alike. This script measures what Aeron adds for high rates:

* throughput: frames encoded once with ``framing.encode_bytes`` and offered ``--batch`` at a time through
  ``AeronPublication.offer_frames`` (one native call per batch); the receiver, a separate process, takes
  whole frames with ``AeronSubscription.poll_frames`` (native poll + fragment/chunk reassembly + header check,
  one copy into a numpy buffer per poll) and counts them and their bytes;
* ping-pong: one encoded 64 B frame bounced between two processes with ``offer_frames`` and
  ``poll_frames(timeout=...)`` (the wait runs in native code).

Anchor and TCP rows come from benchmarks/transport.py's own functions (TCP through the common interface,
the only one it has). One JSON line per case; every figure is the median of ``--reps`` interleaved runs.

    python benchmarks/transport_aeron.py            # aeron:ipc, aeron:udp, tcp, anchor
    python benchmarks/transport_aeron.py --quick
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import transport as common  # noqa: E402  (benchmarks/transport.py: anchor and TCP channel)

from blazil_ai.transport import aeron, aeron_binding, framing  # noqa: E402
from blazil_ai.transport.media_driver import MediaDriver  # noqa: E402

SIZES = {"64B": 64, "16KiB": 16 * 1024, "3.5MiB": 3584 * 1024}
COUNTS = {"64B": 2_000_000, "16KiB": 100_000, "3.5MiB": 300}
TCP_COUNTS = {"64B": 100_000, "16KiB": 40_000, "3.5MiB": 300}
URIS = {"aeron:ipc": ("aeron:ipc", "aeron:ipc"),
        "aeron:udp": ("aeron:udp?endpoint=127.0.0.1:40466", "aeron:udp?endpoint=127.0.0.1:40467")}


def _frame(size: int) -> bytes:
    payload = np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8)
    return framing.encode_bytes({"i": 0}, [payload])


def _raw_sink(uri: str, stream_id: int, ready_q: Any, done_q: Any, n: int, frame_len: int) -> None:
    sub = aeron.AeronSubscription(uri, stream_id)
    ready_q.put(True)
    got = nbytes = 0
    while got < n:
        data, lens = sub.poll_frames(4096, timeout=0.1)
        got += len(lens)
        nbytes += int(data.nbytes)
    done_q.put((time.perf_counter(), got, nbytes == got * frame_len))
    sub.close()


def raw_throughput(uri: str, size: int, n: int, stream_id: int, batch: int = 1024) -> float:
    """Messages per second, pre-encoded frames offered ``batch`` at a time, counted by a receiving process."""
    frame = _frame(size)
    ctx = mp.get_context("fork")
    ready_q, done_q = ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=_raw_sink, args=(uri, stream_id, ready_q, done_q, n, len(frame)))
    p.start()
    ready_q.get(timeout=30)
    pub = aeron.AeronPublication(uri, stream_id)
    deadline = time.monotonic() + 10
    while not pub.is_connected and time.monotonic() < deadline:
        time.sleep(0.001)
    batch = max(1, min(batch, (1 << 20) // len(frame)))  # keep a batch's blob around a MiB
    blob = frame * batch
    lens = np.full(batch, len(frame), dtype=np.uint64)
    t0 = time.perf_counter()
    sent = 0
    while sent < n:
        k = min(batch, n - sent)
        got = pub.offer_frames(blob if k == batch else blob[: k * len(frame)], lens[:k], timeout=5.0)
        if got == 0 and not pub.is_connected:
            raise aeron.TransportError(f"{uri}: subscriber went away")
        sent += got
    t_done, received, sizes_ok = done_q.get(timeout=300)
    pub.close()
    p.join()
    if received != n or not sizes_ok:
        raise RuntimeError(f"{uri}: receiver counted {received} frames of {n} (sizes ok: {sizes_ok})")
    return n / (t_done - t0)


def _raw_echo(uri: str, reply_uri: str, stream_id: int, ready_q: Any, n: int) -> None:
    sub = aeron.AeronSubscription(uri, stream_id)
    pub = aeron.AeronPublication(reply_uri, stream_id + 1)
    ready_q.put(True)
    done = 0
    while done < n:
        data, lens = sub.poll_frames(64, timeout=1.0)
        if len(lens):
            while pub.offer_frames(data, lens, timeout=5.0) != len(lens):
                pass
            done += len(lens)
    pub.close()
    sub.close()


def raw_pingpong(uri: str, reply_uri: str, n: int, stream_id: int) -> list[float]:
    """Round-trip times (s) of one 64 B-payload frame bounced off a second process."""
    frame = _frame(64)
    lens = np.array([len(frame)], dtype=np.uint64)
    ctx = mp.get_context("fork")
    ready_q = ctx.Queue()
    reply = aeron.AeronSubscription(reply_uri, stream_id + 1)
    p = ctx.Process(target=_raw_echo, args=(uri, reply_uri, stream_id, ready_q, n))
    p.start()
    ready_q.get(timeout=30)
    pub = aeron.AeronPublication(uri, stream_id)
    deadline = time.monotonic() + 10
    while not (pub.is_connected and reply.is_connected) and time.monotonic() < deadline:
        time.sleep(0.001)
    rtts = []
    for i in range(n):
        t = time.perf_counter()
        if pub.offer_frames(frame, lens, timeout=5.0) != 1:
            raise aeron.TransportError(f"{uri}: ping {i} not accepted")
        _, got = reply.poll_frames(64, timeout=5.0)
        if len(got) != 1:
            raise aeron.TransportError(f"{uri}: no echo for ping {i}")
        rtts.append(time.perf_counter() - t)
    pub.close()
    reply.close()
    p.join()
    return rtts


def _idle_sub(uri: str, stream_id: int, ready_q: Any, seconds: float) -> None:
    from blazil_ai import transport

    sub = transport.subscription(uri, stream_id)
    ready_q.put(True)
    sub.receive(timeout=seconds)  # nothing is ever sent: this is the idle wait being measured
    sub.close()


def idle_cpu(uri: str, stream_id: int, seconds: float, driver_pid: int | None) -> tuple[float, float]:
    """CPU used (% of one core) over ``seconds`` by an idle subscriber process and by the media driver."""
    import psutil

    ctx = mp.get_context("fork")
    ready_q = ctx.Queue()
    p = ctx.Process(target=_idle_sub, args=(uri, stream_id, ready_q, seconds + 1.0))
    p.start()
    ready_q.get(timeout=30)
    procs = [psutil.Process(p.pid)] + ([psutil.Process(driver_pid)] if driver_pid else [])
    before = [pr.cpu_times() for pr in procs]
    time.sleep(seconds)
    after = [pr.cpu_times() for pr in procs]
    p.join()
    used = [100 * ((a.user + a.system) - (b.user + b.system)) / seconds for a, b in zip(after, before)]
    return used[0], used[1] if len(used) > 1 else 0.0


def main(argv: list[str] | None = None) -> int:
    """Run the cases and print one JSON line each."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--transports", default="aeron:ipc,aeron:udp", help="comma list of aeron:ipc, aeron:udp")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions per case (median reported)")
    ap.add_argument("--quick", action="store_true", help="a tenth of the messages")
    ap.add_argument("--pings", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=1024, help="frames per offer_frames call")
    ap.add_argument("--idle-seconds", type=float, default=5.0,
                    help="measure idle driver + idle subscriber CPU over this long first (0 = skip)")
    ap.add_argument("--only-idle", action="store_true", help="measure idle CPU only")
    args = ap.parse_args(argv)
    why = aeron_binding.unavailable_reason()
    if why:
        print(json.dumps({"skipped": "aeron", "reason": why}))
        return 0
    names = args.transports.split(",")
    scale = 0.1 if args.quick else 1.0
    host = {"cpus": os.cpu_count(), "python": sys.version.split()[0], "load1": round(os.getloadavg()[0], 2),
            "aeron": aeron_binding.aeron_version()}
    with MediaDriver() as driver:
        os.environ["AERON_DIR"] = driver.dir  # for the forked receivers
        stream = 500
        if args.idle_seconds > 0:
            sub_pct, drv_pct = idle_cpu("aeron:ipc", 499, args.idle_seconds, driver.pid)
            tcp_pct, _ = idle_cpu("tcp://127.0.0.1:0", 499, args.idle_seconds, None)
            print(json.dumps({
                "case": "idle_cpu", "transport": "aeron:ipc", "seconds": args.idle_seconds,
                "driver_pct_of_core": round(drv_pct, 2), "subscriber_pct_of_core": round(sub_pct, 2),
                "total_pct_of_core": round(drv_pct + sub_pct, 2), "target_pct": 10,
                "anchor": "tcp channel subscriber blocked in receive()", "anchor_pct_of_core": round(tcp_pct, 2),
                "host": host}), flush=True)
        if args.only_idle:
            return 0
        for label, size in SIZES.items():
            n = max(20, int(COUNTS[label] * scale))
            n_tcp = max(20, int(TCP_COUNTS[label] * scale))
            anchor_runs: list[float] = []
            tcp_runs: list[float] = []
            runs: dict[str, list[float]] = {t: [] for t in names}
            for _ in range(args.reps):
                anchor_runs.append(common.anchor_throughput(size, n_tcp))
                stream += 2
                tcp_runs.append(common.channel_throughput("tcp://127.0.0.1:0", size, n_tcp, stream, 1))
                for t in names:
                    stream += 2
                    runs[t].append(raw_throughput(URIS[t][0], size, n, stream, args.batch))
            anchor, tcp = statistics.median(anchor_runs), statistics.median(tcp_runs)
            for t in names:
                rate = statistics.median(runs[t])
                print(json.dumps({
                    "case": "throughput", "size": label, "transport": t, "api": "offer_frames/poll_frames",
                    "messages": n, "msgs_per_s": round(rate), "MB_per_s": round(rate * size / 1e6, 1),
                    "tcp_channel_msgs_per_s": round(tcp), "ratio_vs_tcp_channel": round(rate / tcp, 2),
                    "anchor": "plain socket + length-prefixed msgpack", "anchor_msgs_per_s": round(anchor),
                    "ratio": round(rate / anchor, 2), "reps": args.reps, "host": host}), flush=True)

        pings = max(200, int(args.pings * scale))
        anchor_lat: list[float] = []
        tcp_lat: list[float] = []
        lat: dict[str, list[float]] = {t: [] for t in names}
        for _ in range(args.reps):
            anchor_lat += common.anchor_pingpong(pings)
            stream += 2
            tcp_lat += common.channel_pingpong("tcp://127.0.0.1:0", "tcp://127.0.0.1:0", pings, stream)
            for t in names:
                stream += 2
                lat[t] += raw_pingpong(URIS[t][0], URIS[t][1], pings, stream)
        a50 = common.pct(anchor_lat, 50) * 1e6
        tcp50, tcp99 = common.pct(tcp_lat, 50) * 1e6, common.pct(tcp_lat, 99) * 1e6
        for t in names:
            p50, p99 = common.pct(lat[t], 50) * 1e6, common.pct(lat[t], 99) * 1e6
            print(json.dumps({
                "case": "pingpong", "size": "64B", "transport": t, "api": "offer_frames/poll_frames",
                "round_trips": len(lat[t]), "p50_us": round(p50, 1), "p99_us": round(p99, 1),
                "tcp_channel_p50_us": round(tcp50, 1), "tcp_channel_p99_us": round(tcp99, 1),
                "ratio_p50_vs_tcp_channel": round(p50 / tcp50, 3),
                "anchor": "plain socket + length-prefixed msgpack", "anchor_p50_us": round(a50, 1),
                "ratio_p50": round(p50 / a50, 3), "reps": args.reps, "host": host}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
