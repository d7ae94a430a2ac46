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
