"""CSV, Parquet (file and directory of parts), Feather/Arrow, JSONL, DataFrame and pyarrow Table inputs: identical
batches for the same data, bad input named, and Parquet row groups served with bounded memory."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest

from blazil_ai.datasets import Loader, open_dataset
from blazil_ai.datasets.csvtable import write_csv
from blazil_ai.datasets.samples import build_tokenizer
from blazil_ai.datasets.transactions import simulate_transactions
from blazil_ai.errors import ConfigError, DataError


def _all_formats(tmp_path, csv, frame: pd.DataFrame) -> dict[str, object]:
    """The same table as CSV, Parquet, a directory of Parquet parts, Feather, Arrow IPC, JSONL, DataFrame, Table."""
    table = pa.Table.from_pandas(frame, preserve_index=False)
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=300)
    parts = tmp_path / "parts"
    parts.mkdir()
    half = len(frame) // 2
    pq.write_table(table.slice(0, half), parts / "part-0.parquet")
    pq.write_table(table.slice(half), parts / "part-1.parquet")
    feather.write_feather(table, tmp_path / "t.feather", chunksize=250)
    feather.write_feather(table, tmp_path / "t.arrow", compression="uncompressed")
    frame.to_json(tmp_path / "t.jsonl", orient="records", lines=True, double_precision=15)
    return {"csv": csv, "parquet": tmp_path / "t.parquet", "parts": parts, "feather": tmp_path / "t.feather",
            "arrow": tmp_path / "t.arrow", "jsonl": tmp_path / "t.jsonl", "frame": frame, "table": table}


def _same_batches(datasets: dict[str, object], n: int) -> None:
    ref_name, ref = next(iter(datasets.items()))
    want = [b for b in Loader(ref, batch_size=64, shuffle=True, seed=3)]  # type: ignore[arg-type]
    for name, ds in datasets.items():
        got = [b for b in Loader(ds, batch_size=64, shuffle=True, seed=3)]  # type: ignore[arg-type]
        assert len(got) == len(want), name
        for a, b in zip(want, got):
            assert a.keys() == b.keys()
            for k in a:
                assert a[k].dtype == b[k].dtype, (name, k)
                assert np.array_equal(a[k], b[k]), f"{name} differs from {ref_name} in {k!r}"
    assert sum(len(b["y"] if "y" in b else b["label"]) for b in want) == n


def test_features_identical_batches_across_formats(tmp_path):
    csv = write_csv(tmp_path / "t.csv", simulate_transactions(1500, seed=4))
    frame = pd.read_csv(csv, float_precision="round_trip")
    sources = _all_formats(tmp_path, csv, frame)
    datasets = {name: open_dataset("features", src, split="all", nan_policy="impute") for name, src in sources.items()}
    ref = datasets["csv"]
    for name, ds in datasets.items():
        assert ds.transform.feature_names == ref.transform.feature_names, name
        assert ds.transform.center == ref.transform.center and ds.transform.categories == ref.transform.categories
    _same_batches(datasets, 1500)
    assert datasets["parquet"].summary()["format"] == "parquet"
    assert list(tmp_path.glob("*.json")) == []  # nothing written next to the data


def test_timeseries_identical_batches_across_formats(tmp_path):
    hours = np.arange(300)
    stamps = pd.date_range("2025-01-01", periods=300, freq="h", tz="UTC")
    cols = {"timestamp": [s.strftime("%Y-%m-%dT%H:%M:%SZ") for s in stamps], "a": np.sin(hours / 5.0).round(6),
            "target": (np.cos(hours / 7.0) * 3).round(6)}
    csv = write_csv(tmp_path / "s.csv", cols)
    frame = pd.read_csv(csv, float_precision="round_trip")
    sources = _all_formats(tmp_path, csv, frame)
    typed = frame.assign(timestamp=stamps)  # a real timestamp column, as pandas users have it
    pq.write_table(pa.Table.from_pandas(typed, preserve_index=False), tmp_path / "typed.parquet")
    sources["typed"] = tmp_path / "typed.parquet"
    datasets = {name: open_dataset("timeseries", src, input_length=8, horizon=2) for name, src in sources.items()}
    _same_batches(datasets, len(datasets["csv"]))
    named = {name: open_dataset("timeseries", sources[name], features=["a"], input_length=8, horizon=2)
             for name in ("csv", "typed", "jsonl", "frame")}
    _same_batches(named, len(datasets["csv"]))


def test_text_identical_batches_across_formats(tmp_path):
    texts = [f"message {i} about {'cards' if i % 3 else 'refunds'}" for i in range(200)]
    labels = ["card" if i % 3 else "refund" for i in range(200)]
    csv = write_csv(tmp_path / "m.csv", {"text": texts, "label": labels})
    build_tokenizer(texts, tmp_path / "tokenizer.json", vocab_size=200)
    frame = pd.read_csv(csv)
    sources = _all_formats(tmp_path, csv, frame)
    datasets = {name: open_dataset("text", src, tokenizer=tmp_path / "tokenizer.json", max_length=16)
                for name, src in sources.items()}
    _same_batches(datasets, 200)


# -- bad input, named ---------------------------------------------------------------------------------------
def _parquet(tmp_path, name="bad.parquet", **cols):
    path = tmp_path / name
    pq.write_table(pa.table(cols), path)
    return path


def test_missing_and_wrongly_typed_columns_are_named(tmp_path):
    p = _parquet(tmp_path, amount=[1.0, 2.0], channel=["pos", "web"])
    with pytest.raises(DataError, match=r"bad\.parquet, field 'is_fraud': missing column\(s\) \['is_fraud'\]"):
        open_dataset("features", p)
    p = _parquet(tmp_path, amount=["1.5", "2"], is_fraud=[0, 1])
    with pytest.raises(DataError, match=r"field 'amount': column 'amount': expected a number, found string"):
        open_dataset("features", p, numeric=["amount"], categorical=[])


def test_truncated_and_corrupt_parquet_named(tmp_path):
    p = _parquet(tmp_path, amount=np.arange(100.0), is_fraud=np.zeros(100, dtype=np.int64))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 10])
    with pytest.raises(DataError, match=r"bad\.parquet: not a readable Parquet file: .*"):
        open_dataset("features", p)
    p.write_bytes(b"PAR1" + b"\x00" * 64)
    with pytest.raises(DataError, match=r"bad\.parquet: not a readable Parquet file"):
        open_dataset("features", p)
    # One flipped bit in a data page of a file written with page checksums (as the project writes Parquet).
    from blazil_ai.datasets.tabular import write_table

    write_table(p, {"amount": np.arange(100.0), "is_fraud": np.zeros(100, dtype=np.int64)})
    col = pq.ParquetFile(p).metadata.row_group(0).column(0)
    data = bytearray(p.read_bytes())
    start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
    data[start + col.total_compressed_size - 5] ^= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"bad\.parquet: cannot decode row group 0: .*CRC checksum"):
        open_dataset("features", p)


def test_nulls_named_by_row_and_nested_columns_by_name(tmp_path):
    p = _parquet(tmp_path, amount=pa.array([1.0, 2.0, None, 4.0]), is_fraud=[0, 1, 0, 1])
    with pytest.raises(DataError, match=r"bad\.parquet, row 2, field 'amount': non-finite value nan"):
        open_dataset("features", p, split="all", val_fraction=0.0)
    ok = open_dataset("features", p, split="all", val_fraction=0.0, nan_policy="skip")
    assert len(ok) == 3 and ok.skipped[0].line == 2
    p = _parquet(tmp_path, "nested.parquet", amount=[1.0, 2.0], tags=[["a"], ["b", "c"]], is_fraud=[0, 1])
    with pytest.raises(DataError, match=r"nested\.parquet, field 'tags': column 'tags' has the unsupported type list"):
        open_dataset("features", p)


def test_jsonl_bad_line_and_dataframe_errors(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text('{"amount": 1.0, "is_fraud": 0}\n\n{"amount": 2.0, "is_fraud": 1}\n{"amount": 3.0, "is_fraud": \n')
    with pytest.raises(DataError, match=r"t\.jsonl, line 4: not valid JSON"):
        open_dataset("features", p)
    p.write_text('{"amount": 1.0, "is_fraud": 0}\n\n{"amount": NaN, "is_fraud": 1}\n'.replace("NaN", "null"))
    with pytest.raises(DataError, match=r"t\.jsonl, line 3, field 'amount': non-finite value nan"):
        open_dataset("features", p, split="all", val_fraction=0.0)
    frame = pd.DataFrame({"amount": [1.0, None, 3.0], "is_fraud": [0, 1, 0]})
    with pytest.raises(DataError, match=r"<pandas\.DataFrame>, row 1, field 'amount': non-finite value nan"):
        open_dataset("features", frame, split="all", val_fraction=0.0)
    with pytest.raises(DataError, match=r"cannot tell the format from the extension '\.txt'"):
        open_dataset("features", tmp_path / "x.txt")


def test_cli_inspect_parquet_and_bad_parquet(tmp_path):
    csv = write_csv(tmp_path / "t.csv", simulate_transactions(300, seed=1))
    pq.write_table(pa.Table.from_pandas(pd.read_csv(csv), preserve_index=False), tmp_path / "t.parquet")
    ok = subprocess.run([sys.executable, "-m", "blazil_ai", "data", "inspect", "--type", "features", "--json",
                         str(tmp_path / "t.parquet")], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert '"format": "parquet"' in ok.stdout and '"samples": 240' in ok.stdout
    (tmp_path / "broken.parquet").write_bytes((tmp_path / "t.parquet").read_bytes()[:500])
    bad = subprocess.run([sys.executable, "-m", "blazil_ai", "data", "inspect", "--type", "features",
                          str(tmp_path / "broken.parquet")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and re.match(r"blazil data [a-z-]+: error: ", lines[0]) and "broken.parquet" in lines[0]
    assert "Traceback" not in bad.stderr


# -- row groups ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def big_parquet(tmp_path_factory):
    """120k transactions in 50 row groups: a decoded size well above the 4 MiB budget the tests use."""
    d = tmp_path_factory.mktemp("rg")
    cols = simulate_transactions(120_000, seed=9)
    table = pa.table({k: v for k, v in cols.items()})
    path = d / "big.parquet"
    pq.write_table(table, path, row_group_size=2400)
    return path, table


BUDGET = 4 << 20


def test_row_groups_bounded_memory_same_rows(big_parquet):
    path, table = big_parquet
    assert table.nbytes > 4 * BUDGET
    whole = open_dataset("features", path, split="all")
    streamed = open_dataset("features", path, split="all", memory_budget=BUDGET)
    assert streamed.blocks is not None and len(streamed.blocks) == 51 and len(streamed) == len(whole)
    assert streamed.transform.center == whole.transform.center
    assert streamed.transform.categories == whole.transform.categories
    pool_base, pool_peak = pa.total_allocated_bytes(), 0
    seen = []
    with Loader(streamed, batch_size=512, shuffle=True, seed=1) as loader:
        for batch in loader:
            ref = whole.get_batch(batch["index"])
            assert np.array_equal(batch["x"], ref["x"]) and np.array_equal(batch["y"], ref["y"])
            seen.append(batch["index"])
            pool_peak = max(pool_peak, pa.total_allocated_bytes())
    order = np.concatenate(seen)
    assert np.array_equal(np.sort(order), np.arange(len(whole)))  # every row once
    assert not np.array_equal(order, np.arange(len(whole)))  # shuffled
    assert streamed.peak_cache_bytes <= BUDGET // 4
    assert pool_peak - pool_base <= BUDGET  # decoded Arrow data of one row group at a time
    # Row groups come whole: each batch of 512 needs at most two of them.
    for idx in seen:
        assert len(np.unique(np.searchsorted(streamed.blocks, idx, side="right"))) <= 2


def test_row_groups_skip_policy_matches_memory(big_parquet, tmp_path):
    _, table = big_parquet
    part = table.slice(0, 20_000)
    amount = part.column("amount").to_numpy().copy()
    holes = np.array([5, 1999, 2000, 7777, 19_999])
    mask = np.zeros(len(amount), dtype=bool)
    mask[holes] = True
    part = part.set_column(part.schema.get_field_index("amount"), "amount", pa.array(amount, mask=mask))
    pq.write_table(part, tmp_path / "holes.parquet", row_group_size=1000)
    whole = open_dataset("features", tmp_path / "holes.parquet", split="val", nan_policy="skip")
    streamed = open_dataset("features", tmp_path / "holes.parquet", split="val", nan_policy="skip",
                            memory_budget=1 << 20)
    assert streamed.blocks is not None and len(streamed) == len(whole) == (20_000 - 5) - int((20_000 - 5) * 0.8)
    assert [r.line for r in streamed.skipped] == holes.tolist() == [r.line for r in whole.skipped]
    idx = np.arange(len(whole))
    assert np.array_equal(streamed.get_batch(idx)["x"], whole.get_batch(idx)["x"])
    rows = streamed.row_names(streamed.get_batch(idx)["index"])
    assert np.array_equal(rows, whole.row_names(whole.get_batch(idx)["index"]))


def test_row_group_larger_than_the_budget_is_refused(big_parquet, tmp_path):
    _, table = big_parquet
    pq.write_table(table, tmp_path / "fat.parquet", row_group_size=60_000)
    with pytest.raises(ConfigError, match=r"fat\.parquet: row group 0 \(60000 rows\) decodes to about .* MiB, more "
                                          r"than half of memory_budget=4\.0 MiB"):
        open_dataset("features", tmp_path / "fat.parquet", memory_budget=BUDGET)


def test_row_groups_shard_and_resume(big_parquet):
    path, _ = big_parquet
    ds = open_dataset("features", path, split="train", memory_budget=BUDGET)
    shares = [np.concatenate([b["index"] for b in Loader(ds, batch_size=1000, shuffle=True, seed=5, rank=r,
                                                           world_size=2)]) for r in range(2)]
    assert len(shares[0]) == len(shares[1]) == len(ds) // 2
    assert np.array_equal(np.sort(np.concatenate(shares)), np.arange(len(ds)))
    groups = [set(np.searchsorted(ds.blocks, s, side="right").tolist()) for s in shares]
    assert len(groups[0] & groups[1]) <= 1  # each rank reads its own row groups (one may straddle)
    loader = Loader(ds, batch_size=700, shuffle=True, seed=2)
    for _ in range(5):
        loader.next()
    state = loader.get_state()
    want = loader.next()["index"]
    loader.close()
    again = Loader(open_dataset("features", path, split="train", memory_budget=BUDGET), batch_size=700,
                   shuffle=True, seed=2)
    again.reset(state)
    assert np.array_equal(again.next()["index"], want)
    again.close()
    in_memory = Loader(open_dataset("features", path, split="train"), batch_size=700, shuffle=True, seed=2)
    with pytest.raises(ConfigError, match=r"order='row_groups:40','rows'"):  # another order: refused, not resumed
        in_memory.reset(state)


def test_row_groups_peak_rss_within_budget(tmp_path):
    """In a fresh process: RSS growth while fitting on and streaming a Parquet file whose decoded size is 4x the
    budget stays within 1.5x the budget (imports warmed up first, so the growth is the data's)."""
    script = f"""
import numpy as np, psutil, pyarrow as pa, pyarrow.parquet as pq
from blazil_ai.datasets import Loader, open_dataset
rng = np.random.default_rng(0)
budget = 16 << 20
def write(path, rows, group):
    cols = {{f"f{{j}}": rng.normal(size=rows) for j in range(30)}}
    cols["kind"] = np.array(["a", "b", "c"])[rng.integers(0, 3, rows)]
    cols["is_fraud"] = (rng.random(rows) < 0.05).astype(np.int64)
    t = pa.table(cols)
    pq.write_table(t, path, row_group_size=group)
    return t.nbytes
write({str(tmp_path / "small.parquet")!r}, 4000, 500)
for b in Loader(open_dataset("features", {str(tmp_path / "small.parquet")!r}, memory_budget=1 << 20), batch_size=256,
                shuffle=True):
    pass
decoded = write({str(tmp_path / "big.parquet")!r}, 300_000, 10_000)
proc = psutil.Process()
base = proc.memory_info().rss
ds = open_dataset("features", {str(tmp_path / "big.parquet")!r}, memory_budget=budget)
peak = proc.memory_info().rss
for b in Loader(ds, batch_size=1024, shuffle=True, seed=0):
    peak = max(peak, proc.memory_info().rss)
print(decoded, budget, peak - base, len(ds.blocks) - 1)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    decoded, budget, grown, groups = (int(v) for v in out.stdout.split())
    assert decoded >= 4 * budget and groups == 24
    assert grown <= 1.5 * budget, f"RSS grew by {grown / 2**20:.1f} MiB for a {budget / 2**20:.0f} MiB budget"


def test_pandas_and_pyarrow_are_imported_only_when_used():
    code = ("import sys, blazil_ai.cli; blazil_ai.cli.build_parser(); import blazil_ai.pipeline, "
            "blazil_ai.datasets.features, blazil_ai.datasets.timeseries, blazil_ai.datasets.text, "
            "blazil_ai.models.infer; print(sorted(m for m in ('pandas', 'pyarrow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
