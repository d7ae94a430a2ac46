"""CLI: ``blazil serve`` (the fraud-scored transfer service) and ``blazil transfer ...`` (its client)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from blazil_ai.checks import channel_uri, port, positive_float, positive_int, reachable


def minor_units(text: str) -> int:
    """``argparse`` type of ``--amount``: a whole number of minor units, 1..2^63-1."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of minor units (cents: 25.99 is "
                                         "2599)") from None
    if not 1 <= n < 1 << 63:
        raise argparse.ArgumentTypeError(f"{n} is out of range 1..2^63-1")
    return n

SERVE_EPILOG = """\
example:
  blazil models build --type fraud
  blazil serve --data ./fraud-data --model ~/.cache/blazil/models/fraud.onnx --listen tcp://127.0.0.1:7400
  blazil transfer accounts 1 2
  blazil transfer submit --from 1 --to 2 --amount 2599 --channel online --country GB
  blazil transfer decision ID ; blazil transfer review ID --approve

Decisions: score < --review-at: approve (posted transfer); < --reject-at: review (pending transfer, funds
held for --review-timeout seconds, then voided); otherwise reject (no transfer). A model error sends
transfers to review, never to approve. /metrics is served on --metrics-port (0 = any free port).
"""


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``serve`` and ``transfer``."""
    default_uri = "tcp://127.0.0.1:7400"  # = fraud.types.DEFAULT_URI (a test checks); not imported: --help stays fast

    s = sub.add_parser("serve", help="run the fraud-scored transfer service",
                       description="Score every transfer with the ONNX fraud model before it reaches the ledger "
                                   "(approve, review or reject), store each decision durably, and serve clients "
                                   "over the transport (tcp://, tcps://, aeron:) with /metrics.",
                       epilog=SERVE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--data", required=True, help="the service's data folder: its decision log and its embedded "
                                                 "ledger (DATA/ledger); both are created on first use (a new or "
                                                 "empty folder, or one 'blazil serve' used before)")
    s.add_argument("--force", action="store_true", help="use a --data folder that holds other files")
    s.add_argument("--model", required=True, help="fraud.onnx (with fraud.norm.json next to it) or its directory")
    s.add_argument("--listen", default=default_uri, type=channel_uri,
                   help=f"transport URI to serve on (default {default_uri})")
    s.add_argument("--ledger", help="ledger address instead of DATA/ledger: an existing ledger directory (blazil "
                                    "ledger format DIR), tcp://host:port (blazil ledger serve) or "
                                    "tigerbeetle://host:port")
    s.add_argument("--metrics-port", type=port, default=9464, help="port of /metrics (default 9464, 0 = any)")
    s.add_argument("--metrics-host", default="127.0.0.1",
                   help="address /metrics listens on (default 127.0.0.1; 0.0.0.0 lets a remote Prometheus scrape)")
    s.add_argument("--review-at", type=float, default=0.5, help="score from which a transfer is held (default 0.5)")
    s.add_argument("--reject-at", type=float, default=0.9, help="score from which it is rejected (default 0.9)")
    s.add_argument("--review-timeout", type=int, default=3600,
                   help="seconds a held transfer waits for a reviewer before it is voided (default 3600)")
    s.add_argument("--backend", choices=("onnxruntime", "tract"), default="onnxruntime", help="inference engine")
    s.add_argument("--json", action="store_true", help="print the listening address as one JSON line")
    s.set_defaults(func=cmd_serve)

    t = sub.add_parser("transfer", help="submit transfers to 'blazil serve' and read or review decisions",
                       description="Client of the fraud-scored transfer service.")
    t.set_defaults(func=lambda args: (t.print_help(), 2)[1])
    tsub = t.add_subparsers(dest="transfer_command", metavar="SUBCOMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--connect", default=default_uri, type=channel_uri, help=f"service URI (default {default_uri})")
        p.add_argument("--timeout", type=positive_float, default=30.0,
                       help="seconds to wait for the reply (default 30)")
        p.add_argument("--json", action="store_true", help="print JSON")

    sm = tsub.add_parser("submit", help="submit one transfer (flags) or many (--file JSONL)",
                         description="Submit transfer requests and print their decisions. Amounts are in minor "
                                     "units (cents). Context fields feed the fraud model.")
    common(sm)
    sm.add_argument("--file", help="JSON lines, one request per line: id, debit_account_id, credit_account_id, "
                                   "amount, time, merchant_category, channel, device, country, is_foreign, "
                                   "is_new_device ('-' = stdin)")
    sm.add_argument("--id", type=int, help="transfer id (default: a new time-sortable id)")
    sm.add_argument("--from", dest="debit", type=int, help="debit account id")
    sm.add_argument("--to", dest="credit", type=int, help="credit account id")
    sm.add_argument("--amount", type=minor_units, help="amount in minor units (cents: 25.99 is 2599)")
    sm.add_argument("--ledger-id", type=int, default=1, help="ledger number (default 1)")
    sm.add_argument("--code", type=int, default=1, help="transfer code (default 1)")
    sm.add_argument("--time", type=float, help="event time, epoch seconds (default now)")
    sm.add_argument("--merchant", help="merchant category, e.g. grocery, electronics, digital_goods")
    sm.add_argument("--channel", help="pos, online, mobile, atm or transfer")
    sm.add_argument("--device", help="ios, android, web or pos_terminal")
    sm.add_argument("--country", help="two-letter country code")
    sm.add_argument("--foreign", action="store_true", help="the country is foreign to the account holder")
    sm.add_argument("--new-device", action="store_true", help="the device is new to the account")
    sm.set_defaults(func=cmd_submit)

    d = tsub.add_parser("decision", help="show the stored decision of a transfer")
    common(d)
    d.add_argument("id", type=int, help="transfer id")
    d.set_defaults(func=cmd_decision)

    ls = tsub.add_parser("list", help="list recent decisions (newest first)")
    common(ls)
    ls.add_argument("--outcome", choices=("approved", "review", "rejected", "failed"))
    ls.add_argument("--state", choices=("pending", "posted", "voided", "expired"), help="review state")
    ls.add_argument("--account", type=int, help="only transfers from or to this account")
    ls.add_argument("--limit", type=positive_int, default=20, help="how many (default 20)")
    ls.set_defaults(func=cmd_list)

    r = tsub.add_parser("review", help="approve (post) or decline (void) a transfer held for review")
    common(r)
    r.add_argument("id", type=int, help="transfer id")
    g = r.add_mutually_exclusive_group(required=True)
    g.add_argument("--approve", action="store_true", help="post the held transfer")
    g.add_argument("--decline", action="store_true", help="void it (funds released)")
    r.set_defaults(func=cmd_review)

    a = tsub.add_parser("accounts", help="create ledger accounts through the service")
    common(a)
    a.add_argument("ids", type=int, nargs="+", help="account ids")
    a.add_argument("--ledger-id", type=int, default=1, help="ledger number (default 1)")
    a.add_argument("--code", type=int, default=1, help="account code (default 1)")
    a.set_defaults(func=cmd_accounts)

    st = tsub.add_parser("stats", help="decision counts and the policy in force")
    common(st)
    st.set_defaults(func=cmd_stats)


def cmd_serve(args: argparse.Namespace) -> int:
    """Handler of ``blazil serve``."""
    from blazil_ai.files import check_output_dir, undo_on_failure
    from blazil_ai.fraud.server import FraudServer

    check_output_dir(args.data, force=args.force, option="--data", ours=lambda p: p.name in ("decisions", "ledger"))
    with undo_on_failure(args.data):  # a start that fails (a busy port, a bad model) leaves no folder behind
        server = FraudServer(args.data, args.model, args.listen, metrics_port=args.metrics_port,
                             metrics_host=args.metrics_host, ledger=args.ledger, review_at=args.review_at,
                             reject_at=args.reject_at, review_timeout_s=args.review_timeout, backend=args.backend)
    info = {"listen": server.uri, "metrics": server.metrics.url if server.metrics else None,
            "policy": server.service.stats()["policy"], "recovered": server.service.recovered}
    if args.json:
        print(json.dumps(info), flush=True)
    else:
        print(f"blazil serve: fraud-scored transfers on {server.uri}; metrics at {info['metrics']}; "
              f"model {info['policy']['model_version']}; recovered {info['recovered']}", flush=True)
    server.run()
    return 0


def _client(args: argparse.Namespace) -> Any:
    from blazil_ai.fraud.server import FraudClient

    reachable(args.connect, "--connect", args.timeout)  # a refused connection fails now, not after --timeout
    return FraudClient(args.connect, timeout=args.timeout)


def _show(args: argparse.Namespace, obj: Any, text: str) -> None:
    print(json.dumps(obj) if args.json else text)


def _line(d: dict[str, Any]) -> str:
    score = "-" if d["score"] is None else f"{d['score']:.4f}"
    state = f" review={d['review_state']}" if d["review_state"] != "none" else ""
    return (f"{d['transfer_id']}: {d['outcome']}{state} score={score} {d['debit_account_id']}->"
            f"{d['credit_account_id']} amount={d['amount']} ({d['reason']}; model {d['model_version']})")


def cmd_submit(args: argparse.Namespace) -> int:
    """Handler of ``blazil transfer submit``."""
    from blazil_ai.errors import ConfigError, DataError
    from blazil_ai.fraud.types import Outcome, check_record, request_records
    from blazil_ai.ledger import id as new_id

    if args.file:
        if args.file != "-" and not os.path.isfile(args.file):
            raise ConfigError(f"--file {args.file}: no such file")
        stream = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")  # noqa: SIM115
        records = []
        with stream:
            for n, line in enumerate(stream, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"not JSON: {e.msg}", path=args.file, line=n) from None
                if not isinstance(rec, dict):
                    raise DataError("expected one JSON object per line", path=args.file, line=n)
                rec.setdefault("id", new_id())
                try:
                    check_record(rec)
                except DataError as e:
                    raise DataError(str(e).removeprefix(f"field {e.field!r}: "), path=args.file, line=n,
                                    field=e.field) from None
                records.append(rec)
    else:
        if args.debit is None or args.credit is None or args.amount is None:
            raise ConfigError("give --from, --to and --amount (or --file)")
        rec = {"id": args.id or new_id(), "debit_account_id": args.debit, "credit_account_id": args.credit,
               "amount": args.amount, "ledger": args.ledger_id, "code": args.code, "time": args.time,
               "merchant_category": args.merchant, "channel": args.channel, "device": args.device,
               "country": args.country, "is_foreign": args.foreign, "is_new_device": args.new_device}
        records = [{k: v for k, v in rec.items() if v is not None}]
        try:
            check_record(records[0])
        except DataError as e:
            option = {"debit_account_id": "--from", "credit_account_id": "--to", "merchant_category": "--merchant",
                      "ledger": "--ledger-id", "is_foreign": "--foreign", "is_new_device": "--new-device"}
            name = option.get(e.field or "", f"--{e.field}")
            raise ConfigError(f"{name}: {str(e).removeprefix(f'field {e.field!r}: ')}") from None
    req = request_records(records)
    with _client(args) as c:
        res = c.decide(req)
    from blazil_ai.ledger.types import CreateTransferStatus

    out = []
    for i, r in enumerate(records):
        st = int(res.ledger_status[i])
        outcome = Outcome(int(res.outcome[i]))
        # A rejected transfer never reaches the ledger: it has no ledger status (null), not "created".
        status = CreateTransferStatus(st).name.lower() if st else (
            "created" if outcome in (Outcome.APPROVED, Outcome.REVIEW) else None)
        out.append({"transfer_id": str(r["id"]), "outcome": outcome.name.lower(),
                    "score": None if res.score[i] != res.score[i] else round(float(res.score[i]), 6),
                    "ledger_status": status})
    if args.json:
        print(json.dumps(out if args.file else out[0]))
    else:
        for o in out:
            print(f"{o['transfer_id']}: {o['outcome']} score={o['score']} ledger={o['ledger_status'] or '-'}")
    failed = [o for o in out if o["outcome"] == "failed"]
    if failed:  # the ledger refused these transfers: a script must not read the run as a success
        print(f"blazil transfer submit: error: {len(failed)} of {len(out)} transfer(s) failed "
              f"(first: {failed[0]['transfer_id']}, ledger status {failed[0]['ledger_status']})", file=sys.stderr)
        return 1
    return 0


def cmd_decision(args: argparse.Namespace) -> int:
    """Handler of ``blazil transfer decision``."""
    with _client(args) as c:
        d = c.decision(args.id)
    if d is None:
        print(f"blazil transfer decision: no decision for transfer {args.id}", file=sys.stderr)
        return 1
    _show(args, d, _line(d))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """Handler of ``blazil transfer list``."""
    with _client(args) as c:
        found = c.decisions(outcome=args.outcome, review_state=args.state, account=args.account, limit=args.limit)
    _show(args, found, "\n".join(_line(d) for d in found) or "(no decisions)")
    return 0


def cmd_review(args: argparse.Namespace) -> int:
    """Handler of ``blazil transfer review``."""
    with _client(args) as c:
        d = c.review(args.id, approve=bool(args.approve))
    _show(args, d, _line(d))
    return 0


def cmd_accounts(args: argparse.Namespace) -> int:
    """Handler of ``blazil transfer accounts``."""
    from blazil_ai.ledger.types import CreateAccountStatus

    with _client(args) as c:
        st = c.create_accounts(args.ids, ledger=args.ledger_id, code=args.code)
    res = {str(i): ("created" if s == 0 else CreateAccountStatus(int(s)).name.lower()) for i, s in zip(args.ids, st)}
    _show(args, res, "\n".join(f"account {k}: {v}" for k, v in res.items()))
    return 0 if all(v in ("created", "exists") for v in res.values()) else 1


def cmd_stats(args: argparse.Namespace) -> int:
    """Handler of ``blazil transfer stats``."""
    with _client(args) as c:
        s = c.stats()
    _show(args, s, json.dumps(s, indent=1))
    return 0
