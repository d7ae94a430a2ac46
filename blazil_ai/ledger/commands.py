"""``blazil ledger format | serve | inspect | verify | repair``."""

from __future__ import annotations

import argparse
import errno
import json
import sys
from pathlib import Path
from typing import Any

from blazil_ai.checks import channel_uri
from blazil_ai.errors import ConfigError


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
    s.add_argument("--data", required=True, metavar="DIR",
                   help="ledger directory, made by 'blazil ledger format DIR' (or pass --create)")
    s.add_argument("--create", action="store_true",
                   help="create the ledger in DIR first if DIR is missing or empty (an existing ledger is "
                        "served as is)")
    s.add_argument("--listen", default="tcp://127.0.0.1:3030", metavar="URI", type=channel_uri,
                   help="where to listen: tcp://HOST:PORT (port 0 picks one), tcps://HOST:PORT?certfile=..&keyfile="
                        "..&cafile=.. for TLS with client certificates, or an aeron: URI (default %(default)s)")
    s.add_argument("--shards", type=int, default=None, metavar="N",
                   help="with --create: create the ledger with N shards (an existing ledger keeps its own count)")
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

    f = ls.add_parser("format", help="create an empty ledger in a new or empty folder",
                      description="Create an empty ledger in DIR (made if missing; an existing DIR must be empty), as "
                                  "'tigerbeetle format' does. Opening a ledger never creates one, so a mistyped path "
                                  "fails instead of serving an empty ledger.")
    f.add_argument("dir", metavar="DIR", help="folder for the new ledger")
    f.add_argument("--shards", type=int, default=1, metavar="N", help="number of shards (default %(default)s)")
    f.set_defaults(func=_format)

    i = ls.add_parser("inspect", help="open a ledger directory read-only (replaying its log) and print what it holds",
                      description="Open DIR read-only (nothing is written there, not even a LOCK; a backup on a "
                                  "read-only mount works), replay its log in memory, and print accounts, transfers, "
                                  "totals, log segments and checkpoints.")
    i.add_argument("dir", metavar="DIR", help="ledger directory")
    i.add_argument("--json", action="store_true", help="print one JSON object")
    i.set_defaults(func=_inspect)

    v = ls.add_parser("verify", help="check a ledger (or a 'blazil serve' data folder) for damage; writes nothing",
                      description="Check DIR read-only: the MANIFEST, shard layout, checkpoint checksums, every log "
                                  "entry, and the balances after replay; for a 'blazil serve' data folder also the "
                                  "decision log. Exit status 0: healthy (a torn, never-acknowledged tail is only a "
                                  "note: the next open drops it); 1: damaged, each problem named by file and offset.")
    v.add_argument("dir", metavar="DIR", help="ledger directory or 'blazil serve' data folder")
    v.add_argument("--json", action="store_true", help="print one JSON object")
    v.set_defaults(func=_verify)

    r = ls.add_parser("repair", help="drop damaged log entries, saying what goes (only with --yes)",
                      description="Plan the repair of DIR: damaged write-ahead log entries are dropped with every "
                                  "entry after them (later entries replay on top of earlier ones); a damaged decision "
                                  "log frame is dropped alone. Without --yes nothing is written and the plan is "
                                  "printed (exit 1 if there is something to repair). A missing or damaged MANIFEST, "
                                  "checkpoint or shard folder cannot be repaired: restore those from a backup.")
    r.add_argument("dir", metavar="DIR", help="ledger directory or 'blazil serve' data folder")
    r.add_argument("--yes", action="store_true", help="carry the repair out (acknowledged data in the dropped "
                                                      "entries is lost)")
    r.add_argument("--json", action="store_true", help="print one JSON object")
    r.set_defaults(func=_repair)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _serve(args: argparse.Namespace) -> int:
    from blazil_ai.files import undo_on_failure
    from blazil_ai.ledger.server import LedgerServer

    if args.shards is not None and args.shards < 1:
        raise ConfigError("--shards must be at least 1")
    if args.shards is not None and not args.create:
        raise ConfigError("--shards creates a ledger: pass it with --create (or use 'blazil ledger format --shards N')")
    # The log thread acks batches between the engine thread's numpy work; a short GIL switch interval
    # lets it in sooner (measured in benchmarks/ledger.py, --switch-interval).
    sys.setswitchinterval(args.switch_interval)
    if not -1 <= args.metrics_port <= 65535:
        raise ConfigError(f"--metrics-port {args.metrics_port} is not a port number (0 picks one, -1 disables)")
    with undo_on_failure(args.data):  # a start that fails (a busy port) leaves no new files behind
        if args.create:
            create(Path(args.data), args.shards or 1, exist_ok=True)
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
    from blazil_ai.ledger.types import LocalOp
    from blazil_ai.ledger.wal import scan_segment, segments

    root = Path(directory)
    if not root.is_dir():
        raise ConfigError(f"{root} is not a ledger directory")
    backend = open_embedded(root, read_only=True)
    try:
        locals_ = backend.shards if isinstance(backend, ShardedLedger) else [backend]
        shards = []
        for s in locals_:
            segs = segments(s.directory)
            shards.append({
                "directory": str(s.directory), "accounts": s.engine.n_accounts, "transfers": s.engine.n_transfers,
                "log_seq": s.seq, "replayed_entries": s.replayed, "checkpoint_seq": s.checkpoint_seq,
                "checkpoints": [p.name for _seq, p in checkpoints(s.directory)],
                "log_segments": [{"name": p.name, "bytes": p.stat().st_size, "entry_bytes": scan_segment(p).end}
                                 for _first, p in segs],
            })
        totals = backend.call(LocalOp.TOTALS)
        out: dict[str, Any] = {"directory": str(root), "shards": len(locals_), "shard_details": shards,
                               "totals": {k: str(v) for k, v in totals.items()},
                               "balanced": totals["debits_posted"] == totals["credits_posted"]}
        if isinstance(backend, ShardedLedger):
            out["cross_shard_transfers"] = backend.cross.n_transfers
            out["unsettled_legs"] = backend.pending_legs()
        return out
    finally:
        backend.close()


