"""The /metrics exporter: address, process metrics, health check, 404s, and names that follow Prometheus."""

from __future__ import annotations

import importlib
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from blazil_ai import metrics
from blazil_ai.errors import ConfigError


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_metrics_healthz_and_404():
    with metrics.serve(0) as ms:
        base = f"http://127.0.0.1:{ms.port}"
        status, text = get(f"{base}/metrics")
        assert status == 200
        for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds",
                     "process_start_time_seconds", "python_info"):
            assert name in text
        assert get(f"{base}/healthz") == (200, "ok\n")
        assert get(f"{base}/")[0] == 404
        assert get(f"{base}/metricz")[0] == 404


def test_metrics_host_is_chosen():
    with metrics.serve(0, host="0.0.0.0") as ms:
        assert ms.host == "0.0.0.0"
        assert get(f"http://127.0.0.1:{ms.port}/healthz")[0] == 200
        # reachable on an address of this host other than loopback, where it has one
        try:
            addr = socket.gethostbyname(socket.gethostname())
        except OSError:
            addr = None
        if addr and not addr.startswith("127."):
            assert get(f"http://{addr}:{ms.port}/healthz")[0] == 200


def test_every_server_command_takes_metrics_host():
    for cmd in (["serve"], ["ledger", "serve"], ["stage"], ["demo"]):
        out = subprocess.run([sys.executable, "-m", "blazil_ai", *cmd, "--help"], capture_output=True, text=True,
                             timeout=60)
        assert "--metrics-host" in out.stdout, cmd


def test_a_busy_port_is_named_as_the_metrics_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"cannot serve /metrics on 127.0.0.1:{port}: the port is in use"):
            metrics.serve(port)


def test_gauges_and_histograms_avoid_reserved_suffixes():
    for mod in ("blazil_ai.fraud.service", "blazil_ai.transport.tcp", "blazil_ai.models.batcher",
                "blazil_ai.pipeline.stage", "blazil_ai.ledger.server", "blazil_ai.transport.rpc"):
        importlib.import_module(mod)
    kinds = {}
    for family in metrics.REGISTRY.collect():
        kinds[family.name] = family.type
    gauges = [n for n, t in kinds.items() if t == "gauge" and n.startswith("blazil_")]
    assert "blazil_fraud_reviews_pending" in gauges and "blazil_pipeline_stage_sequences" in gauges
    bad = [n for n in gauges if n.endswith(metrics.RESERVED_SUFFIXES)]
    assert bad == []
    with pytest.raises(ValueError, match="reserves"):
        metrics.gauge("test", "things", "count", "a count of things")
    with pytest.raises(ValueError, match="reserves"):
        metrics.histogram("test", "sizes", "bucket", "sizes")
    assert metrics.gauge("test", "things", "", "a count of things")._name == "blazil_test_things"


def test_observe_many_counts_as_one_observe_per_value():
    import numpy as np

    one = metrics.histogram("docs", "one_by_one", "ratio", "Observed one at a time", buckets=(0.1, 0.5, 1.0))
    many = metrics.histogram("docs", "all_at_once", "ratio", "Observed at once", buckets=(0.1, 0.5, 1.0))
    values = np.array([0.05, 0.1, 0.3, 0.5, 0.7, 2.0, np.nan, np.inf], dtype=np.float32)
    for v in values[np.isfinite(values)].tolist():
        one.observe(v)
    for _ in range(3):
        one.observe(0.25)
    metrics.observe_many(many, values)  # NaN and infinity are skipped
    metrics.observe_many(many, 0.25, 3)

    def samples(name: str) -> list[tuple[str, float]]:
        fam = [f for f in metrics.REGISTRY.collect() if f.name == name][0]
        return [(s.name.rsplit("_", 1)[-1] + str(s.labels), s.value) for s in fam.samples if "created" not in s.name]

    got, want = samples("blazil_docs_all_at_once_ratio"), samples("blazil_docs_one_by_one_ratio")
    assert [k for k, _ in got] == [k for k, _ in want] and len(got) == 6
    assert np.allclose([v for _, v in got], [v for _, v in want])
