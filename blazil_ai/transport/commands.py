"""``blazil transport``: run an Aeron media driver in the foreground, and check a channel end to end."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from typing import Any

from blazil_ai.checks import channel_uri, nonneg_int, positive_int, resolve_host


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``blazil transport driver`` and ``blazil transport ping``."""
    p = sub.add_parser("transport", help="Aeron media driver and channel checks",
                       description="Transport tools: run the Aeron media driver, check a channel.")
    tsub = p.add_subparsers(dest="transport_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    d = tsub.add_parser(
        "driver", help="run an Aeron media driver in the foreground (Ctrl-C stops it)",
        description="Run aeronmd (built by scripts/build_aeron.sh) in the foreground, in SHARED threading mode with "
                    "a backing-off idle strategy. Every process on this host that uses aeron: URIs connects to it "
                    "through the same directory (pass it as AERON_DIR). One driver per host in multi-host runs.")
    d.add_argument("--dir", default=None,
                   help="driver directory (default: $AERON_DIR, else /dev/shm/aeron-$USER): a new or empty folder, "
                        "or one a driver used before (with cnc.dat); the driver deletes it on start and stop")
    d.add_argument("--term-length", type=positive_int, default=None,
                   help="UDP term buffer length in bytes, a power of two (default 4 MiB)")
    d.add_argument("--ipc-term-length", type=positive_int, default=None,
                   help="IPC term buffer length in bytes, a power of two (default 8 MiB)")
    d.add_argument("--json", action="store_true", help="print one JSON line {dir, pid, version} when ready")
    d.set_defaults(func=_driver)

    g = tsub.add_parser(
        "ping", help="send messages through a channel and time their arrival",
        description="Open a subscription and a publication on URI in this process, send --count messages of "
                    "--size bytes one at a time and report the one-way latency (p50/p99). Works for tcp:// and "
                    "aeron: URIs; for aeron: it uses the driver in --dir / $AERON_DIR, or starts a private one.")
    g.add_argument("--uri", default="aeron:ipc", type=channel_uri,
                   help="channel URI (default aeron:ipc; e.g. tcp://127.0.0.1:0, aeron:udp?endpoint=127.0.0.1:40456)")
    g.add_argument("--stream", type=int, default=1001, help="stream id (default 1001)")
    g.add_argument("--count", type=positive_int, default=1000, help="messages to send (default 1000)")
    g.add_argument("--size", type=nonneg_int, default=64, help="array payload bytes per message (default 64)")
    g.add_argument("--dir", default=None, help="Aeron driver directory to use")
    g.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    g.set_defaults(func=_ping)


def _driver(args: argparse.Namespace) -> int:
    from blazil_ai.errors import ConfigError
    from blazil_ai.transport.aeron_binding import aeron_version
    from blazil_ai.transport.base import TransportError
    from blazil_ai.transport.media_driver import MediaDriver, check_driver_dir, default_dir

    kw: dict[str, Any] = {}
    if args.term_length:
        kw["term_length"] = args.term_length
    if args.ipc_term_length:
        kw["ipc_term_length"] = args.ipc_term_length
    aeron_dir = args.dir or os.environ.get("AERON_DIR") or default_dir()
    source = "--dir" if args.dir else "AERON_DIR" if os.environ.get("AERON_DIR") else "the default directory"
    try:
        check_driver_dir(aeron_dir)
    except TransportError as e:
        raise ConfigError(f"{source}: {e}") from None
    driver = MediaDriver(aeron_dir, **kw).start()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    info = {"dir": driver.dir, "pid": driver.pid, "version": aeron_version()}
    if args.json:
        print(json.dumps(info), flush=True)
    else:
        print(f"Aeron media driver pid {driver.pid} ready in {driver.dir} ({info['version']})\n"
              f"  clients: export AERON_DIR={driver.dir}\n  Ctrl-C stops it.", flush=True)
    try:
        while not stop.wait(0.5):
            if not driver.is_running():
                print(f"blazil transport driver: aeronmd exited unexpectedly (log: {driver.log_path})",
                      file=sys.stderr)
                return 1
    finally:
        driver.stop()
    return 0


def _ping(args: argparse.Namespace) -> int:
    import numpy as np

    from blazil_ai.errors import ConfigError
    from blazil_ai.transport import publication, subscription

    if args.count < 1 or args.size < 0:
        raise ConfigError(f"--count must be >= 1 and --size >= 0 (got {args.count}, {args.size})")
    resolve_host(args.uri, "--uri")
    driver = None
    opts: dict[str, Any] = {}
    if args.uri.startswith("aeron:"):
        from blazil_ai.transport.media_driver import MediaDriver, default_dir
        aeron_dir = args.dir or default_dir()
        if os.path.exists(os.path.join(aeron_dir, "cnc.dat")):
            opts["aeron_dir"] = aeron_dir
        else:
            driver = MediaDriver().start()
            opts["aeron_dir"] = driver.dir
    try:
        with subscription(args.uri, args.stream, **opts) as sub, \
                publication(getattr(sub, "uri", args.uri), args.stream, **opts) as pub:
            payload = np.zeros(args.size, dtype=np.uint8)
            lat: list[float] = []
            for i in range(args.count):
                t0 = time.perf_counter()
                pub.send({"i": i}, [payload], timeout=10.0)
                m = sub.receive(timeout=10.0)
                if m is None or m.meta.get("i") != i:
                    print(f"blazil transport ping: message {i} did not arrive within 10 s", file=sys.stderr)
                    return 1
                lat.append(time.perf_counter() - t0)
        us = np.array(lat) * 1e6
        out = {"uri": args.uri, "count": args.count, "size": args.size,
               "p50_us": round(float(np.percentile(us, 50)), 1),
               "p99_us": round(float(np.percentile(us, 99)), 1), "private_driver": driver is not None}
        if args.json:
            print(json.dumps(out))
        else:
            print(f"{args.uri}: {args.count} x {args.size} B, send->receive p50 {out['p50_us']} us, "
                  f"p99 {out['p99_us']} us")
        return 0
    finally:
        if driver is not None:
            driver.stop()