def create(directory: Path, shards: int = 1, exist_ok: bool = False) -> bool:
    """Create a ledger (``exist_ok``: leave an existing one as it is); returns whether one was created."""
    from blazil_ai.ledger import manifest as mf
    from blazil_ai.ledger.shards import format_sharded, read_layout
    from blazil_ai.ledger.store import format_ledger

    if shards < 1:
        raise ConfigError("--shards must be at least 1")
    if exist_ok and (mf.is_ledger(directory) or read_layout(directory) is not None):
        return False
    if shards > 1:
        format_sharded(directory, shards)
    else:
        format_ledger(directory)
    return True


def _format(args: argparse.Namespace) -> int:
    create(Path(args.dir), args.shards)
    print(f"ledger created in {args.dir} ({args.shards} shard{'s' if args.shards > 1 else ''})")
    return 0


def _print_report(rep: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(rep.as_dict()))
        return
    for line in rep.problems:
        print(f"damaged: {line}")
    for line in rep.unrepairable:
        print(f"cannot repair: {line}")
    for line in rep.notes:
        print(f"note: {line}")
    for led in rep.ledgers:
        print("  " + ", ".join(f"{k}={v}" for k, v in led.items()))


def _verify(args: argparse.Namespace) -> int:
    from blazil_ai.ledger.verify import verify

    rep = verify(args.dir)
    _print_report(rep, args.json)
    if not args.json:
        print(f"{args.dir}: {'healthy' if rep.healthy else 'DAMAGED'}")
    return 0 if rep.healthy else 1


def _repair(args: argparse.Namespace) -> int:
    from blazil_ai.ledger.verify import repair

    rep = repair(args.dir, apply=args.yes)
    _print_report(rep, args.json)
    if not args.json:
        for line in rep.repairs:
            print(f"{'dropped' if args.yes else 'would drop'}: {line}")
        if not rep.repairs and not rep.unrepairable:
            print(f"{args.dir}: nothing to repair")
        elif rep.repairs and not args.yes:
            print("nothing was written; run again with --yes to carry this out")
    return 1 if rep.unrepairable or (rep.repairs and not args.yes) else 0


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
            print(f"    {seg['name']}: {seg['entry_bytes']} bytes of entries ({seg['bytes']} preallocated)")
    if "unsettled_legs" in info:
        print(f"  cross-shard transfers: {info['cross_shard_transfers']}, unsettled legs: {info['unsettled_legs']}")
    sys.stdout.flush()
    return 0

