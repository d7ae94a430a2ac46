"""Checks of command-line values, made before a command starts anything.

Each ``argparse`` type here turns a bad value into argparse's one-line error naming the option
(``blazil stage: error: argument --next: ...``), so a typo stops the command before any process,
socket or file exists. Nothing here imports torch or the transport.
"""

from __future__ import annotations

import argparse
import math
import re
import socket
import urllib.parse

from blazil_ai.errors import ConfigError

_DEVICE = re.compile(r"^(cpu|mps|meta|(cuda|xpu)(:\d+)?)$")


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def positive_int(text: str) -> int:
    """An integer >= 1."""
    n = _int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} must be at least 1")
    return n


def nonneg_int(text: str) -> int:
    """An integer >= 0."""
    n = _int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"{n} must be 0 or more")
    return n


def stream_id(text: str) -> int:
    """A channel's stream id (a 32-bit signed integer, as Aeron's)."""
    n = _int(text)
    if not -2**31 <= n < 2**31:
        raise argparse.ArgumentTypeError(f"{n} is not a stream id (a 32-bit signed integer)")
    return n


def port(text: str) -> int:
    """A TCP port, 0 (any free one) to 65535."""
    n = _int(text)
    if not 0 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"{n} is not a port number (0-65535; 0 picks a free one)")
    return n


def positive_float(text: str) -> float:
    """A finite number > 0 (a timeout, an interval)."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(x) or x <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be a finite number above 0")
    return x


def device(text: str) -> str:
    """A torch device name: cpu, cuda, cuda:N, mps, xpu[:N] (whether it exists is checked where torch is)."""
    if not _DEVICE.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (cpu, cuda, cuda:1, mps)")
    return text


def check_uri(uri: str) -> str:
    """Check a channel URI's form (tcp://HOST:PORT, tcps://HOST:PORT?..., aeron:ipc, aeron:udp?endpoint=...)."""
    if uri.startswith("aeron:"):
        media, _, params = uri[len("aeron:"):].partition("?")
        if media not in ("ipc", "udp"):
            raise ValueError(f"{uri!r}: Aeron media must be ipc or udp (aeron:ipc, aeron:udp?endpoint=HOST:PORT)")
        keys = []
        if "?" in uri:
            for part in params.split("|"):
                key, eq, value = part.partition("=")
                if not eq or not key or not value:
                    raise ValueError(f"{uri!r}: parameter {part!r} is not KEY=VALUE (parameters are "
                                     "separated by '|', e.g. aeron:udp?endpoint=host:40456|mtu=8192)")
                keys.append(key)
        if media == "udp" and "endpoint" not in keys and "control" not in keys:
            raise ValueError(f"{uri!r}: aeron:udp needs endpoint=HOST:PORT (or control=HOST:PORT)")
        return uri
    scheme, sep, rest = uri.partition("://")
    if scheme not in ("tcp", "tcps"):
        raise ValueError(f"{uri!r} is not a channel URI: use tcp://HOST:PORT, tcps://HOST:PORT?certfile=..., "
                         "aeron:ipc or aeron:udp?endpoint=HOST:PORT")
    if not sep:
        raise ValueError(f"{uri!r}: expected {scheme}://HOST:PORT")
    parts = urllib.parse.urlsplit(uri)
    try:
        p = parts.port
    except ValueError:
        p = None
        bad = True
    else:
        bad = p is None
    if bad or not parts.hostname or parts.path not in ("", "/"):
        raise ValueError(f"{uri!r}: expected {scheme}://HOST:PORT with a port 0-65535")
    return uri


def channel_uri(text: str) -> str:
    """``argparse`` type for a channel URI (see :func:`check_uri`)."""
    try:
        return check_uri(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def resolve_host(uri: str, option: str) -> None:
    """For tcp:// URIs: check the host name resolves (a typo is named now, not after a timeout)."""
    if "://" not in uri:
        return
    host = urllib.parse.urlsplit(uri).hostname
    if not host:
        return
    try:
        socket.getaddrinfo(host, None)
    except OSError as e:
        raise ConfigError(f"{option} {uri}: cannot resolve host {host!r} ({e.strerror or e})") from None


def reachable(uri: str, option: str, timeout: float) -> None:
    """For tcp:// URIs: connect once, so that a refused connection fails now rather than after the timeout."""
    if "://" not in uri:
        return
    resolve_host(uri, option)
    parts = urllib.parse.urlsplit(uri)
    try:
        with socket.create_connection((parts.hostname, parts.port or 0), timeout=min(timeout, 5.0)):
            pass
    except ConnectionRefusedError:
        raise ConfigError(f"{option} {uri}: connection refused (nothing listens there)") from None
    except OSError as e:
        raise ConfigError(f"{option} {uri}: cannot connect ({e.strerror or e})") from None
