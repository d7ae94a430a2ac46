"""The fraud-scored transfer service: ring buffer -> features -> model -> decision -> ledger.

Producers publish request batches (:data:`~blazil_ai.fraud.types.REQUEST_DTYPE`) into a
:class:`~blazil_ai.ledger.ring.RingBuffer`. The worker thread takes everything published as one batch
(up to the ledger's 8189 events per chunk), computes features (velocity from each account's history),
scores the chunk with the ONNX model, decides by threshold and writes the decisions to the decision log.
The commit thread fsyncs the log and only then hands the chunk's transfers to the ledger (so the ledger
never holds a transfer without its decision). The completion thread waits for the ledger's durable
answer, records refusals, and only then acknowledges the requests. So the worker scores chunk k+2 while
the log of chunk k+1 is fsynced and the ledger commits chunk k.

* approve (score < review_at): a posted transfer;
* review (review_at <= score < reject_at, or any model failure): a pending transfer with a timeout,
  funds held until a reviewer posts or voids it; the sweeper voids it when the timeout passes;
* reject (score >= reject_at): no transfer; the decision and its reason are stored.

Fail safe: the model is loaded and run once at start (a missing or corrupt file stops the start with
ConfigError); at run time a model exception or a non-finite score sends the chunk to review, never to
approve. At start the last decision frames are checked against the ledger: a decision whose transfer
never reached the ledger was never acknowledged and is withdrawn, so a retry is scored afresh.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from blazil_ai import metrics
from blazil_ai.errors import BlazilError, ConfigError, DataError
from blazil_ai.fraud.features import FeatureBuilder, VelocityWindow
from blazil_ai.fraud.store import DECISION_DTYPE, DecisionStore, change_rows
from blazil_ai.fraud.types import (
    REQUEST_DTYPE,
    RESOLVE_BIT,
    Decision,
    Outcome,
    Policy,
    Reason,
    ReviewState,
    check_requests,
)
from blazil_ai.futures import then
from blazil_ai.ledger.ring import RingBuffer, RingClosed
from blazil_ai.ledger.types import (
    BATCH_MAX,
    TRANSFER_DTYPE,
    QueryFilter,
    QueryFilterFlags,
    TransferFlags,
    u128,
    u128_column,
    u128_to_words,
)
from blazil_ai.ledger.types import CreateTransferStatus as CT

log = logging.getLogger(__name__)

SCORE_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 1.0)
_DECISIONS = metrics.counter("fraud", "decisions", "total", "Transfer decisions by outcome", labels=("outcome",))
_SCORES = metrics.histogram("fraud", "score", "ratio", "Fraud scores of decided transfers", buckets=SCORE_BUCKETS)
_LATENCY = metrics.histogram("fraud", "decision_latency", "seconds",
                             "Per transfer: submitted to acknowledged (decision and transfer durable)")
_STAGE = metrics.histogram("fraud", "stage_latency", "seconds", "Per chunk: time in each stage", labels=("stage",))
_MODEL_ERRORS = metrics.counter("fraud", "model_errors", "total", "Chunks whose scoring failed (sent to review)")
_REVIEWS = metrics.counter("fraud", "reviews", "total", "Review resolutions", labels=("state",))
_PENDING = metrics.gauge("fraud", "reviews_pending", "", "Reviews waiting for a reviewer")

_OK_STATUSES = (0, int(CT.EXISTS))
_OUTCOME_NAMES = {int(o.value): o.name.lower() for o in Outcome}


@dataclass(slots=True)
class DecisionBatch:
    """Per-request results of one submitted batch, as arrays in request order."""

    outcome: np.ndarray  # u1, Outcome values
    score: np.ndarray  # f4, NaN where the model gave none
    reason: np.ndarray  # u1, Reason values
    ledger_status: np.ndarray  # u4, 0 = created (numpy-path convention)

    def counts(self) -> dict[str, int]:
        """Decisions by outcome name."""
        return {o.name.lower(): int((self.outcome == o.value).sum()) for o in Outcome}


@dataclass(slots=True)
class Chunk:
    """One chunk of a batch between the worker (which decides it) and the completion thread (which answers it)."""

    start: int  # its rows in the batch: start..end
    end: int
    known: np.ndarray  # bool per row: decided before (a retry) or repeated earlier in the chunk
    dup_of: np.ndarray | None  # per row, the row of its id's first occurrence (None: no id repeats)
    fresh: np.ndarray  # the rows decided now (indices into the chunk)
    outcome: np.ndarray  # u1 per fresh row
    score: np.ndarray  # f4 per fresh row, NaN where the model gave none
    reason: np.ndarray  # u1 per fresh row
    send: np.ndarray  # bool per fresh row: its transfer goes to the ledger (not rejected)
    ledger: Future[Any]  # the ledger's statuses of ``transfers`` once they and the decisions are durable
    transfers: np.ndarray | None  # TRANSFER_DTYPE rows sent, None when every row was rejected
    stored_at: float  # perf_counter() when the decisions were written


def decide(score: np.ndarray, policy: Policy, model_error: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(outcome, reason) per score by the policy's thresholds; a missing score (NaN) goes to review."""
    outcome = np.where(score < policy.review_at, Outcome.APPROVED,
                       np.where(score < policy.reject_at, Outcome.REVIEW, Outcome.REJECTED)).astype(np.uint8)
    reason = np.where(score < policy.review_at, Reason.LOW_SCORE,
                      np.where(score < policy.reject_at, Reason.REVIEW_SCORE, Reason.HIGH_SCORE)).astype(np.uint8)
    bad = ~np.isfinite(score)
    if bad.any() or model_error:
        outcome[bad] = Outcome.REVIEW
        reason[bad] = Reason.MODEL_ERROR
    return outcome, reason


