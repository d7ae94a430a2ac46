"""``blazil transfer submit`` against a real ``blazil serve`` on loopback: what it reports and how it exits."""

from __future__ import annotations

import contextlib
import io
import json
import threading

import pytest

from blazil_ai import cli
from blazil_ai.fraud.server import FraudServer


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from blazil_ai.datasets.samples import _write_features
    from blazil_ai.models.fraud import train_fraud_model

    out = tmp_path_factory.mktemp("fraud-model")
    return train_fraud_model(_write_features(out, seed=0, n=4000), out / "models", seed=0)


@contextlib.contextmanager
def serving(data, model, review_at, reject_at):
    srv = FraudServer(data, model, "tcp://127.0.0.1:0", metrics_port=None, review_at=review_at, reject_at=reject_at,
                      fsync=False)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.stop()
        t.join(5)
        srv.close()


def blazil(*argv: object) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def test_a_rejected_transfer_has_no_ledger_status(tmp_path, model):
    with serving(tmp_path / "d", model, review_at=0.0, reject_at=0.0) as srv:  # every transfer is rejected
        uri = ["--connect", srv.uri]
        assert blazil("transfer", "accounts", *uri, 1, 2)[0] == 0
        code, out, _ = blazil("transfer", "submit", *uri, "--json", "--id", 5, "--from", 1, "--to", 2, "--amount", 100)
        d = json.loads(out)
        assert code == 0 and d["outcome"] == "rejected" and d["ledger_status"] is None
        code, out, _ = blazil("transfer", "submit", *uri, "--id", 6, "--from", 1, "--to", 2, "--amount", 100)
        assert code == 0 and "rejected" in out and "ledger=-" in out and "created" not in out


def test_a_reused_id_with_other_fields_is_refused_as_tigerbeetle_does(tmp_path, model):
    with serving(tmp_path / "d", model, review_at=1.0, reject_at=1.0) as srv:  # every transfer is approved
        uri = ["--connect", srv.uri]
        assert blazil("transfer", "accounts", *uri, 1, 2, 3)[0] == 0
        first = ["transfer", "submit", *uri, "--json", "--id", 77, "--from", 1, "--to", 2]
        code, out, _ = blazil(*first, "--amount", 100)
        assert code == 0 and json.loads(out)["ledger_status"] == "created"
        code, out, _ = blazil(*first, "--amount", 100)  # a retry of the same transfer: the stored decision
        assert code == 0 and json.loads(out)["outcome"] == "approved"
        code, out, err = blazil(*first, "--amount", 200)
        assert code == 1 and json.loads(out)["ledger_status"] == "exists_with_different_amount"
        assert json.loads(out)["outcome"] == "failed"
        assert err.startswith("blazil transfer submit: error: ") and "exists_with_different_amount" in err
        code, out, _ = blazil("transfer", "submit", *uri, "--json", "--id", 77, "--from", 1, "--to", 3,
                              "--amount", 100)
        assert code == 1 and json.loads(out)["ledger_status"] == "exists_with_different_credit_account_id"
        code, out, _ = blazil("transfer", "submit", *uri, "--json", "--id", 77, "--from", 3, "--to", 2,
                              "--amount", 100)
        assert code == 1 and json.loads(out)["ledger_status"] == "exists_with_different_debit_account_id"
        # the stored decision is the first one
        code, out, _ = blazil("transfer", "decision", *uri, "--json", 77)
        assert code == 0 and json.loads(out)["amount"] == 100
        # the same within one batch
        batch = tmp_path / "batch.jsonl"
        batch.write_text('{"id": 90, "debit_account_id": 1, "credit_account_id": 2, "amount": 5}\n'
                         '{"id": 90, "debit_account_id": 1, "credit_account_id": 2, "amount": 6}\n')
        code, out, _ = blazil("transfer", "submit", *uri, "--json", "--file", batch)
        rows = json.loads(out)
        assert code == 1 and [r["ledger_status"] for r in rows] == ["created", "exists_with_different_amount"]


def test_a_transfer_the_ledger_refuses_exits_non_zero(tmp_path, model):
    with serving(tmp_path / "d", model, review_at=1.0, reject_at=1.0) as srv:
        code, out, err = blazil("transfer", "submit", "--connect", srv.uri, "--json", "--from", 404, "--to", 405,
                                "--amount", 100)
        d = json.loads(out)
        assert code == 1 and d["outcome"] == "failed" and d["ledger_status"] == "debit_account_not_found"
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "debit_account_not_found" in lines[0]


def test_misspelled_and_unknown_fields_are_refused_before_anything_is_sent(tmp_path, model):
    with serving(tmp_path / "d", model, review_at=1.0, reject_at=1.0) as srv:
        uri = ["--connect", srv.uri]
        assert blazil("transfer", "accounts", *uri, 1, 2)[0] == 0
        f = tmp_path / "in.jsonl"
        f.write_text('{"id": 11, "debit_account_id": 1, "credit_account_id": 2, "amount": 5, "channel": "pos"}\n'
                     '{"id": 12, "debit_account_id": 1, "credit_account_id": 2, "amount": 5, "chanel": "pos"}\n')
        code, _, err = blazil("transfer", "submit", *uri, "--file", f)
        assert code == 1 and "line 2" in err and "'chanel'" in err and "did you mean 'channel'" in err
        assert blazil("transfer", "decision", *uri, 11)[0] == 1  # nothing of the file was submitted
        code, out, _ = blazil("transfer", "submit", *uri, "--json", "--id", 13, "--from", 1, "--to", 2,
                              "--amount", 2599, "--country", "GB", "--channel", "online")
        assert code == 0 and json.loads(out)["outcome"] == "approved"


def test_the_service_refuses_amounts_from_two_to_the_63(tmp_path, model):
    import numpy as np

    from blazil_ai.errors import DataError
    from blazil_ai.fraud.server import FraudClient
    from blazil_ai.fraud.types import make_requests

    cols = {"id": [1], "debit_account_id": [1], "credit_account_id": [2], "time": [1.7e9]}
    for amount in (2**63, 2**64 - 1):
        with pytest.raises(DataError, match="amount must be below 2\\^63"):
            make_requests({**cols, "amount": np.array([amount], dtype=np.uint64)})
    req = make_requests({**cols, "amount": [5]})
    req["amount"] = np.uint64(2**63)  # a client that builds its own arrays
    with serving(tmp_path / "d", model, review_at=1.0, reject_at=1.0) as srv, FraudClient(srv.uri) as c:
        with pytest.raises(DataError, match="amount must be below 2\\^63"):
            c.decide(req)
