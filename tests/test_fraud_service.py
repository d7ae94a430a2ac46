"""Fraud-scored transfers with a real trained ONNX model and the real embedded ledger."""

from __future__ import annotations

import time

import numpy as np
import pytest

from blazil_ai import ledger as L
from blazil_ai.errors import ConfigError, DataError
from blazil_ai.fraud import FraudService, Outcome, make_requests, request_records
from blazil_ai.fraud.features import VelocityWindow
from blazil_ai.fraud.simulate import open_accounts, simulated_requests
from blazil_ai.ledger.types import AccountFilter, AccountFilterFlags, TransferFlags

APPROVED, REVIEW, REJECTED, FAILED = (int(o) for o in Outcome)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from blazil_ai.datasets.samples import _write_features
    from blazil_ai.models.fraud import train_fraud_model

    out = tmp_path_factory.mktemp("fraud-model")
    return train_fraud_model(_write_features(out, seed=0, n=4000), out / "models", seed=0)


def service(tmp_path, model, **kw) -> FraudService:
    return FraudService(tmp_path / "data", model, fsync=False, **kw)


def test_velocity_features_equal_the_simulators(tmp_path):
    from blazil_ai.datasets.transactions import simulate_transactions

    cols = simulate_transactions(4000, seed=3, fraud_rate=0.03)
    w = VelocityWindow(depth=64)
    got: dict[str, list[np.ndarray]] = {k: [] for k in ("tx_count_1h", "tx_count_24h", "amount_sum_24h",
                                                          "amount_ratio", "seconds_since_last")}
    for s in range(0, 4000, 777):  # batch edges fall inside accounts' histories
        acc = cols["account_id"][s:s + 777].astype(np.uint64)
        t, am = cols["timestamp"][s:s + 777], cols["amount"][s:s + 777]
        rows = w.account_rows(acc)
        for k, v in w.features(rows, t, am).items():
            got[k].append(v)
        w.add(rows, t, am)
    for k, parts in got.items():
        # the simulator's own times are rounded to milliseconds when written, hence 1e-3 on seconds
        np.testing.assert_allclose(np.concatenate(parts), cols[k], rtol=1e-9, atol=2e-3, err_msg=k)


def test_each_threshold_decides_and_the_ledger_agrees(tmp_path, model):
    req, cols = simulated_requests(3000, seed=11, fraud_rate=0.06)
    with service(tmp_path, model, review_at=0.2, reject_at=0.8) as svc:
        open_accounts(svc.ledger, req)
        res = svc.decide(req)
        s = res.score
        assert np.isfinite(s).all()
        np.testing.assert_array_equal(res.outcome == APPROVED, s < 0.2)
        np.testing.assert_array_equal(res.outcome == REVIEW, (s >= 0.2) & (s < 0.8))
        np.testing.assert_array_equal(res.outcome == REJECTED, s >= 0.8)
        counts = res.counts()
        assert counts["approved"] and counts["review"] and counts["rejected"], counts
        # Fraud is what gets stopped: the model was trained on the same simulator.
        stopped = res.outcome != APPROVED
        assert cols["is_fraud"][stopped].mean() > 0.5
        ids = [int(i) for i in req["id"][:, 0]]
        found = {t.id: t for t in svc.ledger.lookup_transfers(ids)}
        for i, o in zip(ids, res.outcome.tolist()):
            t = found.get(i)
            if o == APPROVED:
                assert t is not None and t.flags == TransferFlags.NONE
            elif o == REVIEW:
                assert t is not None and t.flags == TransferFlags.PENDING and t.timeout == 3600
            else:
                assert t is None
        # The transaction context is kept on the transfer: event time in microseconds.
        one = found[ids[int(np.argmax(res.outcome == APPROVED))]]
        assert one.user_data_64 == round(float(req["time"][ids.index(one.id)]) * 1e6)


def test_decisions_are_stored_with_score_model_and_reason_and_survive_restart(tmp_path, model):
    req, _ = simulated_requests(500, seed=12, fraud_rate=0.1)
    with service(tmp_path, model, review_at=0.3, reject_at=0.7) as svc:
        open_accounts(svc.ledger, req)
        res = svc.decide(req)
        version = svc.policy.model_version
    assert version.startswith("fraud.onnx@")
    with service(tmp_path, model, review_at=0.3, reject_at=0.7) as svc:
        assert svc.recovered["decisions"] == 500 and svc.recovered["withdrawn"] == 0
        assert svc.recovered["history_transfers"] == int((res.outcome != REJECTED).sum())
        for i in (0, int(np.argmax(res.outcome == REVIEW)), int(np.argmax(res.outcome == REJECTED))):
            d = svc.decision(int(req["id"][i, 0]))
            assert d is not None
            assert d.score == pytest.approx(float(res.score[i]))
            assert d.outcome == Outcome(int(res.outcome[i])).name.lower()
            assert d.model_version == version
            assert f"{d.score:.4f}" in d.reason
            assert d.amount == int(req["amount"][i]) and d.debit_account_id == int(req["debit_account_id"][i])
        rejected = svc.decisions(outcome="rejected", limit=1000)
        assert len(rejected) == int((res.outcome == REJECTED).sum())
        assert all(">= reject threshold 0.7" in d.reason for d in rejected)
        assert svc.decision(10**30) is None


