"""Time series windows: shapes, splits, normalisation saved from the training split, gaps and missing values."""

from __future__ import annotations

import json

import numpy as np
import pytest

from blazil_ai.datasets import open_dataset
from blazil_ai.datasets.csvtable import write_csv
from blazil_ai.errors import DataError


def _series(tmp_path, n=100, drop=(), blank=(), name="s.csv"):
    t = 1_700_000_000 + 3600 * np.arange(n)
    a = np.arange(n, dtype=np.float64)
    cols = {"timestamp": t.astype(np.float64), "a": a, "target": 2 * a}
    keep = np.setdiff1d(np.arange(n), drop)
    cols = {k: v[keep] for k, v in cols.items()}
    p = write_csv(tmp_path / name, cols)
    if blank:
        lines = p.read_text().splitlines()
        for i in blank:  # blank out column "a" of data row i (file line i + 2)
            f = lines[i + 1].split(",")
            f[1] = ""
            lines[i + 1] = ",".join(f)
        p.write_text("\n".join(lines) + "\n")
    return p


def test_windows_and_time_splits(tmp_path):
    p = _series(tmp_path)
    ds = open_dataset("timeseries", p, input_length=5, horizon=2, stride=3)
    assert ds.inputs == ["a", "target"]
    b = ds.get_batch(np.arange(len(ds)))
    assert b["x"].shape == (len(ds), 5, 2) and b["y"].shape == (len(ds), 2, 1)
    assert b["start"].tolist() == list(range(0, 70 - 7 + 1, 3))  # train = first 70 rows, window span 7
    raw = ds.denormalize(b["y"])[:, :, 0]
    assert np.allclose(raw[:, 0], 2 * (b["start"] + 5), atol=1e-3)
    test = open_dataset("timeseries", p, input_length=5, horizon=2, split="test")
    assert test.get_batch(np.arange(1))["start"][0] == 85


def test_normalisation_fitted_on_train_only_and_reloaded(tmp_path):
    p = _series(tmp_path)
    open_dataset("timeseries", p)
    assert not p.with_name("s.norm.json").exists()  # nothing written unless asked for
    open_dataset("timeseries", p, normalization=p.with_name("s.norm.json"))
    saved = json.loads(p.with_name("s.norm.json").read_text())
    assert saved["columns"] == ["a", "target"] and saved["source"]["path"] == str(p.resolve())
    assert saved["mean"][0] == pytest.approx(np.arange(70).mean())
    val = open_dataset("timeseries", p, split="val", input_length=3, normalization=p.with_name("s.norm.json"))
    assert val.mean[0] == pytest.approx(np.arange(70).mean())
    assert open_dataset("timeseries", p, split="val", input_length=3).mean[0] == pytest.approx(np.arange(70).mean())


def test_gap_policy(tmp_path):
    p = _series(tmp_path, drop=(30, 31))
    with pytest.raises(DataError, match=r"s\.csv, line 32, field 'timestamp': gap in the series"):
        open_dataset("timeseries", p)
    ds = open_dataset("timeseries", p, gaps="split", input_length=4, split="all")
    starts = ds.starts
    assert ds.gaps_found == 1 and not np.any((starts < 30) & (starts + 5 > 30))


def test_missing_value_policies(tmp_path):
    p = _series(tmp_path, blank=(10,))
    with pytest.raises(DataError, match=r"line 12, field 'a': missing or non-finite"):
        open_dataset("timeseries", p)
    ff = open_dataset("timeseries", p, missing="ffill", split="all", refit=True)
    raw_ff = ff.values[10, 0] * ff.std[0] + ff.mean[0]
    assert raw_ff == pytest.approx(9.0, abs=1e-3)
    it = open_dataset("timeseries", p, missing="interpolate", split="all", refit=True)
    assert it.values[10, 0] * it.std[0] + it.mean[0] == pytest.approx(10.0, abs=1e-3)
    assert it.summary()["missing_filled"] == 1


def test_bad_timestamps_and_values(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("timestamp,a,target\n2025-01-01T00:00:00Z,1,2\n2025-01-01T01:00:00Z,1,2\n2025-01-01T01:00:00Z,1,2\n")
    with pytest.raises(DataError, match=r"line 4, field 'timestamp': timestamp does not increase"):
        open_dataset("timeseries", p)
    p.write_text("timestamp,a,target\nyesterday,1,2\n2025-01-01T01:00:00Z,1,2\n2025-01-01T02:00:00Z,1,2\n")
    with pytest.raises(DataError, match=r"line 2, field 'timestamp': not a timestamp"):
        open_dataset("timeseries", p)
    p.write_text("timestamp,a,target\n1,1,2\n2,x,2\n3,1,2\n")
    with pytest.raises(DataError, match=r"line 3, field 'a': not a number: 'x'"):
        open_dataset("timeseries", p)
