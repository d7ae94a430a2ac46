"""The ``blazil`` command. Each part registers its own sub-commands; this module only assembles them.

A part module listed in ``COMMAND_MODULES`` exposes ``register(subparsers)``, adding parsers whose
``func`` default is a handler ``(args) -> int``. Handlers import heavy libraries (torch, onnxruntime)
inside, so ``blazil --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import signal
import sys
from collections.abc import Sequence

from blazil_ai import __version__
from blazil_ai.errors import BlazilError

COMMAND_MODULES = (
    "blazil_ai.demo",
    "blazil_ai.datasets.commands",
    "blazil_ai.models.commands",
    "blazil_ai.pipeline.commands",
    "blazil_ai.serving.commands",
    "blazil_ai.ledger.commands",
    "blazil_ai.fraud.commands",
    "blazil_ai.transport.commands",
)


class Terminated(BaseException):
    """SIGTERM or SIGHUP reached the command: unwind so that every ``finally`` stops what it started."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _terminate(signum: int, frame: object) -> None:
    for sig in (signal.SIGTERM, signal.SIGHUP):  # a second signal must not cut the clean-up short
        signal.signal(sig, signal.SIG_IGN)
    raise Terminated(signum)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with every available part's commands."""
    parser = argparse.ArgumentParser(
        prog="blazil",
        description="Blazil AI: AI inference and data loading for payment systems.",
        epilog="Run 'blazil COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"blazil-ai {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # the parent package is absent in this install
            found = False
        if found:
            importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``blazil`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    # By default SIGTERM (kill, timeout, a service manager) ends Python without running ``finally``
    # blocks, leaving stage processes and media drivers behind; commands may install their own.
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    for sig, handler in previous.items():
        if handler == signal.SIG_DFL:  # one ignored on purpose (nohup) stays ignored
            signal.signal(sig, _terminate)
    try:
        return int(func(args) or 0)
    except BlazilError as e:
        print(f"blazil {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"blazil {args.command}: interrupted", file=sys.stderr)
        return 130
    except Terminated as t:
        print(f"blazil {args.command}: stopped by {t}", file=sys.stderr)
        return 128 + t.signum
    finally:  # main() may be called in a process that goes on (tests, scripts)
        for sig, handler in previous.items():
            if handler is not None:
                signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