def balances(svc, account: int) -> tuple[int, int]:
    (a,) = svc.ledger.lookup_accounts([account])
    return a.debits_pending, a.debits_posted


def test_reviewers_post_and_void_held_transfers(tmp_path, model):
    req, _ = simulated_requests(2000, seed=13, fraud_rate=0.06)
    with service(tmp_path, model, review_at=0.2, reject_at=0.95) as svc:
        open_accounts(svc.ledger, req)
        res = svc.decide(req)
        held = np.flatnonzero(res.outcome == REVIEW)
        assert len(held) >= 2
        a, b = int(held[0]), int(held[1])
        for i, approve in ((a, True), (b, False)):
            tid, acc, amt = int(req["id"][i, 0]), int(req["debit_account_id"][i]), int(req["amount"][i])
            pending0, posted0 = balances(svc, acc)
            d = svc.review(tid, approve)
            pending1, posted1 = balances(svc, acc)
            assert d.review_state == ("posted" if approve else "voided")
            assert pending1 == pending0 - amt
            assert posted1 == posted0 + (amt if approve else 0)
            with pytest.raises(DataError, match="already"):
                svc.review(tid, not approve)
        with pytest.raises(DataError, match="not sent to review"):
            svc.review(int(req["id"][int(np.argmax(res.outcome == APPROVED)), 0]), True)
        with pytest.raises(DataError, match="no decision"):
            svc.review(10**20, True)
        assert svc.decision(int(req["id"][a, 0])).review_state == "posted"


def test_an_expired_review_is_voided(tmp_path, model):
    req, _ = simulated_requests(1500, seed=14, fraud_rate=0.06)
    with service(tmp_path, model, review_at=0.2, reject_at=0.95, review_timeout_s=1, sweep_interval=0.1) as svc:
        open_accounts(svc.ledger, req)
        res = svc.decide(req)
        held = np.flatnonzero(res.outcome == REVIEW)
        assert len(held)
        tid = int(req["id"][held[0], 0])
        assert svc.decision(tid).review_state == "pending"
        # The holds were made in chunks microseconds apart, so a sweep may expire some of them one sweep
        # (0.1 s) after the others: wait for every one.
        deadline = time.monotonic() + 10
        states = ["pending"]
        while "pending" in states and time.monotonic() < deadline:
            time.sleep(0.1)
            states = [svc.decision(int(req["id"][i, 0])).review_state for i in held]
        assert states == ["expired"] * len(held)
        totals = svc.ledger.backend.call("totals")
        assert totals["debits_pending"] == 0 and totals["credits_pending"] == 0  # every hold released
        with pytest.raises(DataError, match="already expired"):
            svc.review(tid, True)


def test_missing_or_corrupt_model_refuses_to_start(tmp_path, model):
    with pytest.raises(ConfigError, match="not found"):
        FraudService(tmp_path / "d1", tmp_path / "nope.onnx")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "fraud.onnx").write_bytes(b"\x08\x07garbage, not a protobuf" * 10)
    (bad / "fraud.norm.json").write_text(model.with_name("fraud.norm.json").read_text())
    with pytest.raises(ConfigError, match="corrupt|cannot be used"):
        FraudService(tmp_path / "d2", bad / "fraud.onnx")
    nonorm = tmp_path / "nonorm"
    nonorm.mkdir()
    (nonorm / "fraud.onnx").write_bytes(model.read_bytes())
    with pytest.raises(ConfigError, match="normalisation"):
        FraudService(tmp_path / "d3", nonorm / "fraud.onnx")
    assert not (tmp_path / "d1" / "decisions").exists()  # nothing was started


