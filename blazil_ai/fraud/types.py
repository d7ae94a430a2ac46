"""Records of the fraud-scored transfer service: requests in, decisions out.

A transfer request is one row of :data:`REQUEST_DTYPE` (64 bytes): the ledger fields (id, accounts,
amount in minor units, ledger, code) and the transaction context the model needs (event time,
merchant category, channel, device, country as codes into the vocabularies below, and two flags the
issuer knows: the country is foreign to the cardholder, the device is new to the account). Batches
travel as numpy arrays end to end, so a request stream never becomes one Python object per transfer.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from blazil_ai.datasets.transactions import CHANNELS, COUNTRIES, DEVICES, MERCHANTS
from blazil_ai.errors import DataError
from blazil_ai.ledger.types import u128_to_words

# Vocabulary of each categorical context field; code 255 means "not in the vocabulary" (the model's
# __other__ slot). The lists extend the simulator's (ATM withdrawals use merchant category "cash").
VOCAB: dict[str, list[str]] = {
    "merchant_category": [*MERCHANTS.tolist(), "cash"],
    "channel": CHANNELS.tolist(),
    "device": [*DEVICES.tolist()],
    "country": COUNTRIES.tolist(),
}
UNKNOWN_CODE = 255
DEFAULT_URI = "tcp://127.0.0.1:7400"  # where 'blazil serve' listens and 'blazil transfer' connects by default
RESOLVE_BIT = 1 << 127  # ids of post/void transfers written by the service: the pending id with this bit set

REQUEST_DTYPE = np.dtype([
    ("id", "<u8", (2,)), ("debit_account_id", "<u8"), ("credit_account_id", "<u8"), ("amount", "<u8"),
    ("time", "<f8"), ("ledger", "<u4"), ("code", "<u2"), ("merchant_category", "u1"), ("channel", "u1"),
    ("device", "u1"), ("country", "u1"), ("is_foreign", "u1"), ("is_new_device", "u1"), ("pad", "V4"),
])
assert REQUEST_DTYPE.itemsize == 64


class Outcome(enum.IntEnum):
    """What happened to a transfer request."""

    APPROVED = 1  # posted transfer
    REVIEW = 2  # pending transfer: funds held until a reviewer posts or voids it, or it expires
    REJECTED = 3  # no transfer
    FAILED = 4  # scored, but the ledger refused the transfer (its status is in ledger_status)


class ReviewState(enum.IntEnum):
    """Where a review stands (NONE for decisions that are not reviews)."""

    NONE = 0
    PENDING = 1
    POSTED = 2
    VOIDED = 3
    EXPIRED = 4


class Reason(enum.IntEnum):
    """Why the decision was taken."""

    LOW_SCORE = 1  # score below the review threshold
    REVIEW_SCORE = 2  # score in [review_at, reject_at)
    HIGH_SCORE = 3  # score at or above the reject threshold
    MODEL_ERROR = 4  # the model failed or gave no usable score: held for review, never approved
    LEDGER_REFUSED = 5  # the ledger did not create the transfer


@dataclass(slots=True)
class Policy:
    """The thresholds and model a decision was taken under (stored once per service start)."""

    model_version: str
    review_at: float = 0.5
    reject_at: float = 0.9
    review_timeout_s: int = 3600

    def validate(self) -> Policy:
        """Raise DataError for thresholds out of order or a bad timeout."""
        if not 0.0 <= self.review_at <= self.reject_at <= 1.0:
            raise DataError(f"thresholds must satisfy 0 <= review_at ({self.review_at}) <= reject_at "
                            f"({self.reject_at}) <= 1", field="review_at")
        if not 1 <= self.review_timeout_s < 1 << 32:
            raise DataError(f"review timeout must be 1..2^32-1 seconds, got {self.review_timeout_s}",
                            field="review_timeout_s")
        return self


@dataclass(slots=True)
class Decision:
    """One stored decision, as queries return it."""

    transfer_id: int
    debit_account_id: int
    credit_account_id: int
    amount: int
    time: float
    score: float | None
    outcome: str
    reason: str
    model_version: str
    review_state: str
    ledger_status: str
    decided_at_ns: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (ids as decimal strings: they are 128-bit)."""
        d = asdict(self)
        d["transfer_id"] = str(self.transfer_id)
        return d


