"""Time series data set: hourly load windows (24 h in -> next 6 h out) and a least-squares forecaster.

Run: python examples/data_timeseries.py [DIR]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

from blazil_ai.datasets import Loader, make_samples, open_dataset


def main(root: Path) -> None:
    paths = make_samples(root, small=True)
    opts = {"input_length": 24, "horizon": 6, "stride": 1}
    norm = root / "series.norm.json"  # asked for by path: fitted on the training rows and saved there
    train = open_dataset("timeseries", paths["timeseries"], normalization=norm, refit=True, **opts)
    test = open_dataset("timeseries", paths["timeseries"], split="test", normalization=norm, **opts)
    print(f"train windows {len(train)}, test windows {len(test)}, inputs {train.inputs}")
    print(f"normalisation saved to {train.norm_path}")

    xs, ys = [], []
    for batch in Loader(train, batch_size=256, shuffle=True, seed=0):
        xs.append(batch["x"].reshape(len(batch["x"]), -1))
        ys.append(batch["y"][:, :, 0])
    x, y = np.concatenate(xs), np.concatenate(ys)
    coef, *_ = np.linalg.lstsq(np.c_[x, np.ones(len(x))], y, rcond=None)

    batch = test.get_batch(np.arange(len(test)))
    pred = np.c_[batch["x"].reshape(len(test), -1), np.ones(len(test))] @ coef
    err = np.abs(test.denormalize(pred[:, :, None]) - test.denormalize(batch["y"]))[:, :, 0]
    naive = np.abs(test.denormalize(batch["x"][:, -1:, -1:]) - test.denormalize(batch["y"]))[:, :, 0]
    for h in range(opts["horizon"]):
        print(f"t+{h + 1}h  MAE {err[:, h].mean():6.2f}   (repeat-last-value MAE {naive[:, h].mean():6.2f})")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as d:
            main(Path(d))
