"""Simulated transfer-request streams for the demo, the benchmark, the examples and the tests.

The transaction simulator (``blazil_ai.datasets.transactions``) gives labelled card and transfer
traffic; here it becomes REQUEST_DTYPE batches (amounts in cents; card purchases credit one merchant
account) and the ledger accounts they need.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from blazil_ai.datasets.transactions import simulate_transactions
from blazil_ai.fraud.types import make_requests
from blazil_ai.ledger.types import ACCOUNT_DTYPE

MERCHANT_ACCOUNT = 1  # card purchases credit one merchant-acquirer account
CONTEXT = ("merchant_category", "channel", "device", "country", "is_foreign", "is_new_device")


def simulated_requests(n: int, seed: int = 1, fraud_rate: float = 0.03, id_base: int = 1,
                       **kw: Any) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``n`` simulated transactions as a REQUEST_DTYPE batch (ids ``id_base``..), and the simulator's columns."""
    cols = simulate_transactions(n, seed=seed, fraud_rate=fraud_rate, **kw)
    credit = np.where(cols["dest_account_id"] > 0, cols["dest_account_id"], MERCHANT_ACCOUNT)
    req = make_requests({
        "id": np.arange(id_base, id_base + n, dtype=np.uint64), "debit_account_id": cols["account_id"],
        "credit_account_id": credit, "amount": np.round(cols["amount"] * 100).astype(np.int64),
        "time": cols["timestamp"], **{k: cols[k] for k in CONTEXT}})
    return req, cols


def open_accounts(client: Any, requests: np.ndarray, ledger: int = 1, code: int = 1) -> int:
    """Create every account a request batch names (existing ones are left as they are); returns how many ids."""
    ids = np.unique(np.concatenate([requests["debit_account_id"], requests["credit_account_id"]]))
    a = np.zeros(len(ids), dtype=ACCOUNT_DTYPE)
    a["id"][:, 0] = ids
    a["ledger"], a["code"] = ledger, code
    for s in range(0, len(a), 8000):
        client.create_accounts(a[s:s + 8000])
    return len(ids)


def push_stream(submit: Any, requests: np.ndarray, batch: int = 8189, in_flight: int = 8,
                on_batch: Any = None) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
    """Send ``requests`` in batches through ``submit`` (a service's or client's), ``in_flight`` at a time.

    Returns (outcome, score, wall seconds, per-batch latency seconds); ``on_batch(n)`` is called per answer.
    """
    import time

    outcome = np.zeros(len(requests), np.uint8)
    score = np.zeros(len(requests), np.float32)
    latency: list[float] = []
    pending: list[tuple[int, float, Any]] = []

    def finish(start: int, t0: float, fut: Any) -> None:
        r = fut.result()
        latency.append(time.perf_counter() - t0)
        outcome[start:start + len(r.outcome)] = r.outcome
        score[start:start + len(r.score)] = r.score
        if on_batch is not None:
            on_batch(len(r.outcome))

    t_start = time.perf_counter()
    for s in range(0, len(requests), batch):
        pending.append((s, time.perf_counter(), submit(requests[s:s + batch])))
        while len(pending) >= in_flight or (pending and pending[0][2].done()):
            finish(*pending.pop(0))
    for p in pending:
        finish(*p)
    return outcome, score, time.perf_counter() - t_start, np.array(latency)