def reason_text(reason: int, score: float, policy: Policy, ledger_status: str = "") -> str:
    """A human-readable reason naming the score and the threshold that decided it."""
    r = Reason(reason)
    if r == Reason.LOW_SCORE:
        return f"score {score:.4f} < review threshold {policy.review_at}"
    if r == Reason.REVIEW_SCORE:
        return f"score {score:.4f} in review band [{policy.review_at}, {policy.reject_at})"
    if r == Reason.HIGH_SCORE:
        return f"score {score:.4f} >= reject threshold {policy.reject_at}"
    if r == Reason.MODEL_ERROR:
        return "model error: no usable score, held for review"
    return f"ledger refused the transfer: {ledger_status}"


def _codes(values: Any, field: str) -> np.ndarray:
    vocab = VOCAB[field]
    arr = np.asarray(values)
    if arr.dtype.kind in "iu":
        return np.where((arr >= 0) & (arr < len(vocab)), arr, UNKNOWN_CODE).astype(np.uint8)
    uniq, inverse = np.unique(arr.astype(str), return_inverse=True)
    index = {v: i for i, v in enumerate(vocab)}
    lut = np.array([index.get(str(u), UNKNOWN_CODE) for u in uniq.tolist()], dtype=np.uint8)
    return lut[inverse.reshape(-1)]


def make_requests(columns: Mapping[str, Any]) -> np.ndarray:
    """A REQUEST_DTYPE batch from columns (``id``, ``debit_account_id``, ``credit_account_id``, ``amount`` in
    minor units, ``time`` in epoch seconds, optional ``ledger``/``code``, context fields as text or codes)."""
    need = ("id", "debit_account_id", "credit_account_id", "amount", "time")
    missing = [k for k in need if k not in columns]
    if missing:
        raise DataError(f"transfer requests need columns {list(need)}; missing {missing}", field=missing[0])
    n = len(np.atleast_1d(np.asarray(columns["debit_account_id"])))
    out = np.zeros(n, dtype=REQUEST_DTYPE)
    ids = columns["id"]
    if isinstance(ids, np.ndarray) and ids.ndim == 2:
        out["id"] = ids
    else:
        vals = [int(v) for v in np.atleast_1d(np.asarray(ids, dtype=object)).tolist()]
        for i, v in enumerate(vals):
            if not 0 < v < RESOLVE_BIT:
                raise DataError(f"request {i}: transfer id {v} must be in 1..2^127-1", field="id")
        out["id"] = u128_to_words(vals, field="id")
    for name in ("debit_account_id", "credit_account_id", "amount"):
        col = np.atleast_1d(np.asarray(columns[name]))
        if col.dtype.kind == "f" and (col != np.floor(col)).any():
            raise DataError(f"{name} must be a whole number (amounts are in minor units)", field=name)
        if col.dtype.kind in "if" and (col < 0).any():
            raise DataError(f"{name} must not be negative", field=name)
        out[name] = col.astype(np.uint64)
    out["time"] = np.atleast_1d(np.asarray(columns["time"], dtype=np.float64))
    out["ledger"] = np.asarray(columns.get("ledger", 1), dtype=np.uint32)
    out["code"] = np.asarray(columns.get("code", 1), dtype=np.uint16)
    for name in VOCAB:
        if name in columns:
            out[name] = _codes(np.atleast_1d(columns[name]), name)
        else:
            out[name] = UNKNOWN_CODE
    for name in ("is_foreign", "is_new_device"):
        if name in columns:
            out[name] = np.atleast_1d(np.asarray(columns[name])).astype(bool)
    check_requests(out)
    return out


def check_requests(req: np.ndarray) -> None:
    """Raise DataError naming the request and field of the first invalid value."""
    checks = [
        ("id", ((req["id"][:, 0] | req["id"][:, 1]) == 0) | (req["id"][:, 1] >= np.uint64(1 << 63)),
         "must be in 1..2^127-1"),
        ("debit_account_id", req["debit_account_id"] == 0, "must not be zero"),
        ("credit_account_id", req["credit_account_id"] == 0, "must not be zero"),
        ("credit_account_id", req["credit_account_id"] == req["debit_account_id"],
         "must differ from the debit account"),
        ("amount", req["amount"] == 0, "must be positive"),
        ("amount", req["amount"] > np.uint64(MAX_AMOUNT), "must be below 2^63"),
        ("time", ~np.isfinite(req["time"]) | (req["time"] < 0), "must be a finite epoch time in seconds"),
        ("ledger", req["ledger"] == 0, "must not be zero"),
        ("code", req["code"] == 0, "must not be zero"),
    ]
    for field, bad, what in checks:
        if bad.any():
            i = int(np.argmax(bad))
            raise DataError(f"request {i}: {field} {what}", field=field)


