"""Fraud-scored transfers: request batches -> features -> ONNX fraud model -> decision -> ledger.

>>> from blazil_ai import fraud
>>> with fraud.FraudService("/tmp/fraud-data", "~/.cache/blazil/models/fraud.onnx") as svc:   # doctest: +SKIP
...     result = svc.decide(fraud.make_requests({"id": [1], "debit_account_id": [10], "credit_account_id": [20],
...                                              "amount": [1999], "time": [1.77e9], "channel": ["online"]}))
"""

from blazil_ai.fraud.service import DecisionBatch, FraudService, load_scorer
from blazil_ai.fraud.types import (
    REQUEST_DTYPE,
    Decision,
    Outcome,
    Policy,
    Reason,
    ReviewState,
    make_requests,
    request_records,
)

__all__ = ["REQUEST_DTYPE", "Decision", "DecisionBatch", "FraudService", "Outcome", "Policy", "Reason",
           "ReviewState", "load_scorer", "make_requests", "request_records"]