def test_a_model_error_at_run_time_sends_to_review_never_approve(tmp_path, model):
    req, _ = simulated_requests(800, seed=15, fraud_rate=0.03)
    with service(tmp_path, model) as svc:
        open_accounts(svc.ledger, req)
        real = svc.scorer.session.run

        def broken(feeds):  # the real session, failing as a crashed or corrupted runtime would
            raise RuntimeError("onnxruntime: [ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION")
        svc.scorer.session.run = broken
        res = svc.decide(req[:400])
        assert (res.outcome == REVIEW).all() and np.isnan(res.score).all()
        d = svc.decision(int(req["id"][0, 0]))
        assert d.reason.startswith("model error") and d.score is None and d.review_state == "pending"

        def nan_scores(feeds):
            out = real(feeds)
            out[0][: len(out[0]) // 2] = np.nan
            return out
        svc.scorer.session.run = nan_scores
        res = svc.decide(req[400:])
        assert (res.outcome[np.isnan(res.score)] == REVIEW).all()
        assert np.isnan(res.score).sum() == 200
        assert not (res.outcome[np.isnan(res.score)] == APPROVED).any()


def test_resubmitted_ids_get_the_stored_decision_and_no_second_transfer(tmp_path, model):
    req, _ = simulated_requests(600, seed=16)
    with service(tmp_path, model) as svc:
        open_accounts(svc.ledger, req)
        first = svc.decide(req[:400])
        before = svc.ledger.backend.call("totals")
        again = svc.decide(np.concatenate([req[:400], req[:10]]))  # a retry, plus duplicates in the batch
        np.testing.assert_array_equal(again.outcome[:400], first.outcome)
        np.testing.assert_array_equal(again.outcome[400:], first.outcome[:10])
        np.testing.assert_array_equal(again.score[:400], first.score)
        assert svc.ledger.backend.call("totals") == before
        dup = svc.decide(np.concatenate([req[400:500], req[400:450]]))
        np.testing.assert_array_equal(dup.outcome[100:], dup.outcome[:50])
        assert svc.store.n == 500


def test_ledger_refusal_is_recorded(tmp_path, model):
    req, _ = simulated_requests(50, seed=17)
    with service(tmp_path, model, reject_at=1.0) as svc:  # no accounts opened
        res = svc.decide(req)
        assert (res.outcome == FAILED).all()
        d = svc.decision(int(req["id"][0, 0]))
        assert d.outcome == "failed" and d.ledger_status == "debit_account_not_found"
        assert "ledger refused" in d.reason


def test_bad_requests_name_the_field(tmp_path, model):
    base = {"id": [1], "debit_account_id": [5], "credit_account_id": [6], "amount": [100], "time": [1.7e9]}
    for field, value, words in (("amount", [0], "amount must be positive"),
                                ("credit_account_id", [5], "must differ"),
                                ("time", [float("nan")], "time must be"),
                                ("id", [0], "id")):
        with pytest.raises(DataError, match=words) as e:
            make_requests({**base, field: value})
        assert e.value.field == field if hasattr(e.value, "field") else True
    with pytest.raises(DataError, match="'amount' missing"):
        request_records([{"id": 1, "debit_account_id": 1, "credit_account_id": 2}])
    with pytest.raises(DataError, match="amount': 'ten' is not a whole number"):
        request_records([{"id": 1, "debit_account_id": 1, "credit_account_id": 2, "amount": "ten"}])
    with service(tmp_path, model) as svc:
        with pytest.raises(DataError, match="expected REQUEST_DTYPE"):
            svc.submit(np.zeros(3, dtype=L.TRANSFER_DTYPE))


def test_unknown_context_values_use_the_models_other_slot(tmp_path, model):
    reqs = request_records([{"id": 7, "debit_account_id": 1000, "credit_account_id": 1, "amount": 2599,
                             "time": 1.77e9, "merchant_category": "spaceships", "channel": "online",
                             "country": "ZZ"}])
    with service(tmp_path, model) as svc:
        open_accounts(svc.ledger, reqs)
        res = svc.decide(reqs)
        assert np.isfinite(res.score).all()
        hist = svc.ledger.get_account_transfers(AccountFilter(1000, 0, 0, 0, 0, 0, 0, 10, AccountFilterFlags.DEBITS))
        assert len(hist) == (0 if res.outcome[0] == REJECTED else 1)


def test_a_decision_whose_transfer_never_reached_the_ledger_is_withdrawn_at_start(tmp_path, model):
    """The crash point between the decision-log fsync and the ledger write, made exactly."""
    from blazil_ai.fraud.store import DECISION_DTYPE, DecisionStore

    req, _ = simulated_requests(100, seed=18)
    with service(tmp_path, model) as svc:
        open_accounts(svc.ledger, req)
        svc.decide(req[:50])
    store = DecisionStore(tmp_path / "data" / "decisions")
    rows = np.zeros(3, dtype=DECISION_DTYPE)
    for f in ("id", "debit_account_id", "credit_account_id", "amount", "time"):
        rows[f] = req[50:53][f]
    rows["outcome"], rows["reason"], rows["score"] = APPROVED, 1, 0.01
    store.add_decisions(rows)
    store.sync()
    store.close()
    with service(tmp_path, model) as svc:
        assert svc.recovered["withdrawn"] == 3
        assert svc.decision(int(req["id"][50, 0])) is None
        assert svc.decision(int(req["id"][0, 0])) is not None
        res = svc.decide(req[50:53])  # the client's retry is scored afresh and reaches the ledger
        ids = [int(i) for i in req["id"][50:53, 0]]
        sent = [i for i, o in zip(ids, res.outcome.tolist()) if o in (APPROVED, REVIEW)]
        assert {t.id for t in svc.ledger.lookup_transfers(ids)} == set(sent)
    with service(tmp_path, model) as svc:  # and the withdrawal itself is durable
        assert svc.recovered["withdrawn"] == 0 and svc.store.counts()["approved"] >= len(sent)


def test_a_torn_decision_log_tail_is_cut_off(tmp_path, model, caplog):
    from blazil_ai.fraud.store import scan_log

    req, _ = simulated_requests(200, seed=19)
    with service(tmp_path, model) as svc:
        open_accounts(svc.ledger, req)
        svc.decide(req[:100])
    log = tmp_path / "data" / "decisions" / "decisions.log"
    end = scan_log(log)[2]
    with open(log, "r+b") as f:  # a crash in the middle of writing the next frame: never acknowledged
        f.seek(end)
        f.write(b"BLD2" + bytes(range(60)))
    with caplog.at_level("WARNING"), service(tmp_path, model) as svc:
        assert svc.recovered["truncated_bytes"] > 0
        assert f"decisions.log: torn write at byte offset {end}" in caplog.text
        assert svc.decision(int(req["id"][0, 0])) is not None
        assert svc.decide(req[100:]).outcome.all()
    with service(tmp_path, model) as svc:
        assert svc.decision(int(req["id"][150, 0])) is not None and svc.recovered["truncated_bytes"] == 0


@pytest.mark.parametrize("where", ["header", "payload", "truncate"])
def test_damage_to_an_acknowledged_decision_frame_is_refused_and_repaired_on_request(tmp_path, model, where):
    """Found 9: one flipped bit anywhere in decisions.log silently deleted every later acknowledged decision."""
    import subprocess
    import sys
    from pathlib import Path

    from blazil_ai.fraud.store import POLICY, scan_log

    req, _ = simulated_requests(300, seed=23)
    with service(tmp_path, model) as svc:
        open_accounts(svc.ledger, req)
        for k in range(0, 300, 100):
            svc.decide(req[k: k + 100])
    log = tmp_path / "data" / "decisions" / "decisions.log"
    frames = [f for f in scan_log(log)[0] if f.kind != POLICY]
    first = frames[0]  # the first batch's decisions; later frames hold acknowledged decisions too
    data = bytearray(log.read_bytes())
    if where == "truncate":
        data = data[: frames[-1].offset + 100]
    else:
        data[first.offset + (20 if where == "header" else 48 + 64)] ^= 0x10
    log.write_bytes(bytes(data))
    off = frames[-1].offset if where == "truncate" else first.offset
    with pytest.raises(DataError, match=rf"decisions.log: .*damaged at byte offset {off} "):
        service(tmp_path, model)
    run = [sys.executable, "-m", "blazil_ai", "ledger"]
    repo = Path(__file__).resolve().parent.parent
    out = subprocess.run([*run, "verify", str(tmp_path / "data")], cwd=repo, capture_output=True, text=True)
    assert out.returncode == 1 and f"byte offset {off}" in out.stdout
    out = subprocess.run([*run, "repair", str(tmp_path / "data"), "--yes"], cwd=repo, capture_output=True, text=True)
    assert out.returncode == 0 and "dropped:" in out.stdout, out.stdout + out.stderr
    with service(tmp_path, model) as svc:
        lost = range(0, 100) if where != "truncate" else range(200, 300)
        kept = [k for k in range(300) if k not in lost]
        assert all(svc.decision(int(req["id"][k, 0])) is not None for k in kept)


@pytest.mark.parametrize("gone", ["decisions", "ledger"])
def test_a_deleted_decision_log_or_ledger_is_refused(tmp_path, model, gone):
    """A missing half of the service's data must not start afresh beside the other half."""
    import shutil

    req, _ = simulated_requests(100, seed=29)
    with service(tmp_path, model) as svc:
        open_accounts(svc.ledger, req)
        svc.decide(req)
    shutil.rmtree(tmp_path / "data" / gone)
    with pytest.raises(DataError, match=rf"data/{gone}.*is missing"):
        service(tmp_path, model)
    assert not (tmp_path / "data" / gone).exists()
