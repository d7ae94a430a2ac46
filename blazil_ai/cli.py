"""The ``blazil`` command. Each part registers its own sub-commands; this module only assembles them.

A part module listed in ``COMMAND_MODULES`` exposes ``register(subparsers)``, adding parsers whose
``func`` default is a handler ``(args) -> int``. Handlers import heavy libraries (torch, onnxruntime)
inside, so ``blazil --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import io
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import NoReturn

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


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, ``blazil COMMAND: error: ...`` (the usage is in --help)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def command_name(args: argparse.Namespace) -> str:
    """The command and its sub-commands as typed, e.g. ``transport driver``."""
    words = [args.command]
    for key, value in vars(args).items():
        if key.endswith("_command") and isinstance(value, str):
            words.append(value)
    return " ".join(words)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with every available part's commands."""
    parser = Parser(
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
    _mark(parser)
    return parser


def _mark(parser: argparse.ArgumentParser) -> None:
    """Let each (sub-)parser record itself, so that a stray argument is reported by the command it follows."""
    parser.set_defaults(_parser=parser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in set(action.choices.values()):
                _mark(child)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``blazil`` console script."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        args._parser.error(f"unrecognized arguments: {' '.join(extra)}")
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
    name = command_name(args)
    try:
        return int(func(args) or 0)
    except BlazilError as e:
        print(f"blazil {name}: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError as e:
        if _stdout_closed():  # the reader went away (``blazil ledger inspect L | head``): stop quietly, as cat does
            _silence_stdout()
            return 128 + signal.SIGPIPE
        print(f"blazil {name}: error: {_os_error(e)}", file=sys.stderr)  # a peer's socket, not our stdout
        return 1
    except OSError as e:  # a file or address the user named (permission, disk full, no such host)
        logging.getLogger("blazil").debug("%s failed", name, exc_info=True)
        print(f"blazil {name}: error: {_os_error(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"blazil {name}: interrupted", file=sys.stderr)
        return 130
    except Terminated as t:
        print(f"blazil {name}: stopped by {t}", file=sys.stderr)
        return 128 + t.signum
    finally:  # main() may be called in a process that goes on (tests, scripts)
        for sig, handler in previous.items():
            if handler is not None:
                signal.signal(sig, handler)


def _os_error(e: OSError) -> str:
    what = e.strerror or str(e)
    names = [str(n) for n in (e.filename, e.filename2) if n is not None]
    return f"{' -> '.join(names)}: {what}" if names else str(e)


def _stdout_closed() -> bool:
    """Whether standard output is a pipe whose reader has gone (what is left in its buffer cannot be written)."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        return True
    except (OSError, ValueError):
        return False
    return False


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's last flush does not fail again."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
        os.close(fd)
    except (OSError, ValueError, io.UnsupportedOperation):
        pass


if __name__ == "__main__":
    sys.exit(main())
