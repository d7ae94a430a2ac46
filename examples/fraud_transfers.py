"""Fraud-scored transfers in process: train the model, stream simulated transactions, review, query.

Run: python examples/fraud_transfers.py [WORK_DIR]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

from blazil_ai.datasets.samples import _write_features
from blazil_ai.fraud import FraudService, Outcome
from blazil_ai.fraud.simulate import open_accounts, push_stream, simulated_requests
from blazil_ai.models.fraud import train_fraud_model


def main(work: Path) -> None:
    model = train_fraud_model(_write_features(work, seed=0, n=20_000), work / "models", seed=0)
    req, cols = simulated_requests(50_000, seed=3, fraud_rate=0.02)  # transactions the model never saw
    with FraudService(work / "service", model, review_at=0.5, reject_at=0.9, review_timeout_s=600) as svc:
        open_accounts(svc.ledger, req)
        outcome, score, wall, _ = push_stream(svc.submit, req)
        counts = {o.name.lower(): int((outcome == o.value).sum()) for o in Outcome}
        fraud = cols["is_fraud"] == 1
        print(f"{len(req)} transfers in {wall:.2f} s ({len(req) / wall:,.0f}/s): {counts}")
        print(f"fraud stopped (review or reject): {int(((outcome != 1) & fraud).sum())} of {int(fraud.sum())}; "
              f"honest transfers stopped: {int(((outcome != 1) & ~fraud).sum())}")
        held = np.flatnonzero(outcome == Outcome.REVIEW)
        if len(held) >= 2:
            print("reviewer approves:", svc.review(int(req["id"][held[0], 0]), approve=True))
            print("reviewer declines:", svc.review(int(req["id"][held[1], 0]), approve=False))
        for d in svc.decisions(outcome="rejected", limit=3):
            print("rejected:", d.transfer_id, f"{d.score:.3f}", d.reason, cols["fraud_pattern"][d.transfer_id - 1])


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