def transfer_rows(src: np.ndarray, review: np.ndarray, review_timeout_s: int) -> np.ndarray:
    """The ledger transfers of requests ``src``: posted, or pending with the review timeout where ``review``."""
    tr = np.zeros(len(src), dtype=TRANSFER_DTYPE)
    tr["id"] = src["id"]
    tr["debit_account_id"][:, 0] = src["debit_account_id"]
    tr["credit_account_id"][:, 0] = src["credit_account_id"]
    tr["amount"][:, 0] = src["amount"]
    tr["ledger"] = src["ledger"]
    tr["code"] = src["code"]
    tr["user_data_64"] = np.round(src["time"] * 1e6).astype(np.uint64)
    tr["flags"] = np.where(review, np.uint16(TransferFlags.PENDING), np.uint16(0))
    tr["timeout"] = np.where(review, np.uint32(review_timeout_s), np.uint32(0))
    return tr


# A retried id must carry the same transfer; TigerBeetle's precedence among the fields a decision keeps.
_SAME_FIELDS = (("debit_account_id", CT.EXISTS_WITH_DIFFERENT_DEBIT_ACCOUNT_ID),
                ("credit_account_id", CT.EXISTS_WITH_DIFFERENT_CREDIT_ACCOUNT_ID),
                ("amount", CT.EXISTS_WITH_DIFFERENT_AMOUNT))


def _refuse_different(res: DecisionBatch, j: int, request: Any, earlier: Any) -> bool:
    """Answer request ``j`` with ``exists_with_different_*`` if it reuses an id for another transfer."""
    for name, status in _SAME_FIELDS:
        if int(request[name]) != int(earlier[name]):
            res.outcome[j], res.score[j] = Outcome.FAILED, np.nan
            res.reason[j], res.ledger_status[j] = Reason.LEDGER_REFUSED, int(status)
            return True
    return False


