"""Features data set, the transaction simulator and the saved normalisation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from blazil_ai.datasets import FeatureTransform, open_dataset, simulate_transactions
from blazil_ai.datasets.csvtable import write_csv
from blazil_ai.datasets.transactions import CATEGORICAL_FEATURES, LABEL, NUMERIC_FEATURES
from blazil_ai.errors import DataError


def test_simulator_is_seeded_and_labels_fraud_patterns():
    a = simulate_transactions(4000, seed=3, fraud_rate=0.05)
    b = simulate_transactions(4000, seed=3, fraud_rate=0.05)
    c = simulate_transactions(4000, seed=4, fraud_rate=0.05)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["amount"], c["amount"])
    assert len(a["amount"]) == 4000 and a[LABEL].sum() == 200
    assert np.all(np.diff(a["timestamp"]) >= 0)
    fraud = a[LABEL] == 1
    assert set(np.unique(a["fraud_pattern"][fraud])) <= {"card_testing", "account_takeover", "high_value",
                                                          "mule_transfer"}
    assert set(np.unique(a["fraud_pattern"][~fraud])) == {"none"}
    # Card testing shows up as bursts: many transactions of the same account within the hour.
    testing = a["fraud_pattern"] == "card_testing"
    assert np.median(a["tx_count_1h"][testing]) > 2 > np.median(a["tx_count_1h"][~fraud])


def test_fraud_is_learnable_from_the_transform():
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    train = simulate_transactions(6000, seed=1, fraud_rate=0.04)
    test = simulate_transactions(2000, seed=2, fraud_rate=0.04)
    t = FeatureTransform.fit(train, numeric=NUMERIC_FEATURES, categorical=CATEGORICAL_FEATURES)
    model = LogisticRegression(max_iter=1000).fit(t.transform(train), train[LABEL])
    auc = roc_auc_score(test[LABEL], model.predict_proba(t.transform(test))[:, 1])
    assert auc > 0.9


@pytest.mark.parametrize("method", ["zscore", "minmax", "robust"])
def test_transform_fits_on_train_and_round_trips_through_json(tmp_path, method):
    cols = simulate_transactions(1000, seed=5)
    t = FeatureTransform.fit(cols, numeric=NUMERIC_FEATURES, categorical=CATEGORICAL_FEATURES, method=method)
    x = t.transform(cols)
    assert x.dtype == np.float32 and x.shape == (1000, t.n_features) == (1000, len(t.feature_names))
    if method == "zscore":
        assert np.allclose(x[:, 0].mean(), 0, atol=1e-4) and np.allclose(x[:, 0].std(), 1, atol=1e-3)
    if method == "minmax":
        assert x[:, 0].min() == pytest.approx(0) and x[:, 0].max() == pytest.approx(1)
    path = t.save(tmp_path / "t.json")
    again = FeatureTransform.load(path)
    assert np.array_equal(again.transform(cols), x)
    one = again.transform({k: v[7] for k, v in cols.items()})  # a single record, as a live scorer sends it
    assert np.array_equal(one[0], x[7])


def test_unseen_category_goes_to_other_slot():
    t = FeatureTransform.fit({"c": np.array(["a", "b", "a"]), "v": np.array([1.0, 2.0, 3.0])})
    x = t.transform({"c": ["zzz"], "v": [2.0]})
    assert x[0, t.feature_names.index("c=__other__")] == 1.0


def test_features_dataset_fits_on_train_split_only(tmp_path):
    cols = simulate_transactions(2000, seed=6)
    csv = write_csv(tmp_path / "tx.csv", cols)
    train = open_dataset("features", csv, transform=tmp_path / "tx.transform.json")  # asked for: saved there
    saved = json.loads((tmp_path / "tx.transform.json").read_text())
    assert saved["source"]["path"] == str(csv.resolve()) and len(saved["source"]["sha256"]) == 64
    n_train = int(2000 * 0.8)
    assert len(train) == n_train
    assert saved["center"][0] == pytest.approx(float(np.mean(cols["amount"][:n_train])), rel=1e-6)
    assert "transaction_id" not in saved["numeric"] and "fraud_pattern" not in saved["categorical"]
    val = open_dataset("features", csv, split="val", transform=tmp_path / "tx.transform.json")  # reloads it
    assert len(val) == 400 and val.transform.center == train.transform.center
    fitted = open_dataset("features", csv, split="val")  # no file: fitted on the same training rows in memory
    assert fitted.transform.center == train.transform.center
    batch = val.get_batch(np.arange(5))
    assert batch["x"].shape == (5, train.transform.n_features) and batch["y"].dtype == np.int64
    assert np.array_equal(batch["y"], cols[LABEL][n_train:n_train + 5])


def _bad_csv(tmp_path, body: str):
    p = tmp_path / "bad.csv"
    p.write_text("amount,channel,is_fraud\n" + body)
    return p


def test_wrong_field_count_names_file_and_line(tmp_path):
    p = _bad_csv(tmp_path, "1.0,pos,0\n2.0,online\n3.0,pos,1\n")
    with pytest.raises(DataError, match=r"bad\.csv, line 3: expected 3 fields, found 2"):
        open_dataset("features", p)


def test_non_numeric_value_names_line_and_field(tmp_path):
    p = _bad_csv(tmp_path, "1.0,pos,0\n2.0,online,0\nabc,pos,1\n")
    with pytest.raises(DataError, match=r"line 4, field 'amount': not a number: 'abc'"):
        open_dataset("features", p)


def test_skip_policy_counts_and_reports_bad_rows(tmp_path):
    p = _bad_csv(tmp_path, "1.0,pos,0\n2.0,online\n3.0,pos,1\nxyz,pos,0\n5,atm,0\n")
    ds = open_dataset("features", p, on_error="skip", val_fraction=0)
    assert len(ds) == 3
    s = ds.summary()["skipped"]
    assert s["count"] == 2 and s["first"][0].startswith("line 3") and "line 5" in s["first"][1]


def test_nan_policies(tmp_path):
    p = _bad_csv(tmp_path, "1.0,pos,0\nnan,online,0\n3.0,pos,1\ninf,atm,0\n")
    with pytest.raises(DataError, match=r"line 3, field 'amount': non-finite"):
        open_dataset("features", p, val_fraction=0)
    imputed = open_dataset("features", p, nan_policy="impute", val_fraction=0, refit=True)
    assert len(imputed) == 4 and np.all(np.isfinite(imputed.x))
    skipped = open_dataset("features", p, nan_policy="skip", val_fraction=0, refit=True)
    assert len(skipped) == 2 and skipped.summary()["skipped"]["count"] == 2


def test_column_without_finite_values_names_file_and_field(tmp_path):
    p = _bad_csv(tmp_path, "1e400,pos,0\nnan,online,1\n")
    with pytest.raises(DataError, match=r"bad\.csv: fitting the normalisation .* field 'amount': no finite values"):
        open_dataset("features", p, val_fraction=0)


def test_bad_transform_file(tmp_path):
    p = tmp_path / "t.json"
    p.write_text("{not json")
    with pytest.raises(DataError, match=r"t\.json, line 1: not valid JSON"):
        FeatureTransform.load(p)
    p.write_text('{"format": "something else"}')
    with pytest.raises(DataError, match="not a feature transform file"):
        FeatureTransform.load(p)
