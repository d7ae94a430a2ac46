"""Features data set: simulated transactions -> normalised matrix -> a fraud classifier, transform saved for inference.

Run: python examples/data_features.py [DIR]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

from blazil_ai.datasets import FeatureTransform, Loader, make_samples, open_dataset, simulate_transactions


def main(root: Path) -> None:
    paths = make_samples(root, small=True)
    saved = root / "transactions.transform.json"  # asked for by path: fitted on the training rows, saved there
    train = open_dataset("features", paths["features"], method="robust", transform=saved, refit=True)
    val = open_dataset("features", paths["features"], split="val", transform=saved)  # reloads it (fingerprint checked)
    print(f"train {len(train)} rows, val {len(val)} rows, {train.transform.n_features} features")
    print(f"transform saved to {train.transform_path}")

    # A logistic regression trained by plain minibatch SGD over the loader's numpy batches.
    w = np.zeros(train.transform.n_features, dtype=np.float32)
    b = 0.0
    loader = Loader(train, batch_size=128, shuffle=True, seed=0)
    for epoch in range(5):
        for batch in loader:
            p = 1 / (1 + np.exp(-(batch["x"] @ w + b)))
            g = p - batch["y"]
            w -= 0.5 * batch["x"].T @ g / len(g)
            b -= 0.5 * float(g.mean())
        print(f"epoch {epoch}: loader state {loader.state_dict()['epoch']}")
    p_val = 1 / (1 + np.exp(-(val.x @ w + b)))
    order = np.argsort(-p_val)
    top = val.y[order[: max(1, int(val.y.sum()))]]
    print(f"val: {int(val.y.sum())} frauds, precision among the top-scored = {top.mean():.2f}")

    # Inference side: reload the transform and score a fresh live record.
    t = FeatureTransform.load(train.transform_path)
    live = simulate_transactions(5, seed=99, fraud_rate=0.2)
    print("live scores:", np.round(1 / (1 + np.exp(-(t.transform(live) @ w + b))), 3), "labels:", live["is_fraud"])


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as d:
            main(Path(d))