def model_version(path: Path) -> str:
    """``<file name>@<first 12 hex of its sha256>``: names the exact model a decision used."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return f"{path.name}@{h.hexdigest()[:12]}"


def load_scorer(model: str | os.PathLike[str], backend: str = "onnxruntime", threads: int | None = None) -> Any:
    """Load and test-run the fraud model; any problem is a ConfigError that names the file."""
    from blazil_ai.models.fraud import FraudScorer

    path = Path(model)
    if path.is_dir():
        path = path / "fraud.onnx"
    if not path.is_file():
        raise ConfigError(f"fraud model {path} not found; build one with 'blazil models build --type fraud' "
                          "(the service does not start without a model)")
    norm = path.with_name(f"{path.stem}.norm.json")
    if not norm.is_file():
        raise ConfigError(f"fraud model {path} has no normalisation file {norm}; rebuild the model")
    try:
        scorer = FraudScorer.load(path, backend=backend, threads=threads)
        width: Any = scorer.n_features
        p = scorer.score(np.zeros((2, int(width)), dtype=np.float32))
    except BlazilError as e:
        raise ConfigError(f"fraud model {path} cannot be used: {e}") from e
    except Exception as e:  # onnxruntime/onnx raise their own types for a corrupt graph
        raise ConfigError(f"fraud model {path} is corrupt or not an ONNX fraud model: {type(e).__name__}: {e}") from e
    if p.shape != (2,) or not np.isfinite(p).all():
        raise ConfigError(f"fraud model {path} gives no usable score (output {p!r})")
    return scorer


def _check_own_files(data: Path) -> bool:
    """Whether the service's own ledger exists; refuses (naming it) a decision log deleted from beside a ledger
    that holds transfers, which would otherwise start afresh and leave those transfers without decisions."""
    from blazil_ai.ledger import connect
    from blazil_ai.ledger.manifest import is_ledger

    led, log_path = data / "ledger", data / "decisions" / "decisions.log"
    if not led.exists():
        return False
    if not log_path.exists() and is_ledger(led):
        with connect(led, read_only=True) as c:
            if len(c.query_transfers(QueryFilter(0, 0, 0, 0, 0, 0, 0, 1, QueryFilterFlags.NONE))):
                raise DataError("the decision log is missing but the service's ledger holds transfers; restore "
                                "it from a backup", path=str(log_path))
    return True


class FraudService:
    """Fraud-scored transfers into a ledger, with durable decisions and reviews (see the module docstring)."""

    def __init__(self, data: str | os.PathLike[str], model: str | os.PathLike[str], *, ledger: Any = None,
                 review_at: float = 0.5, reject_at: float = 0.9, review_timeout_s: int = 3600,
                 backend: str = "onnxruntime", threads: int | None = None, batch_max: int = BATCH_MAX,
                 ring_size: int = 4096, depth: int = 16, amount_scale: float = 100.0, fsync: bool = True,
                 sweep_interval: float = 1.0, in_flight: int = 4, clock: Callable[[], float] = time.time) -> None:
        self.data = Path(data)
        self.clock = clock
        self.scorer = load_scorer(model, backend, threads)
        version = model_version(Path(self.scorer.session.path))
        self.policy = Policy(version, review_at, reject_at, int(review_timeout_s)).validate()
        self.features = FeatureBuilder(self.scorer.transform, amount_scale)
        self.amount_scale = amount_scale
        self.batch_max = min(batch_max, BATCH_MAX)
        self.data.mkdir(parents=True, exist_ok=True)
        own_existed = _check_own_files(self.data) if ledger is None else True
        self.store = DecisionStore(self.data / "decisions", fsync=fsync)
        self._own_ledger = ledger is None or isinstance(ledger, (str, os.PathLike))
        try:
            from blazil_ai.ledger import connect

            if not own_existed and self.store.n:
                raise DataError("the service's ledger folder is missing but its decision log holds decisions; "
                                "restore it from a backup", path=str(self.data / "ledger"))
            if ledger is None:
                self.ledger = connect(self.data / "ledger", fsync=fsync, create=True)  # the service's own
            elif isinstance(ledger, (str, os.PathLike)):
                self.ledger = connect(ledger) if "://" in str(ledger) else connect(ledger, fsync=fsync)
            else:
                self.ledger = ledger
        except BaseException:
            self.store.close()
            raise
        self.policy_index = self.store.add_policy(self.policy)
        self.window = VelocityWindow(depth)
        self._expiry: list[tuple[float, int]] = []
        self._review_lock = threading.Lock()
        self._failed: BaseException | None = None
        self._closed = False
        self.started = time.perf_counter()
        self.recovered = self._recover()
        self._ring: RingBuffer[tuple[np.ndarray, Future[DecisionBatch], float]] = RingBuffer(ring_size)
        self._done: queue.Queue[Any] = queue.Queue(maxsize=in_flight)
        self._commits: queue.Queue[Any] = queue.Queue()
        self._stop_sweep = threading.Event()
        self._sweep_interval = sweep_interval
        self._worker = threading.Thread(target=self._work_loop, name="fraud-worker", daemon=True)
        self._committer = threading.Thread(target=self._commit_loop, name="fraud-commit", daemon=True)
        self._completer = threading.Thread(target=self._complete_loop, name="fraud-complete", daemon=True)
        self._sweeper = threading.Thread(target=self._sweep_loop, name="fraud-expiry", daemon=True)
        for t in (self._worker, self._committer, self._completer, self._sweeper):
            t.start()

    # ---------------------------------------------------------------- start-up

    def _recover(self) -> dict[str, int]:
        """Withdraw unacknowledged decisions whose transfer never reached the ledger; rebuild the window."""
        store = self.store
        withdrawn = 0
        rows = [r for rng in store.last_frame_rows for r in rng]
        if rows:
            rec = store.rows[np.array(rows, dtype=np.int64)]
            want = np.isin(rec["outcome"], (Outcome.APPROVED, Outcome.REVIEW)) & (rec["state"] <= ReviewState.PENDING)
            cand = rec[want]
            if len(cand):
                ids = u128_column(cand)
                found = {t.id for t in self.ledger.lookup_transfers(ids)}
                missing = np.array([i not in found for i in ids], dtype=bool)
                if missing.any():
                    store.add_changes(change_rows(cand["id"][missing], at=time.time_ns(), withdrawn=True))
                    store.sync()
                    withdrawn = int(missing.sum())
                    log.warning("withdrew %d unacknowledged decisions whose transfers never reached the ledger",
                                withdrawn)
        rebuilt = self._rebuild_window()
        live = store.rows[: store.n]
        pend = np.flatnonzero((live["outcome"] == Outcome.REVIEW) & (live["state"] == ReviewState.PENDING))
        timeout = {i: p.review_timeout_s for i, p in enumerate(store.policies)}
        for r in pend.tolist():
            row = live[r]
            deadline = int(row["decided_at"]) / 1e9 + timeout.get(int(row["policy"]), 3600)
            self._expiry.append((deadline, u128(row["id"])))
        heapq.heapify(self._expiry)
        _PENDING.set(len(pend))
        return {"decisions": store.n, "withdrawn": withdrawn, "history_transfers": rebuilt,
                "pending_reviews": len(pend), "truncated_bytes": store.truncated_bytes}

    def _rebuild_window(self) -> int:
        """Feed every scored transfer in the ledger (not posts/voids) to the velocity window, oldest first."""
        total = 0
        cursor = 0
        while True:
            f = QueryFilter(0, 0, 0, 0, 0, cursor, 0, BATCH_MAX, QueryFilterFlags.NONE)
            page = self.ledger.query_transfers_array(f)
            if len(page) == 0:
                break
            keep = (page["flags"] & (TransferFlags.POST_PENDING_TRANSFER | TransferFlags.VOID_PENDING_TRANSFER)) == 0
            keep &= page["user_data_64"] != 0
            p = page[keep]
            if len(p):
                rows = self.window.account_rows(p["debit_account_id"][:, 0])
                self.window.add(rows, p["user_data_64"] / 1e6, p["amount"][:, 0] / self.amount_scale)
                total += len(p)
            cursor = int(page["timestamp"][-1]) + 1
            if len(page) < BATCH_MAX:
                break
        return total

    # ---------------------------------------------------------------- submit

    def submit(self, requests: np.ndarray) -> Future[DecisionBatch]:
        """Queue a REQUEST_DTYPE batch; the future gives its decisions once they and the transfers are durable."""
        if requests.dtype != REQUEST_DTYPE:
            if requests.dtype.itemsize == REQUEST_DTYPE.itemsize and requests.dtype.kind == "V":
                requests = requests.view(REQUEST_DTYPE)
            else:
                raise DataError(f"requests have dtype {requests.dtype}, expected REQUEST_DTYPE (64-byte records)")
        check_requests(requests)
        if self._failed is not None:
            raise BlazilError(f"fraud service stopped after a ledger failure: {self._failed}")
        if self._closed:
            raise BlazilError("fraud service is closed")
        fut: Future[DecisionBatch] = Future()
        try:
            self._ring.publish((np.array(requests), fut, time.perf_counter()))
        except RingClosed as e:
            raise BlazilError("fraud service is closed") from e
        return fut

    def decide(self, requests: np.ndarray, timeout: float | None = None) -> DecisionBatch:
        """Submit and wait for the decisions."""
        return self.submit(requests).result(timeout)

    # ---------------------------------------------------------------- worker

    def _work_loop(self) -> None:
        for items in self._ring.batches():
            try:
                self._process(items)
            except Exception as e:  # a bug or a ledger failure: fail these requests, keep the state honest
                log.exception("fraud worker failed")
                self._failed = self._failed or e
                for _, fut, _ in items:
                    if not fut.done():
                        fut.set_exception(BlazilError(f"fraud service failed: {e}"))
        self._commits.put(None)
        self._done.put(None)

    def _commit_loop(self) -> None:
        """Make each chunk's decisions durable, then hand its transfers to the ledger (in chunk order).

        A thread of its own so that the worker scores the next chunk while the decision log is fsynced.
        """
        while True:
            job = self._commits.get()
            if job is None:
                break
            tr, out = job
            try:
                self.store.sync()
                if tr is None:
                    out.set_result(None)
                    continue
                then(self.ledger.create_transfers_async(tr), into=out)
            except Exception as e:
                out.set_exception(e)

    def _process(self, items: list[tuple[np.ndarray, Future[DecisionBatch], float]]) -> None:
        req = items[0][0] if len(items) == 1 else np.concatenate([it[0] for it in items])
        n = len(req)
        res = DecisionBatch(np.zeros(n, np.uint8), np.full(n, np.nan, np.float32), np.zeros(n, np.uint8),
                            np.zeros(n, np.uint32))
        chunks = []
        for s in range(0, n, self.batch_max):
            chunks.append(self._decide_chunk(req, res, s, min(n, s + self.batch_max)))
        self._done.put((items, req, res, chunks))

    def _decide_chunk(self, req_all: np.ndarray, res: DecisionBatch, s: int, e: int) -> Chunk:
        """Dedup, score and decide rows s..e; log the decisions and queue the chunk's transfers for the ledger."""
        req = req_all[s:e]
        t_start = time.perf_counter()
        known, dup_of = self._already_decided(req["id"])
        fresh = np.flatnonzero(~known)
        fr = req[fresh] if len(fresh) != len(req) else req
        amount = fr["amount"] / self.amount_scale
        acc_rows = self.window.account_rows(fr["debit_account_id"])
        x = self.features.build(fr, self.window.features(acc_rows, fr["time"], amount))
        t_feat = time.perf_counter()
        score, model_error = self._score(x)
        t_score = time.perf_counter()
        outcome, reason = decide(score, self.policy, model_error)
        # The decision is durable before the ledger sees the transfer: the ledger never holds a transfer
        # without its decision, and at start any decision without its transfer is withdrawn.
        # Written now (a retry in the next chunk sees it); fsynced by the commit thread.
        self.store.add_decisions(self._decision_rows(fr, score, outcome, reason),
                                 fresh=self.store.last_low_hits == 0 and dup_of is None)
        t_store = time.perf_counter()
        send = outcome != Outcome.REJECTED
        k = int(send.sum())
        tr = None
        if k:
            tr = transfer_rows(fr[send] if k != len(fr) else fr, outcome[send] == Outcome.REVIEW,
                               self.policy.review_timeout_s)
            self.window.add(acc_rows, fr["time"], amount, None if k == len(fr) else send)
        chunk = Chunk(s, e, known, dup_of, fresh, outcome, score, reason, send, Future(), tr, t_store)
        self._commits.put((tr, chunk.ledger))
        _STAGE.labels("features").observe(t_feat - t_start)
        _STAGE.labels("score").observe(t_score - t_feat)
        _STAGE.labels("decision_log").observe(t_store - t_score)
        return chunk

    def _already_decided(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(rows decided before or repeated earlier in ``ids``, each row's first occurrence or None if none
        repeats): a retry after a lost reply gets the stored decision, not a new one."""
        n = len(ids)
        known = self.store.known_mask(ids)
        lo = ids[:, 0]
        # Strictly increasing low words (the usual stream) cannot repeat: no Python set over the batch.
        if n > 1 and not bool((lo[1:] > lo[:-1]).all()) and len(set(lo.tolist())) != n:
            v = np.ascontiguousarray(ids).view([("lo", "<u8"), ("hi", "<u8")]).ravel()
            _, first, inv = np.unique(v, return_index=True, return_inverse=True)
            dup_of = first[inv.reshape(-1)]
            known |= dup_of != np.arange(n)
            return known, dup_of
        return known, None

    def _score(self, x: np.ndarray) -> tuple[np.ndarray, bool]:
        """(scores, whether the model failed): a failure gives NaN scores, which send the rows to review."""
        m = len(x)
        try:
            score = self.scorer.score(x) if m else np.zeros(0, np.float32)
            if score.shape != (m,):
                raise BlazilError(f"model returned shape {score.shape} for {m} rows")
            return score, False
        except Exception as exc:
            log.error("fraud model failed on a chunk of %d transfers (sent to review): %s", m, exc)
            _MODEL_ERRORS.inc()
            return np.full(m, np.nan, np.float32), True

    def _decision_rows(self, fr: np.ndarray, score: np.ndarray, outcome: np.ndarray, reason: np.ndarray
                       ) -> np.ndarray:
        """The decision log's rows for the scored requests ``fr``."""
        rows = np.zeros(len(fr), dtype=DECISION_DTYPE)
        for f in ("id", "debit_account_id", "credit_account_id", "amount", "time"):
            rows[f] = fr[f]
        rows["decided_at"] = time.time_ns()
        rows["score"] = score
        rows["policy"] = self.policy_index
        rows["outcome"] = outcome
        rows["reason"] = reason
        rows["state"] = np.where(outcome == Outcome.REVIEW, ReviewState.PENDING, ReviewState.NONE)
        return rows

    # ---------------------------------------------------------------- completion

    def _complete_loop(self) -> None:
        while True:
            job = self._done.get()
            if job is None:
                break
            items, req, res, chunks = job
            try:
                self._complete(req, res, chunks)
            except Exception as e:
                log.exception("fraud completion failed")
                self._failed = self._failed or e
                for _, fut, _ in items:
                    if not fut.done():
                        fut.set_exception(BlazilError(f"fraud service failed: {e}"))
                continue
            now = time.perf_counter()
            off = 0
            for r, fut, t0 in items:
                k = len(r)
                fut.set_result(DecisionBatch(res.outcome[off:off + k], res.score[off:off + k],
                                             res.reason[off:off + k], res.ledger_status[off:off + k]))
                metrics.observe_many(_LATENCY, now - t0, k)
                off += k

    def _complete(self, req: np.ndarray, res: DecisionBatch, chunks: list[Chunk]) -> None:
        changes: list[np.ndarray] = []
        due: list[tuple[float, int]] = []
        for c in chunks:
            outcome, reason, status = self._ledger_answer(c, changes, due)
            at: Any = slice(c.start, c.end) if len(c.fresh) == c.end - c.start else c.start + c.fresh
            res.outcome[at] = outcome  # all fresh (usual): plain copies
            res.score[at] = c.score
            res.reason[at] = reason
            res.ledger_status[at] = status
            by_outcome = np.bincount(outcome, minlength=len(_OUTCOME_NAMES) + 1)
            for o, name in _OUTCOME_NAMES.items():
                if by_outcome[o]:
                    _DECISIONS.labels(name).inc(int(by_outcome[o]))
            metrics.observe_many(_SCORES, c.score)
            if c.known.any():
                self._fill_known(req, res, c.start, c.end, c.known, c.dup_of)
        if changes:
            self.store.add_changes(np.concatenate(changes))
            self.store.sync()
        if due:
            with self._review_lock:
                for d in due:
                    heapq.heappush(self._expiry, d)
            _PENDING.inc(len(due))

    def _ledger_answer(self, c: Chunk, changes: list[np.ndarray], due: list[tuple[float, int]]
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Wait for the chunk's transfers to be durable; (outcome, reason, ledger status) of its fresh rows, with
        refused transfers turned into failures (their decision changes appended to ``changes``) and the held
        ones' review deadlines appended to ``due``."""
        outcome, reason = c.outcome, c.reason
        status = np.zeros(len(outcome), np.uint32)
        st = c.ledger.result()  # the decision log is durable once this returns; st: the ledger's statuses
        tr = c.transfers
        if tr is None:
            return outcome, reason, status
        _STAGE.labels("ledger").observe(time.perf_counter() - c.stored_at)
        failed = (st != _OK_STATUSES[0]) & (st != _OK_STATUSES[1])
        st = np.where(failed, st, 0).astype(np.uint32)
        status[c.send] = st
        if failed.any():
            fidx = np.flatnonzero(c.send)[failed]
            outcome = outcome.copy()
            outcome[fidx] = Outcome.FAILED
            reason = reason.copy()
            reason[fidx] = Reason.LEDGER_REFUSED
            changes.append(change_rows(tr["id"][failed], at=time.time_ns(), state=ReviewState.NONE,
                                       outcome=Outcome.FAILED, reason=Reason.LEDGER_REFUSED,
                                       ledger_status=st[failed]))
        if (outcome == Outcome.REVIEW).any():
            deadline = time.time() + self.policy.review_timeout_s
            due.extend((deadline, t) for t in u128_column(tr[(tr["flags"] == TransferFlags.PENDING) & ~failed]))
        return outcome, reason, status

    def _fill_known(self, req: np.ndarray, res: DecisionBatch, s: int, e: int, known: np.ndarray,
                    dup_of: np.ndarray | None) -> None:
        for i in np.flatnonzero(known).tolist():
            j = s + i
            if dup_of is not None and dup_of[i] != i:
                src = s + int(dup_of[i])
                if res.outcome[src]:
                    if not _refuse_different(res, j, req[j], req[src]):
                        res.outcome[j], res.score[j] = res.outcome[src], res.score[src]
                        res.reason[j], res.ledger_status[j] = res.reason[src], res.ledger_status[src]
                    continue
            r = self.store.row_of(u128(req["id"][j]))
            if r is not None:
                row = self.store.rows[r]
                if not _refuse_different(res, j, req[j], row):
                    res.outcome[j], res.score[j] = row["outcome"], row["score"]
                    res.reason[j], res.ledger_status[j] = row["reason"], row["ledger_status"]

    # ---------------------------------------------------------------- queries and reviews

    def decision(self, transfer_id: int) -> Decision | None:
        """The stored decision for a transfer id, or None."""
        return self.store.get(int(transfer_id))

    def decisions(self, **filters: Any) -> list[Decision]:
        """Recent decisions, newest first (filters: outcome, review_state, account, limit)."""
        return self.store.query(**filters)

    def review(self, transfer_id: int, approve: bool) -> Decision:
        """A reviewer's verdict: approve posts the held transfer, decline voids it."""
        tid = int(transfer_id)
        with self._review_lock:
            r = self.store.row_of(tid)
            if r is None:
                raise DataError(f"no decision for transfer {tid}", field="transfer_id")
            row = self.store.rows[r]
            if int(row["outcome"]) != Outcome.REVIEW:
                raise DataError(f"transfer {tid} was not sent to review (outcome "
                                f"{Outcome(int(row['outcome'])).name.lower()})", field="transfer_id")
            state = ReviewState(int(row["state"]))
            if state != ReviewState.PENDING:
                raise DataError(f"review of transfer {tid} is already {state.name.lower()}", field="transfer_id")
            self._resolve([tid], [int(row["amount"])], approve)
        d = self.store.get(tid)
        assert d is not None
        return d

    def _resolve(self, tids: list[int], amounts: list[int], post: bool, expiring: bool = False) -> np.ndarray:
        """Post or void pending transfers (ids: pending id with RESOLVE_BIT) and record the new states."""
        n = len(tids)
        tr = np.zeros(n, dtype=TRANSFER_DTYPE)
        ids = u128_to_words(tids, field="transfer_id")
        tr["pending_id"] = ids
        tr["id"] = ids
        tr["id"][:, 1] |= np.uint64(RESOLVE_BIT >> 64)
        tr["amount"][:, 0] = amounts if post else 0
        tr["flags"] = TransferFlags.POST_PENDING_TRANSFER if post else TransferFlags.VOID_PENDING_TRANSFER
        status = self.ledger.create_transfers(tr)
        done = ReviewState.POSTED if post else (ReviewState.EXPIRED if expiring else ReviewState.VOIDED)
        state = np.full(n, done, np.uint8)
        state[status == CT.PENDING_TRANSFER_EXPIRED] = ReviewState.EXPIRED
        state[status == CT.PENDING_TRANSFER_ALREADY_POSTED] = ReviewState.POSTED
        state[status == CT.PENDING_TRANSFER_ALREADY_VOIDED] = ReviewState.VOIDED
        unexpected = ~np.isin(status, (0, CT.PENDING_TRANSFER_EXPIRED, CT.PENDING_TRANSFER_ALREADY_POSTED,
                                       CT.PENDING_TRANSFER_ALREADY_VOIDED))
        if unexpected.any():
            bad = int(status[unexpected][0])
            raise BlazilError(f"ledger refused to {'post' if post else 'void'} pending transfer "
                              f"{tids[int(np.argmax(unexpected))]}: {CT(bad).name.lower()}")
        ch = change_rows(ids, at=time.time_ns())
        ch["state"] = state
        self.store.add_changes(ch)
        self.store.sync()
        for s in state.tolist():
            _REVIEWS.labels(ReviewState(s).name.lower()).inc()
        _PENDING.dec(n)
        return state

    def expire_reviews(self, now: float | None = None) -> int:
        """Void every pending review whose timeout has passed; returns how many were closed."""
        now = time.time() if now is None else now
        with self._review_lock:
            tids, amounts = [], []
            while self._expiry and self._expiry[0][0] <= now:
                _, tid = heapq.heappop(self._expiry)
                r = self.store.row_of(tid)
                if r is None or int(self.store.rows["state"][r]) != ReviewState.PENDING:
                    continue
                tids.append(tid)
                amounts.append(int(self.store.rows["amount"][r]))
            if tids:
                self._resolve(tids, amounts, post=False, expiring=True)
        return len(tids)

    def _sweep_loop(self) -> None:
        while not self._stop_sweep.wait(self._sweep_interval):
            try:
                self.expire_reviews()
            except Exception as e:  # the ledger may be closing; the next sweep retries
                log.warning("review expiry sweep failed: %s", e)

    def stats(self) -> dict[str, Any]:
        """Decision counts, the policy in force and what start-up recovered."""
        return {"counts": self.store.counts(), "policy": {"model_version": self.policy.model_version,
                                                          "review_at": self.policy.review_at,
                                                          "reject_at": self.policy.reject_at,
                                                          "review_timeout_s": self.policy.review_timeout_s},
                "recovered": self.recovered}

    def close(self) -> None:
        """Finish queued requests, stop the threads, close the decision log and (if it opened it) the ledger."""
        if self._closed:
            return
        self._closed = True
        self._ring.close()
        self._worker.join()
        self._committer.join()
        self._completer.join()
        self._stop_sweep.set()
        self._sweeper.join()
        self.store.close()
        if self._own_ledger:
            self.ledger.close()

    def __enter__(self) -> FraudService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
