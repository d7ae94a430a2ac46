"""Time series forecaster: train a ridge forecaster, compare it with the naive last-value forecast.

Run: python examples/model_timeseries.py [OUT_DIR]
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from blazil_ai.datasets import Loader, make_samples, open_dataset
from blazil_ai.models.timeseries import Forecaster, train_forecaster


def main(out: Path) -> None:
    series = make_samples(out / "samples", small=True)["timeseries"]
    model = train_forecaster(series, out / "models")
    m = json.loads(model.with_name("timeseries.metrics.json").read_text())
    print(f"test split: model MAE {m['mae']:.3f} vs naive last-value MAE {m['naive_mae']:.3f} "
          f"({m['improvement_vs_naive']:.0%} lower)")
    fc = Forecaster.load(model, backend="tract")  # the same graph runs on tract
    ds = open_dataset("timeseries", series, split="test", normalization=model.with_name("timeseries.norm.json"))
    batch = next(iter(Loader(ds, batch_size=5)))
    pred = fc.predict(batch["x"])[:, 0, 0]
    actual = ds.denormalize(batch["y"])[:, 0, 0]
    for p, a in zip(pred, actual):
        print(f"  next hour load: forecast {p:7.2f}  actual {a:7.2f}")
    print(f"  mean abs error on these 5: {np.abs(pred - actual).mean():.3f}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
