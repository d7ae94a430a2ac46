"""``blazil infer --out`` as JSONL, CSV or Parquet with ``--keep``; Parquet and DataFrame inputs; ``as_frame=True``."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from blazil_ai.errors import ConfigError
from blazil_ai.models import commands
from blazil_ai.models.infer import run_inference


def blazil(*argv: object) -> int:
    parser = argparse.ArgumentParser(prog="blazil")
    commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from blazil_ai.datasets.samples import make_samples
    from blazil_ai.models.build import build_model

    root = tmp_path_factory.mktemp("samples")
    samples = make_samples(root, seed=0, small=True)
    out = tmp_path_factory.mktemp("models")
    build_model("fraud", root, out, seed=0)
    build_model("timeseries", root, out, seed=0)
    return samples, out


def test_fraud_out_jsonl_csv_parquet_same_records_with_keep(built, tmp_path):
    samples, models = built
    outs = {ext: tmp_path / f"p.{ext}" for ext in ("jsonl", "csv", "parquet")}
    for out in outs.values():
        assert blazil("infer", "--type", "fraud", "--model", models, samples["features"], "--out", out,
                      "--keep", "transaction_id", "--keep", "amount", "--keep", "channel") == 0
    js = pd.read_json(outs["jsonl"], lines=True)
    cs = pd.read_csv(outs["csv"])
    pa_t = pq.read_table(outs["parquet"])
    pqf = pa_t.to_pandas()
    assert list(pqf.columns) == ["row", "line", "score", "label", "transaction_id", "amount", "channel"]
    assert len(pqf) == 3000 and pa_t.schema.field("transaction_id").type == pa.int64()
    for other in (js, cs):
        np.testing.assert_allclose(other["score"], pqf["score"])
        assert other["transaction_id"].tolist() == pqf["transaction_id"].tolist()
        assert other["channel"].tolist() == pqf["channel"].tolist()
    src = pd.read_csv(samples["features"])
    assert pqf["transaction_id"].tolist() == src["transaction_id"].tolist()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_parquet_and_dataframe_inputs_score_like_csv(built, tmp_path):
    samples, models = built
    frame = pd.read_csv(samples["features"], float_precision="round_trip")
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp_path / "tx.parquet", row_group_size=700)
    ref = run_inference("fraud", samples["features"], model=models, progress=False, as_frame=True)
    from_parquet = run_inference("fraud", tmp_path / "tx.parquet", model=models, progress=False, as_frame=True,
                                 keep=["transaction_id"])
    from_frame = run_inference("fraud", frame, model=models, progress=False, as_frame=True)
    assert isinstance(ref, pd.DataFrame) and len(ref) == 3000
    assert ref.attrs["summary"]["quality"]["roc_auc"] > 0.9
    np.testing.assert_array_equal(from_parquet["score"], ref["score"])
    np.testing.assert_array_equal(from_frame["score"], ref["score"])
    assert "line" not in from_parquet.columns and from_parquet["transaction_id"].iloc[5] == 6


def test_timeseries_parquet_keeps_lists_and_the_forecast_row(built, tmp_path):
    samples, models = built
    out = tmp_path / "f.parquet"
    assert blazil("infer", "--type", "timeseries", "--model", models, samples["timeseries"], "--out", out,
                  "--keep", "timestamp", "--limit", "50") == 0
    t = pq.read_table(out)
    assert t.num_rows == 50 and pa.types.is_list(t.schema.field("forecast").type)
    src = pd.read_csv(samples["timeseries"])
    first = t.to_pylist()[0]
    # pyarrow reads ISO 8601 text as a timestamp: the kept column is typed
    assert pd.Timestamp(first["timestamp"]) == pd.Timestamp(src["timestamp"].iloc[first["start"] + 24])
    assert blazil("infer", "--type", "timeseries", "--model", models, samples["timeseries"], "--out",
                  tmp_path / "f.jsonl", "--keep", "timestamp", "--limit", "5") == 0
    line = json.loads((tmp_path / "f.jsonl").read_text().splitlines()[0])
    assert pd.Timestamp(line["timestamp"]) == pd.Timestamp(first["timestamp"])  # ISO 8601 in JSON


def test_bad_out_and_keep_are_named_and_write_nothing(built, tmp_path):
    samples, models = built
    with pytest.raises(ConfigError, match=r"--out .*p\.xlsx: unknown extension '\.xlsx'"):
        blazil("infer", "--type", "fraud", "--model", models, samples["features"], "--out", tmp_path / "p.xlsx")
    with pytest.raises(ConfigError, match=r"--keep nope: no such column"):
        blazil("infer", "--type", "fraud", "--model", models, samples["features"], "--out", tmp_path / "p.parquet",
               "--keep", "nope")
    (tmp_path / "dir").mkdir()
    with pytest.raises(ConfigError, match=r"--out .*dir:? is a folder"):
        blazil("infer", "--type", "fraud", "--model", models, samples["features"], "--out", tmp_path / "dir")
    (tmp_path / "dir").rmdir()
    with pytest.raises(ConfigError, match=r"--keep applies to table inputs"):
        blazil("infer", "--type", "audio", "--model", models, samples["audio"], "--keep", "x")
    assert list(tmp_path.iterdir()) == []


def test_dataframe_example_trains_and_writes_parquet(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "data_frame.py"
    res = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "wrote predictions.parquet: 3000 rows" in res.stdout
    t = pq.read_table(tmp_path / "predictions.parquet")
    assert t.column_names == ["row", "score", "label", "transaction_id", "amount"] and t.num_rows == 3000
