"""The forecaster beats the naive last-value forecast on held-out windows, and runs the same on tract."""

from __future__ import annotations

import json

import numpy as np
import pytest

from blazil_ai.errors import DataError
from blazil_ai.models.session import Session
from blazil_ai.models.timeseries import Forecaster, train_forecaster


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    from blazil_ai.datasets.samples import _write_timeseries

    return _write_timeseries(tmp_path_factory.mktemp("samples"), np.random.default_rng([0, 2]), 3000)


@pytest.fixture(scope="module")
def model(series, tmp_path_factory):
    return train_forecaster(series, tmp_path_factory.mktemp("models"))


def test_beats_naive_on_the_test_split(model):
    m = json.loads((model.parent / "timeseries.metrics.json").read_text())
    assert m["windows"]["test"] > 400
    assert m["mae"] < 0.8 * m["naive_mae"]
    assert m["rmse"] < m["naive_rmse"]
    assert (model.parent / "timeseries.norm.json").is_file()


def test_tract_parity_and_units(model, series):
    from blazil_ai.datasets.timeseries import TimeSeriesDataset

    ds = TimeSeriesDataset(series, split="test", normalization=model.parent / "timeseries.norm.json")
    x = ds.get_batch(np.arange(50))["x"]
    a = Session(model).run({"x": x})[0]
    b = Session(model, backend="tract").run({"x": x})[0]
    assert a.shape == (50, 1, 1)
    np.testing.assert_allclose(a, b, atol=1e-5)
    f = Forecaster.load(model).predict(x)
    np.testing.assert_allclose(f, ds.denormalize(a), rtol=1e-6)
    assert 50 < float(f.mean()) < 150  # the sample load is ~100 units


def test_wrong_window_is_rejected(model):
    with pytest.raises(DataError, match=r"field 'x': axis 1 must be 24"):
        Session(model).run({"x": np.zeros((2, 12, 4), np.float32)})


def test_too_short_series_is_rejected(tmp_path):
    from blazil_ai.datasets.samples import _write_timeseries

    short = _write_timeseries(tmp_path, np.random.default_rng(1), 80)
    with pytest.raises(DataError, match=r"series\.csv.*split has only \d+ windows"):
        train_forecaster(short, tmp_path / "m")
