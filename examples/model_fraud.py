"""Fraud model: train on simulated transactions, report held-out quality, score a fresh stream.

Run: python examples/model_fraud.py [OUT_DIR]
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from blazil_ai.datasets import make_samples, simulate_transactions
from blazil_ai.models.fraud import FraudScorer, train_fraud_model


def main(out: Path) -> None:
    data = make_samples(out / "samples")["features"]  # 50,000 simulated transactions
    model = train_fraud_model(data, out / "models", seed=0)
    held_out = json.loads(model.with_name("fraud.metrics.json").read_text())["held_out"]
    print(f"trained {model}: held-out " + ", ".join(f"{k}={v:.3f}" for k, v in held_out.items()))

    scorer = FraudScorer.load(model)
    stream = simulate_transactions(20_000, seed=42, fraud_rate=0.03)  # a day the model never saw
    t0 = time.perf_counter()
    p = scorer.score_columns(stream)
    el = time.perf_counter() - t0
    y = stream["is_fraud"]
    flagged = p >= 0.5
    print(f"scored {len(p)} transactions in {el * 1e3:.1f} ms (features + model); flagged {int(flagged.sum())}, "
          f"of which fraud {int((flagged & (y == 1)).sum())}; fraud missed {int((~flagged & (y == 1)).sum())}")
    worst = np.argsort(-p)[:3]
    for i in worst:
        print(f"  p={p[i]:.3f} amount={stream['amount'][i]:.2f} {stream['merchant_category'][i]} "
              f"{stream['country'][i]} pattern={stream['fraud_pattern'][i]}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
