"""``blazil ledger serve`` and ``blazil ledger inspect``."""

from __future__ import annotations

import argparse
import errno
import json
import sys
from typing import Any

from blazil_ai.checks import channel_uri


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``ledger`` command group."""
    p = sub.add_parser("ledger", help="the TigerBeetle-semantics ledger: serve a directory, inspect one",
                       description="The ledger engine: TigerBeetle's accounts, transfers and result codes, "
                                   "durable in a directory (write-ahead log + checkpoints), optionally sharded.")
    ls = p.add_subparsers(dest="ledger_command", metavar="SUBCOMMAND")

    s = ls.add_parser("serve", help="serve a ledger directory over TCP (or tcps:// with client certificates)",
                      description="Serve the ledger in DIR. Clients connect with "
                                  "blazil_ai.ledger.connect('tcp://HOST:PORT'). Every reply is sent only after "
                                  "its batch is on disk (fsync). Stop with Ctrl-C or SIGTERM.")
    s.add_argument("--data", required=True, metavar="DIR", help="ledger directory (created if missing)")
    s.add_argument("--listen", default="tcp://127.0.0.1:3030", metavar="URI", type=channel_uri,
                   help="where to listen: tcp://HOST:PORT (port 0 picks one), tcps://HOST:PORT?certfile=..&keyfile="
                        "..&cafile=.. for TLS with client certificates, or an aeron: URI (default %(default)s)")
    s.add_argument("--shards", type=int, default=None, metavar="N",
                   help="create the ledger with N shards (an existing ledger keeps its own count)")
    s.add_argument("--metrics-port", type=int, default=0, metavar="PORT",
                   help="port for /metrics (0 picks a free one, -1 disables; default %(default)s)")
    s.add_argument("--metrics-host", default="127.0.0.1", metavar="HOST",
                   help="address /metrics listens on (default %(default)s; 0.0.0.0 lets a remote Prometheus scrape)")
    s.add_argument("--checkpoint-mb", type=int, default=256, metavar="MB",
                   help="write a checkpoint when a shard's log passes this size (default %(default)s)")
    s.add_argument("--switch-interval", type=float, default=0.0002, metavar="S",
                   help="Python thread switch interval for this process (default %(default)s s; Python's own is "
                        "0.005): shorter lets the log thread ack sooner while the engine works")
    s.add_argument("--json", action="store_true", help="print the ready line as JSON")
    s.set_defaults(func=_serve)

    i = ls.add_parser("inspect", help="open a ledger directory (replaying its log) and print what it holds",
                      description="Open DIR (it must not be served at the same time), replay its log, and print "
                                  "accounts, transfers, totals, log segments and checkpoints.")
    i.add_argument("dir", metavar="DIR", help="ledger directory")
    i.add_argument("--json", action="store_true", help="print one JSON object")
    i.set_defaults(func=_inspect)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _serve(args: argparse.Namespace) -> int:
    from blazil_ai.errors import ConfigError
    from blazil_ai.files import undo_on_failure
    from blazil_ai.ledger.server import LedgerServer

    if args.shards is not None and args.shards < 1:
        raise ConfigError("--shards must be at least 1")
    # The log thread acks batches between the engine thread's numpy work; a short GIL switch interval
    # lets it in sooner (measured in benchmarks/ledger.py, --switch-interval).
    sys.setswitchinterval(args.switch_interval)
    if not -1 <= args.metrics_port <= 65535:
        raise ConfigError(f"--metrics-port {args.metrics_port} is not a port number (0 picks one, -1 disables)")
    with undo_on_failure(args.data):  # a start that fails (a busy port) leaves no new files behind
        try:
            server = LedgerServer(args.data, args.listen, shards=args.shards,
                                  metrics_port=None if args.metrics_port < 0 else args.metrics_port,
                                  metrics_host=args.metrics_host, checkpoint_bytes=args.checkpoint_mb << 20)
        except OSError as e:  # the listening socket (the /metrics port reports itself)
            why = "the address is in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
            raise ConfigError(f"--listen {args.listen}: cannot listen: {why}") from None
    ready = {"listen": server.uri, "data": str(args.data),
             "metrics": server.metrics.url if server.metrics is not None else None}
    print(json.dumps(ready) if args.json else f"ledger serving {args.data} on {server.uri}"
          + (f", metrics at {ready['metrics']}" if ready["metrics"] else ""), flush=True)
    server.run()
    return 0


def inspect(directory: str) -> dict[str, Any]:
    """Open a ledger directory and describe it (a library function the CLI prints)."""
    from pathlib import Path

    from blazil_ai.errors import ConfigError
    from blazil_ai.ledger.checkpoint import checkpoints
    from blazil_ai.ledger.client import open_embedded
    from blazil_ai.ledger.shards import ShardedLedger
    from blazil_ai.ledger.wal import segments

    root = Path(directory)
    if not root.is_dir():
        raise ConfigError(f"{root} is not a ledger directory")
    backend = open_embedded(root)
    try:
        locals_ = backend.shards if isinstance(backend, ShardedLedger) else [backend]
        shards = []
        for s in locals_:
            segs = segments(s.directory)
            shards.append({
                "directory": str(s.directory), "accounts": s.engine.n_accounts, "transfers": s.engine.n_transfers,
                "log_seq": s.seq, "replayed_entries": s.replayed, "checkpoint_seq": s.checkpoint_seq,
                "checkpoints": [p.name for _seq, p in checkpoints(s.directory)],
                "log_segments": [{"name": p.name, "bytes": p.stat().st_size} for _first, p in segs],
            })
        totals = backend.call("totals")
        out: dict[str, Any] = {"directory": str(root), "shards": len(locals_), "shard_details": shards,
                               "totals": {k: str(v) for k, v in totals.items()},
                               "balanced": totals["debits_posted"] == totals["credits_posted"]}
        if isinstance(backend, ShardedLedger):
            out["cross_shard_transfers"] = backend.cross.n_transfers
            out["unsettled_legs"] = backend.pending_legs()
        return out
    finally:
        backend.close()


def _inspect(args: argparse.Namespace) -> int:
    info = inspect(args.dir)
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"ledger {info['directory']}: {info['shards']} shard(s), balanced={info['balanced']}")
    for k, v in info["totals"].items():
        print(f"  total {k}: {v}")
    for s in info["shard_details"]:
        print(f"  {s['directory']}: {s['accounts']} accounts, {s['transfers']} transfers, log seq {s['log_seq']} "
              f"(checkpoint {s['checkpoint_seq']}, {s['replayed_entries']} entries replayed)")
        for seg in s["log_segments"]:
            print(f"    {seg['name']}: {seg['bytes']} bytes")
    if "unsettled_legs" in info:
        print(f"  cross-shard transfers: {info['cross_shard_transfers']}, unsettled legs: {info['unsettled_legs']}")
    sys.stdout.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m blazil_ai.ledger.commands ...``: the ``blazil ledger`` group on its own."""
    parser = argparse.ArgumentParser(prog="blazil")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["ledger", *(sys.argv[1:] if argv is None else argv)])
    from blazil_ai.errors import BlazilError
    try:
        return int(args.func(args) or 0)
    except BlazilError as e:
        print(f"blazil ledger: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
