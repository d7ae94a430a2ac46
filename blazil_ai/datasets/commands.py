"""``blazil data``: make sample sets and inspect (validate and summarise) data sets."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

TYPE_NAMES = ("text", "timeseries", "features", "audio", "detection")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``blazil data make-samples`` and ``blazil data inspect``."""
    data = sub.add_parser("data", help="make sample data sets, inspect and validate data sets",
                          description="Data set tools: write seeded sample sets of the five types, or validate "
                                      "one data set and print its summary.")
    dsub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    data.set_defaults(func=lambda args: (data.print_help(), 2)[1])

    mk = dsub.add_parser("make-samples", help="write small realistic sample sets of all five types",
                         description="Write seeded sample sets under DIR: text/messages.csv (+ tokenizer.json), "
                                     "timeseries/series.csv, features/transactions.csv (simulated payments with "
                                     "labelled fraud patterns), audio/<class>/*.wav (+ manifest.csv), "
                                     "detection/ (YOLO layout with data.yaml).")
    mk.add_argument("dir", metavar="DIR", help="output directory (created if missing)")
    mk.add_argument("--seed", type=int, default=0, help="random seed (same seed, same files; default 0)")
    mk.add_argument("--small", action="store_true", help="a quick, small version (seconds), as the tests use")
    mk.add_argument("--json", action="store_true", help="print the written paths as JSON")
    mk.set_defaults(func=_make_samples)

    ins = dsub.add_parser("inspect", help="validate a data set and print its summary",
                          description="Open a data set of the given type, decode every sample, and print counts, "
                                      "shapes, classes and skipped rows. Exits 1 with the error (file, line, "
                                      "field) on bad input.")
    ins.add_argument("path", metavar="PATH", help="the data set: a CSV, a directory, or a data.yaml")
    ins.add_argument("--type", "-t", required=True, choices=TYPE_NAMES, help="dataset type")
    ins.add_argument("--on-error", choices=("error", "skip"), default=None,
                     help="CSV rows with bad fields: stop with an error (default) or skip and count them")
    ins.add_argument("--opt", "-o", action="append", default=[], metavar="KEY=VALUE",
                     help="extra dataset option, e.g. -o split=val -o sample_rate=8000 (values parsed as YAML)")
    ins.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    ins.set_defaults(func=_inspect)


def _make_samples(args: argparse.Namespace) -> int:
    from blazil_ai.datasets.samples import make_samples

    print(f"writing sample sets to {args.dir} ...", file=sys.stderr)
    paths = make_samples(args.dir, seed=args.seed, small=args.small)
    if args.json:
        print(json.dumps({k: str(v) for k, v in paths.items()}))
    else:
        for kind, path in paths.items():
            print(f"{kind:<11} {path}")
    return 0


def _parse_opts(pairs: list[str]) -> dict[str, Any]:
    import yaml

    from blazil_ai.errors import ConfigError

    opts: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--opt expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        opts[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return opts


def _inspect(args: argparse.Namespace) -> int:
    from blazil_ai.datasets.base import open_dataset
    from blazil_ai.errors import ConfigError

    opts = _parse_opts(args.opt)
    if args.on_error:
        if args.type in ("detection",):
            raise ConfigError("--on-error applies to CSV-based types only")
        opts["on_error"] = args.on_error
    try:
        ds = open_dataset(args.type, args.path, **opts)
    except TypeError as e:  # an --opt the type does not take
        raise ConfigError(f"bad option for {args.type}: {e}") from None
    ds.check_all(progress=not args.json)
    summary = ds.summary()
    if args.json:
        print(json.dumps(summary, default=str))
    else:
        for key, value in summary.items():
            print(f"{key:<20} {value}")
    return 0
