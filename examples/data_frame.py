"""Train a fraud classifier from a pandas DataFrame and write its predictions to Parquet.

A DataFrame enters the same features data set as a CSV or Parquet file (same columns, same batches); the
project's fraud model trains on it directly, and ``run_inference`` scores a second frame, writing
``predictions.parquet`` with the transaction ids and amounts kept next to the scores.

Run: python examples/data_frame.py [DIR]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from blazil_ai.datasets import Loader, open_dataset, simulate_transactions
from blazil_ai.models.fraud import train_fraud_model
from blazil_ai.models.infer import run_inference


def main(root: Path) -> None:
    history = pd.DataFrame(simulate_transactions(10_000, seed=0, fraud_rate=0.03))
    today = pd.DataFrame(simulate_transactions(3_000, seed=7, fraud_rate=0.03))
    print(f"history: {len(history)} rows, {history['is_fraud'].mean():.1%} fraud")

    # The frame straight into the loader: normalised numeric columns + one-hot categories, in numpy batches.
    ds = open_dataset("features", history)
    batch = next(iter(Loader(ds, batch_size=256, shuffle=True, seed=0)))
    print(f"loader batch: x {batch['x'].shape} {batch['x'].dtype}, y {batch['y'].shape}, "
          f"{ds.transform.n_features} features")

    # Train the project's fraud model on the frame (the transform is fitted on its first 80% of rows).
    model = train_fraud_model(history, root / "models", seed=0)
    print(f"trained {model}")

    # Score today's frame: once as a DataFrame, once written to Parquet with two input columns kept.
    scored = run_inference("fraud", today, model=model, progress=False, as_frame=True)
    out = root / "predictions.parquet"
    run_inference("fraud", today, model=model, out=out, keep=["transaction_id", "amount"], progress=False)
    predictions = pd.read_parquet(out)
    print(f"wrote {out.name}: {len(predictions)} rows, columns {list(predictions.columns)}")
    print(f"quality on today's labelled frame: {scored.attrs['summary'].get('quality')}")
    for row in predictions.sort_values("score", ascending=False).head(3).itertuples():
        print(f"  transaction {row.transaction_id}: amount {row.amount:9.2f}  score {row.score:.3f}  label {row.label}")
    assert np.array_equal(predictions["score"].to_numpy(), scored["score"].to_numpy())


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as d:
            main(Path(d))
