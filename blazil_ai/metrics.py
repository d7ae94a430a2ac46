"""The metrics core: one Prometheus registry for the whole process, named helpers, a /metrics exporter.

Names follow ``blazil_<part>_<what>_<unit>`` (Prometheus appends ``_total`` to counters). Creating a
metric twice with the same name returns the first one, so libraries can declare their metrics at the
point of use without coordinating.

>>> c = counter("docs", "examples", "total", "Examples run")
>>> c.inc()
"""

from __future__ import annotations

import errno
import re
import threading
from collections.abc import Sequence
from http.server import ThreadingHTTPServer
from typing import Any, TypeVar

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, MetricsHandler

from blazil_ai.errors import ConfigError

REGISTRY = CollectorRegistry(auto_describe=True)
# process_* (CPU seconds, resident memory, open fds, start time) and python_* (GC, version), as every exporter has.
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)
DEFAULT_HOST = "127.0.0.1"  # loopback unless asked: --metrics-host 0.0.0.0 lets a remote Prometheus scrape
_NAME_PART = re.compile(r"^[a-z][a-z0-9_]*$")
_lock = threading.Lock()
_metrics: dict[str, Any] = {}

# Latency buckets from 10 us to 10 s: wide enough for a ring-buffer hop and a 7B prefill alike.
LATENCY_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2,
                   0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

M = TypeVar("M", Counter, Gauge, Histogram)


# Suffixes Prometheus gives meaning to: a gauge or histogram named with one would be misread by tools.
RESERVED_SUFFIXES = ("_count", "_sum", "_bucket", "_total", "_created", "_info")


def metric_name(part: str, what: str, unit: str) -> str:
    """Return ``blazil_<part>_<what>_<unit>``, checking each piece is a lower-case Prometheus name.

    ``unit`` is a base unit (``seconds``, ``bytes``), ``total`` for a counter of plain events (the
    exporter appends ``_total`` itself), or ``""`` for a dimensionless gauge (a number of things).
    """
    for label, piece in (("part", part), ("what", what), ("unit", unit)):
        if not _NAME_PART.match(piece) and not (label == "unit" and piece == ""):
            raise ValueError(f"metric {label} {piece!r} must match {_NAME_PART.pattern}")
    return f"blazil_{part}_{what}" if unit in ("total", "") else f"blazil_{part}_{what}_{unit}"


def _get_or_create(kind: type[M], name: str, doc: str, labels: Sequence[str], **kw: Any) -> M:
    with _lock:
        found = _metrics.get(name)
        if found is not None:
            if not isinstance(found, kind):
                raise ValueError(f"metric {name} already exists as {type(found).__name__}")
            return found
        made = kind(name, doc, list(labels), registry=REGISTRY, **kw)
        _metrics[name] = made
        return made


def counter(part: str, what: str, unit: str, doc: str, labels: Sequence[str] = ()) -> Counter:
    """A counter named ``blazil_<part>_<what>_<unit>_total`` in the shared registry."""
    return _get_or_create(Counter, metric_name(part, what, unit), doc, labels)


def _unreserved(name: str, kind: str) -> str:
    if name.endswith(RESERVED_SUFFIXES):
        raise ValueError(f"{kind} {name} ends in a suffix Prometheus reserves ({', '.join(RESERVED_SUFFIXES)}); "
                         "name a count of things without a unit")
    return name


def gauge(part: str, what: str, unit: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
    """A gauge named ``blazil_<part>_<what>_<unit>`` (or ``blazil_<part>_<what>`` with unit "")."""
    return _get_or_create(Gauge, _unreserved(metric_name(part, what, unit), "gauge"), doc, labels)


def histogram(part: str, what: str, unit: str, doc: str, labels: Sequence[str] = (),
              buckets: Sequence[float] = LATENCY_BUCKETS) -> Histogram:
    """A histogram named ``blazil_<part>_<what>_<unit>`` (latency buckets by default)."""
    return _get_or_create(Histogram, _unreserved(metric_name(part, what, unit), "histogram"), doc, labels,
                          buckets=tuple(buckets))


def observe_many(hist: Histogram, values: np.ndarray | float, count: int | None = None) -> None:
    """Add many observations to an (unlabelled or labelled child) histogram at once: each of ``values`` (NaN and
    infinities skipped), or the one value ``values`` ``count`` times.

    prometheus_client observes one value per call; a chunk of 8189 scores would cost 8189 calls and lock
    round trips. This adds per-bucket counts instead, through the histogram's bucket and sum counters (not
    public API: the one place in the project that touches them).
    """
    bounds = np.asarray(hist._upper_bounds)
    if count is not None:
        i = int(np.searchsorted(bounds, float(values), side="left"))
        hist._buckets[i].inc(count)
        hist._sum.inc(float(values) * count)
        return
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return
    counts = np.bincount(np.searchsorted(bounds, v, side="left"), minlength=len(bounds))
    for i in np.flatnonzero(counts).tolist():
        hist._buckets[i].inc(int(counts[i]))
    hist._sum.inc(float(v.sum()))


def render() -> bytes:
    """The registry in Prometheus' text exposition format."""
    return generate_latest(REGISTRY)


class _Handler(MetricsHandler):
    """``/metrics`` (the registry), ``/healthz`` (``ok`` while the process serves), 404 for anything else."""

    registry = REGISTRY

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            super().do_GET()
        elif path == "/healthz":
            self._plain(200, b"ok\n")
        else:
            self._plain(404, b"not found: the metrics server answers /metrics and /healthz\n")

    def _plain(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class MetricsServer:
    """An HTTP server for ``/metrics`` and ``/healthz`` on a background thread; ``port=0`` picks a free port."""

    def __init__(self, port: int = 0, host: str = DEFAULT_HOST) -> None:
        if not 0 <= port <= 65535:
            raise ConfigError(f"metrics port {port} is not a port number (0-65535; 0 picks a free one)")
        try:
            self._httpd = ThreadingHTTPServer((host, port), _Handler)
        except OSError as e:
            why = "the port is in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
            raise ConfigError(f"cannot serve /metrics on {host}:{port}: {why}") from None
        self._httpd.daemon_threads = True
        self.host = host
        self.port: int = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="blazil-metrics",
                                        kwargs={"poll_interval": 0.5}, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        """The scrape address."""
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and release the port."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve(port: int = 0, host: str = DEFAULT_HOST) -> MetricsServer:
    """Start the /metrics exporter for this process and return it."""
    return MetricsServer(port, host)


__all__ = ["REGISTRY", "CONTENT_TYPE_LATEST", "DEFAULT_HOST", "LATENCY_BUCKETS", "MetricsServer", "counter", "gauge",
           "histogram", "metric_name", "observe_many", "render", "serve"]