# The fields of a request record, and the largest amount: amounts stay below 2^63 so that they fit a signed
# 64-bit integer in every client and sums over an account's window stay exact.
RECORD_FIELDS = ("id", "debit_account_id", "credit_account_id", "amount", "ledger", "code", "time",
                 "merchant_category", "channel", "device", "country", "is_foreign", "is_new_device")
MAX_AMOUNT = (1 << 63) - 1
_INT_LIMITS = {"id": (1, RESOLVE_BIT - 1), "debit_account_id": (1, (1 << 64) - 1),
               "credit_account_id": (1, (1 << 64) - 1), "amount": (1, MAX_AMOUNT),
               "ledger": (1, (1 << 32) - 1), "code": (1, (1 << 16) - 1)}


def check_record(record: Mapping[str, Any], vocabulary: bool = True) -> None:
    """Raise DataError naming the field of the first bad key or value of one request record (JSON form).

    Integers must be JSON integers (not 25.99, "25", true); a key that is not a field (a typo such as
    "chanel") is refused rather than scored as absent; with ``vocabulary`` (what the CLI checks) a context
    value must be in its vocabulary, else it would be scored in the model's "other" slot.
    """
    import difflib

    for key in record:
        if key not in RECORD_FIELDS:
            near = difflib.get_close_matches(str(key), RECORD_FIELDS, n=1)
            raise DataError(f"unknown field{f' (did you mean {near[0]!r}?)' if near else ''}; fields are "
                            f"{', '.join(RECORD_FIELDS)}", field=str(key))
    for k in ("debit_account_id", "credit_account_id", "amount"):
        if k not in record:
            raise DataError("missing", field=k)
    for key, (low, high) in _INT_LIMITS.items():
        if key not in record:
            continue
        v = record[key]
        if isinstance(v, bool) or not isinstance(v, int):
            unit = " (amounts are whole minor units, e.g. cents: 25.99 is 2599)" if key == "amount" else ""
            raise DataError(f"{v!r} is not a whole number{unit}", field=key)
        if not low <= v <= high:
            raise DataError(f"{v} is out of range {low}..{high}", field=key)
    if record.get("time") is not None:
        t = record["time"]
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t < 0:
            raise DataError(f"{t!r} is not a finite epoch time in seconds", field="time")
    for key, vocab in VOCAB.items():
        v = record.get(key)
        if vocabulary and v is not None and v not in vocab:
            raise DataError(f"{v!r} is not one of {', '.join(map(str, vocab))}", field=key)
    for key in ("is_foreign", "is_new_device"):
        v = record.get(key)
        if v is not None and not isinstance(v, bool) and v not in (0, 1):
            raise DataError(f"{v!r} is not true or false", field=key)


def request_records(records: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """A REQUEST_DTYPE batch from dict records (the JSON form the CLI and the server accept)."""
    if not records:
        return np.zeros(0, dtype=REQUEST_DTYPE)
    keys = set().union(*(r.keys() for r in records))
    for i, r in enumerate(records):
        for k in ("id", "debit_account_id", "credit_account_id", "amount"):
            if k not in r:
                raise DataError(f"request {i}: field {k!r} missing", field=k)
        try:
            check_record(r, vocabulary=False)  # the library keeps the model's "other" slot for unknown values
        except DataError as e:
            err = DataError(f"request {i}: {e}")
            err.field = e.field
            raise err from None
    import time as _time

    cols: dict[str, Any] = {k: [r.get(k) for r in records] for k in keys}
    cols["time"] = [float(r["time"]) if r.get("time") is not None else _time.time() for r in records]
    for name in VOCAB:
        if name in cols:
            cols[name] = np.array(["" if v is None else str(v) for v in cols[name]])
    for name in ("is_foreign", "is_new_device"):
        if name in cols:
            cols[name] = np.array([bool(v) for v in cols[name]])
    for name in ("debit_account_id", "credit_account_id", "amount", "ledger", "code"):
        if name in cols:
            try:
                vals = [int(v) for v in cols[name]]
            except (TypeError, ValueError) as e:
                raise DataError(f"{name} must be an integer: {e}", field=name) from None
            if any(v < 0 or v >= 1 << 64 for v in vals):
                raise DataError(f"{name} must be in 0..2^64-1", field=name)
            cols[name] = np.array(vals, dtype=np.uint64)
    cols["id"] = [int(v) for v in cols["id"]]
    return make_requests(cols)


def finite_or_none(x: float) -> float | None:
    """None for NaN (a decision taken without a score)."""
    return None if math.isnan(x) else float(x)
