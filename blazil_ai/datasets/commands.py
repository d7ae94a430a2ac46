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
                                     "labelled fraud patterns; .parquet with --format parquet), audio/<class>/*.wav "
                                     "(+ manifest.csv), detection/ (YOLO layout with data.yaml). Written into a "
                                     "temporary folder and moved in when complete.")
    mk.add_argument("dir", metavar="DIR", help="output folder: new, empty, or written by make-samples before "
                                               "(a folder with other files is refused unless --force)")
    mk.add_argument("--format", choices=("csv", "parquet"), default="csv",
                    help="file format of the tables (messages, series, transactions; default csv)")
    mk.add_argument("--force", action="store_true",
                    help="write into a non-empty folder make-samples did not create, replacing its text/, "
                         "timeseries/, features/, audio/ and detection/ folders (other files are left alone)")
    mk.add_argument("--seed", type=int, default=0, help="random seed (same seed, same files; default 0)")
    mk.add_argument("--small", action="store_true", help="a quick, small version (seconds), as the tests use")
    mk.add_argument("--json", action="store_true", help="print the written paths as JSON")
    mk.set_defaults(func=_make_samples)

    ins = dsub.add_parser("inspect", help="validate a data set and print its summary (writes nothing)",
                          description="Open a data set of the given type, decode every sample, and print counts, "
                                      "shapes, classes and skipped rows. Exits 1 with the error (file, line, "
                                      "field) on bad input. Writes nothing: a transform or normalisation named with "
                                      "-o transform=PATH / -o normalization=PATH must exist, and is checked "
                                      "against the data's fingerprint.")
    ins.add_argument("path", metavar="PATH", help="the data set: a CSV, Parquet (file or folder of parts), "
                                                  "Feather/Arrow or JSONL file, a directory, or a data.yaml")
    ins.add_argument("--type", "-t", required=True, choices=TYPE_NAMES, help="dataset type")
    ins.add_argument("--on-error", choices=("error", "skip"), default=None,
                     help="CSV rows with bad fields: stop with an error (default) or skip and count them")
    ins.add_argument("--opt", "-o", action="append", default=[], metavar="KEY=VALUE",
                     help="extra dataset option, e.g. -o split=val -o sample_rate=8000 (values parsed as YAML)")
    ins.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    ins.set_defaults(func=_inspect)


def _make_samples(args: argparse.Namespace) -> int:
    from pathlib import Path

    from blazil_ai.datasets.samples import check_target, make_samples

    check_target(Path(args.dir), args.force)  # a wrong target is the only line printed
    print(f"writing sample sets to {args.dir} ...", file=sys.stderr)
    paths = make_samples(args.dir, seed=args.seed, small=args.small, format=args.format, force=args.force)
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
    from pathlib import Path

    from blazil_ai.datasets.base import open_dataset
    from blazil_ai.errors import ConfigError

    opts = _parse_opts(args.opt)
    for key in ("transform", "normalization"):  # a validation command writes nothing
        if key in opts and (opts.get("refit") or not Path(str(opts[key])).is_file()):
            raise ConfigError(f"-o {key}={opts[key]}: inspect writes nothing, so the file must exist and refit is "
                              "not allowed; fit it by training (blazil models build) or from Python with "
                              f"{key}=PATH")
    if opts.get("refit"):
        raise ConfigError("-o refit: inspect writes nothing and fits in memory anyway")
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
