"""The metrics core: one Prometheus registry for the whole process, named helpers, a /metrics exporter.

Names follow ``blazil_<part>_<what>_<unit>`` (Prometheus appends ``_total`` to counters). Creating a
metric twice with the same name returns the first one, so libraries can declare their metrics at the
point of use without coordinating.

>>> c = counter("docs", "examples", "total", "Examples run")
>>> c.inc()
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from http.server import ThreadingHTTPServer
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST, MetricsHandler

REGISTRY = CollectorRegistry(auto_describe=True)
_NAME_PART = re.compile(r"^[a-z][a-z0-9_]*$")
_lock = threading.Lock()
_metrics: dict[str, Any] = {}

# Latency buckets from 10 us to 10 s: wide enough for a ring-buffer hop and a 7B prefill alike.
LATENCY_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2,
                   0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

M = TypeVar("M", Counter, Gauge, Histogram)


def metric_name(part: str, what: str, unit: str) -> str:
    """Return ``blazil_<part>_<what>_<unit>``, checking each piece is a lower-case Prometheus name."""
    for label, piece in (("part", part), ("what", what), ("unit", unit)):
        if not _NAME_PART.match(piece):
            raise ValueError(f"metric {label} {piece!r} must match {_NAME_PART.pattern}")
    # A counter counted in plain events has unit "total"; prometheus_client adds that suffix itself.
    return f"blazil_{part}_{what}" if unit == "total" else f"blazil_{part}_{what}_{unit}"


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


def gauge(part: str, what: str, unit: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
    """A gauge named ``blazil_<part>_<what>_<unit>`` in the shared registry."""
    return _get_or_create(Gauge, metric_name(part, what, unit), doc, labels)


def histogram(part: str, what: str, unit: str, doc: str, labels: Sequence[str] = (),
              buckets: Sequence[float] = LATENCY_BUCKETS) -> Histogram:
    """A histogram named ``blazil_<part>_<what>_<unit>`` (latency buckets by default)."""
    return _get_or_create(Histogram, metric_name(part, what, unit), doc, labels, buckets=tuple(buckets))


def render() -> bytes:
    """The registry in Prometheus' text exposition format."""
    return generate_latest(REGISTRY)


class MetricsServer:
    """An HTTP server for ``/metrics`` on a background thread; ``port=0`` picks a free port."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1") -> None:
        handler = MetricsHandler.factory(REGISTRY)
        self._httpd = ThreadingHTTPServer((host, port), handler)
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


def serve(port: int = 0, host: str = "127.0.0.1") -> MetricsServer:
    """Start the /metrics exporter for this process and return it."""
    return MetricsServer(port, host)


__all__ = ["REGISTRY", "CONTENT_TYPE_LATEST", "LATENCY_BUCKETS", "MetricsServer", "counter", "gauge",
           "histogram", "metric_name", "render", "serve"]
