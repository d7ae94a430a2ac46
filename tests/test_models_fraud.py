"""The fraud model: trained on the simulator's features, exported with skl2onnx, scored by both engines."""

from __future__ import annotations

import json

import numpy as np
import pytest

from blazil_ai.errors import DataError
from blazil_ai.models.fraud import FraudScorer, train_fraud_model
from blazil_ai.models.session import Session


@pytest.fixture(scope="module")
def features_csv(tmp_path_factory):
    from blazil_ai.datasets.samples import _write_features

    return _write_features(tmp_path_factory.mktemp("samples"), seed=0, n=4000)


@pytest.fixture(scope="module")
def fraud_dir(features_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("models")
    train_fraud_model(features_csv, out, seed=0)
    return out


def test_training_writes_model_norm_and_held_out_metrics(fraud_dir):
    assert {p.name for p in fraud_dir.iterdir()} >= {"fraud.onnx", "fraud.norm.json", "fraud.metrics.json"}
    m = json.loads((fraud_dir / "fraud.metrics.json").read_text())
    held = m["held_out"]
    assert m["rows"]["held_out"] == 800 and m["rows"]["held_out_positives"] > 5
    # The simulator's fraud patterns are learnable: well above chance on rows the model never saw.
    assert held["roc_auc"] > 0.95
    assert 0 < held["precision"] <= 1 and 0 < held["recall"] <= 1
    assert m["max_abs_diff_onnx_vs_sklearn"] < 1e-5


def test_scorer_scores_raw_columns_and_matrices(fraud_dir, features_csv):
    from blazil_ai.datasets.csvtable import read_csv

    scorer = FraudScorer.load(fraud_dir)
    cols = read_csv(features_csv).columns
    x = scorer.features(cols)
    assert x.dtype == np.float32 and x.shape == (4000, scorer.n_features)
    p = scorer.score(x)
    assert p.dtype == np.float32 and p.shape == (4000,) and np.all((p >= 0) & (p <= 1))
    np.testing.assert_array_equal(scorer.score_columns(cols), p)
    y = cols["is_fraud"].astype(int)
    assert p[y == 1].mean() > 0.5 > p[y == 0].mean()
    assert scorer.feature_names[:2] == ["amount", "hour"]
    assert scorer.score(np.zeros((0, scorer.n_features), np.float32)).shape == (0,)


def test_scorer_rejects_wrong_matrices(fraud_dir):
    scorer = FraudScorer.load(fraud_dir)
    with pytest.raises(DataError, match="float32, got float64"):
        scorer.score(np.zeros((3, scorer.n_features)))
    with pytest.raises(DataError, match=rf"\[n, {scorer.n_features}\], got \[3, 5\]"):
        scorer.score(np.zeros((3, 5), np.float32))
    with pytest.raises(DataError, match="column 'amount' missing"):
        scorer.features({"hour": [1.0]})


def test_mlp_fraud_model_same_on_tract(fraud_dir):
    x = np.random.default_rng(0).normal(size=(257, FraudScorer.load(fraud_dir).n_features)).astype(np.float32)
    a = FraudScorer.load(fraud_dir).score(x)
    b = FraudScorer.load(fraud_dir, backend="tract").score(x)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_logreg_parity_and_gbt_clear_tract_error(features_csv, tmp_path):
    lr = train_fraud_model(features_csv, tmp_path / "lr", kind="logreg")
    x = FraudScorer.load(lr).features({**_one_row()})
    np.testing.assert_allclose(FraudScorer.load(lr).score(x), FraudScorer.load(lr, backend="tract").score(x),
                               atol=1e-5)
    gbt = train_fraud_model(features_csv, tmp_path / "gbt", kind="gbt")
    assert FraudScorer.load(gbt).score(x).shape == (1,)
    # tract has no full TreeEnsembleClassifier support: the error names the model file and the operator.
    with pytest.raises(DataError, match=r"fraud\.onnx: tract cannot run this model: .*TreeEnsembleClassifier"):
        Session(gbt, backend="tract")


def test_training_data_without_both_classes_is_rejected(tmp_path):
    from blazil_ai.datasets.csvtable import write_csv
    from blazil_ai.datasets.transactions import simulate_transactions

    cols = simulate_transactions(300, seed=1, fraud_rate=0.0)
    path = write_csv(tmp_path / "clean.csv", cols)
    with pytest.raises(DataError, match=r"clean\.csv.*needs labels 0 and 1.*is_fraud"):
        train_fraud_model(path, tmp_path / "m")


def _one_row() -> dict:
    return {"amount": [4200.0], "hour": [3.0], "is_foreign": [1.0], "is_new_device": [1.0], "tx_count_1h": [0.0],
            "tx_count_24h": [1.0], "amount_sum_24h": [30.0], "amount_ratio": [40.0], "seconds_since_last": [50000.0],
            "merchant_category": ["jewelry"], "channel": ["online"], "device": ["web"], "country": ["NG"]}
