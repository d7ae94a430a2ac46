"""Types mirror the official client; the ring buffer; the server, /metrics and the CLI; the TigerBeetle backend."""

from __future__ import annotations

import ctypes
import dataclasses
import json
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tigerbeetle as tb

from blazil_ai import ledger as L
from blazil_ai.errors import BlazilError, DataError
from blazil_ai.ledger.ring import RingBuffer, RingClosed
from blazil_ai.ledger.server import LedgerServer

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ types


@pytest.mark.parametrize("ours,theirs", [
    (L.AccountFlags, tb.AccountFlags), (L.TransferFlags, tb.TransferFlags),
    (L.AccountFilterFlags, tb.AccountFilterFlags), (L.QueryFilterFlags, tb.QueryFilterFlags),
    (L.CreateAccountStatus, tb.CreateAccountStatus), (L.CreateTransferStatus, tb.CreateTransferStatus),
])
def test_enums_match_the_official_client(ours, theirs):
    # Same names, same values, same declaration order (the precedence).
    assert [(m.name, m.value) for m in ours] == [(m.name, m.value) for m in theirs]


@pytest.mark.parametrize("ours,theirs", [
    (L.Account, tb.Account), (L.Transfer, tb.Transfer), (L.CreateAccountResult, tb.CreateAccountResult),
    (L.CreateTransferResult, tb.CreateTransferResult), (L.AccountFilter, tb.AccountFilter),
    (L.AccountBalance, tb.AccountBalance), (L.QueryFilter, tb.QueryFilter),
])
def test_records_match_the_official_client(ours, theirs):
    def shape(cls):
        return [(f.name, f.default if f.default is not dataclasses.MISSING else None) for f in dataclasses.fields(cls)]
    assert shape(ours) == shape(theirs)
    assert hasattr(ours, "__slots__")


@pytest.mark.parametrize("dtype,ctype", [(L.TRANSFER_DTYPE, tb.bindings.CTransfer),
                                          (L.ACCOUNT_DTYPE, tb.bindings.CAccount)])
def test_numpy_layout_is_tigerbeetles(dtype, ctype):
    assert dtype.itemsize == ctypes.sizeof(ctype) == 128
    for name, _t in ctype._fields_:
        assert dtype.fields[name][1] == getattr(ctype, name).offset, name
        assert dtype[name].itemsize == getattr(ctype, name).size, name


def test_bytes_equal_the_official_encoding():
    t = L.Transfer(id=(1 << 127) | 3, debit_account_id=5, credit_account_id=6, amount=(1 << 70) + 9, pending_id=0,
                   user_data_128=11, user_data_64=12, user_data_32=13, timeout=14, ledger=15, code=16,
                   flags=L.TransferFlags.PENDING)
    theirs = tb.bindings.CTransfer.from_param(tb.Transfer(**{k: getattr(t, k) for k in t.__slots__ if k != "flags"},
                                                          flags=tb.TransferFlags.PENDING))
    assert L.transfers_to_array([t]).tobytes() == bytes(theirs)
    assert L.array_to_transfers(L.transfers_to_array([t])) == [t]


def test_constants_and_ids():
    assert L.AMOUNT_MAX == tb.AMOUNT_MAX
    ids = [L.id() for _ in range(1000)]
    assert ids == sorted(ids) and len(set(ids)) == 1000 and all(0 < i < 1 << 128 for i in ids)


def test_field_widths_are_checked():
    with pytest.raises(DataError, match="account.code"):
        L.accounts_to_array([L.Account(id=1, code=1 << 16)])
    with pytest.raises(DataError, match="transfer.id"):
        L.transfers_to_array([L.Transfer(id=1 << 128)])


# ------------------------------------------------------------------ ring buffer


def test_ring_takes_everything_published_as_one_batch():
    ring: RingBuffer[int] = RingBuffer(8)
    assert [ring.publish(i) for i in range(5)] == [0, 1, 2, 3, 4]
    assert ring.take(timeout=0) == [0, 1, 2, 3, 4]
    assert ring.take(timeout=0) == []
    assert ring.cursor == ring.consumed == 4


def test_ring_size_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        RingBuffer(12)


def test_ring_back_pressure_and_many_producers():
    ring: RingBuffer[tuple[int, int]] = RingBuffer(4)
    with pytest.raises(TimeoutError):
        for i in range(5):
            ring.publish((0, i), timeout=0.05)
    ring.take(timeout=0)
    got: list[tuple[int, int]] = []

    def produce(p: int) -> None:
        for i in range(500):
            ring.publish((p, i))
    threads = [threading.Thread(target=produce, args=(p,)) for p in range(4)]
    for t in threads:
        t.start()
    while len(got) < 2000:
        batch = ring.take(timeout=1)
        assert len(batch) <= 4
        got.extend(batch)
    for t in threads:
        t.join()
    for p in range(4):  # each producer's items arrive in its order, none lost or repeated
        assert [i for q, i in got if q == p] == list(range(500))
    ring.close()
    with pytest.raises(RingClosed):
        ring.publish((9, 9))


# ------------------------------------------------------------------ server


@pytest.fixture
def server(tmp_path):
    srv = LedgerServer(tmp_path / "served", "tcp://127.0.0.1:0", metrics_port=0, create=True)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.stop()
    t.join(timeout=10)
    srv.close()


def test_server_round_trip_and_metrics(server):
    with L.connect(server.uri) as c:
        made = c.create_accounts([L.Account(id=1, ledger=1, code=1),
                                  L.Account(id=2, ledger=1, code=1, flags=L.AccountFlags.HISTORY)])
        assert [r.status for r in made] == [L.CreateAccountStatus.CREATED] * 2
        res = c.create_transfers([L.Transfer(id=10, debit_account_id=1, credit_account_id=2, amount=3, ledger=1,
                                             code=1, flags=L.TransferFlags.PENDING, timeout=30),
                                  L.Transfer(id=11, pending_id=10, amount=L.AMOUNT_MAX,
                                             flags=L.TransferFlags.POST_PENDING_TRANSFER)])
        assert [r.status for r in res] == [L.CreateTransferStatus.CREATED] * 2
        futures = [c.create_transfers_async(L.transfers_to_array([L.Transfer(id=100 + i, debit_account_id=1,
                                                                              credit_account_id=2, amount=1,
                                                                              ledger=1, code=1)]))
                   for i in range(20)]
        assert all((f.result(timeout=10) == 0).all() for f in futures)
        assert c.lookup_accounts([2])[0].credits_posted == 23
        f = L.AccountFilter(2, 0, 0, 0, 0, 0, 0, 5, L.AccountFilterFlags.CREDITS | L.AccountFilterFlags.REVERSED)
        assert [t.id for t in c.get_account_transfers(f)] == [119, 118, 117, 116, 115]
        bal = c.get_account_balances(L.AccountFilter(2, 0, 0, 0, 0, 0, 0, 3, L.AccountFilterFlags.CREDITS))
        assert [(b.credits_pending, b.credits_posted) for b in bal] == [(3, 0), (0, 3), (0, 4)]
        q = c.query_transfers(L.QueryFilter(0, 0, 0, 1, 0, 0, 0, 100, L.QueryFilterFlags.NONE))
        assert len(q) == 22
        with pytest.raises(DataError, match="exceeds the limit"):
            c.create_transfers(np.zeros(9000, dtype=L.TRANSFER_DTYPE))
    assert server.metrics is not None
    text = urllib.request.urlopen(server.metrics.url, timeout=5).read().decode()
    assert 'blazil_ledger_events_total{op="create_transfers"}' in text
    assert "blazil_ledger_batch_latency_seconds_bucket" in text


def test_every_layer_names_an_unknown_operation(server, tmp_path):
    # One table: the server answers a peer's unknown operation with a one-line DataError naming it, the
    # embedded backends refuse it the same way, and the names on the wire are the table's keys.
    assert L.Operation.of("create_transfers") is L.Operation.CREATE_TRANSFERS is L.Operation.of(147)
    with L.connect(server.uri) as c:
        for bad in ("transfer_everything", "totals", "CREATE_TRANSFERS"):
            with pytest.raises(DataError, match=f"unknown ledger operation '{bad}'") as e:
                c._rpc.send(bad, {}, []).result(timeout=10)  # type: ignore[attr-defined]
            assert "\n" not in str(e.value)
        assert c.lookup_accounts([1]) == []  # the server serves on
    with L.connect(tmp_path / "one", create=True) as one, L.connect(tmp_path / "two", shards=2, create=True) as two:
        for backend in (one.backend, two.backend):  # type: ignore[attr-defined]
            with pytest.raises(ValueError, match="unknown ledger operation 'transfer_everything'"):
                backend.call("transfer_everything")
            assert backend.call("totals")["debits_posted"] == 0


def test_cli_serve_help_and_inspect(tmp_path):
    run = [sys.executable, "-m", "blazil_ai.cli", "ledger"]
    out = subprocess.run([*run, "serve", "--help"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "--listen" in out and "--shards" in out and "fsync" in out
    with L.connect(tmp_path / "l", shards=2, create=True) as c:
        c.create_accounts([L.Account(id=i, ledger=1, code=1) for i in range(1, 5)])
        c.create_transfers([L.Transfer(id=i, debit_account_id=i, credit_account_id=i % 4 + 1, amount=2, ledger=1,
                                       code=1) for i in range(1, 5)])
    info = json.loads(subprocess.run([*run, "inspect", str(tmp_path / "l"), "--json"], cwd=REPO, capture_output=True,
                                     text=True, check=True).stdout)
    assert info["shards"] == 2 and info["balanced"] and info["unsettled_legs"] == 0
    assert sum(s["accounts"] for s in info["shard_details"]) >= 4
    bad = subprocess.run([*run, "inspect", str(tmp_path / "missing")], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 1 and "not a ledger directory" in bad.stderr


# ------------------------------------------------------------------ TigerBeetle cluster


def test_tigerbeetle_cluster_backend(tigerbeetle):
    with L.connect(f"tigerbeetle://{tigerbeetle.address}") as c:
        a, b, t = L.id(), L.id(), L.id()
        res = c.create_accounts([L.Account(id=a, ledger=1, code=1), L.Account(id=b, ledger=1, code=1)])
        assert [r.status for r in res] == [L.CreateAccountStatus.CREATED] * 2
        res = c.create_transfers([L.Transfer(id=t, debit_account_id=a, credit_account_id=b, amount=5, ledger=1,
                                             code=1), L.Transfer(id=L.id(), debit_account_id=a, credit_account_id=a,
                                                                 amount=1, ledger=1, code=1)])
        assert [r.status for r in res] == [L.CreateTransferStatus.CREATED,
                                           L.CreateTransferStatus.ACCOUNTS_MUST_BE_DIFFERENT]
        assert c.lookup_accounts([b])[0].credits_posted == 5
        assert c.lookup_transfers([t])[0].amount == 5


@pytest.mark.parametrize("script", ["ledger_quickstart.py", "ledger_server.py"])
def test_examples_run(script, tmp_path):
    args = [sys.executable, str(REPO / "examples" / script)]
    if script == "ledger_quickstart.py":
        args.append(str(tmp_path / "ledger"))
    out = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "8189 of 8189 created" in out.stdout or "blazil_ledger_fsyncs_total" in out.stdout


def _openssl(d: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)


def _pki(d: Path) -> None:
    for ca in ("ca", "rogue"):
        _openssl(d, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={ca}",
                 "-keyout", f"{ca}.key", "-out", f"{ca}.pem")
    for name, ca in (("server", "ca"), ("client", "ca"), ("intruder", "rogue")):
        _openssl(d, "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr")
        (d / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        _openssl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
                 "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem")


@pytest.mark.skipif(not __import__("shutil").which("openssl"), reason="the openssl command makes the test PKI")
def test_server_over_tls_with_client_certificates(tmp_path):
    pki = tmp_path / "pki"
    pki.mkdir()
    _pki(pki)
    listen = (f"tcps://127.0.0.1:0?certfile={pki / 'server.pem'}&keyfile={pki / 'server.key'}"
              f"&cafile={pki / 'ca.pem'}")
    srv = LedgerServer(tmp_path / "tls-ledger", listen, metrics_port=None, create=True)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        address = srv.uri.split("?")[0]
        with L.connect(address, certfile=str(pki / "client.pem"), keyfile=str(pki / "client.key"),
                       cafile=str(pki / "ca.pem")) as c:
            res = c.create_accounts([L.Account(id=1, ledger=1, code=1)])
            assert res[0].status == L.CreateAccountStatus.CREATED
            assert c.lookup_accounts([1])[0].id == 1
        with pytest.raises((BlazilError, TimeoutError, OSError)):  # a certificate from another CA is refused
            with L.connect(address, certfile=str(pki / "intruder.pem"), keyfile=str(pki / "intruder.key"),
                           cafile=str(pki / "ca.pem"), timeout=2) as bad:
                bad.lookup_accounts([1])
    finally:
        srv.stop()
        t.join(timeout=10)
        srv.close()


def test_tigerbeetle_fast_path_answers_as_the_official_client(tigerbeetle):
    # The same random batches (every flag, invalid fields, retries, posts/voids, imported events) through the fast
    # path (raw records to the native library) and the official ClientSync path, each in an id space of its own.
    from blazil_ai.ledger import differential as D

    with L.connect(f"tigerbeetle://{tigerbeetle.address}") as fast, \
            L.connect(f"tigerbeetle://{tigerbeetle.address}?native=0") as slow:
        assert fast.native and not slow.native
        sides = D.Side("fast", fast, True), D.Side("official", slow, True)
        events = 0
        for seed in range(12):
            worlds = [D.World(seed, nonce, imported=seed % 2 == 0, sharded=False) for nonce in (101, 202)]
            for b1, b2 in zip(*(w.batches(14) for w in worlds)):
                for b in (b1, b2):  # the official dataclass has no reserved field: such a record cannot go that way
                    for e in b.events:
                        e["reserved"] = 0 if "reserved" in e else None
                        if e["reserved"] is None:
                            del e["reserved"]
                sides[0].sync()  # one cluster: each side places imported events after the other's objects too
                s1, shape1, _ = sides[0].run(b1)
                sides[1].sync()
                s2, shape2, _ = sides[1].run(b2)
                assert (s1, shape1) == (s2, shape2), (seed, b1.events)
                events += len(s1)
            for w, side in zip(worlds, sides):
                w.balances = [(a.debits_pending, a.debits_posted, a.credits_pending, a.credits_posted, a.flags)
                              for a in side.c.lookup_accounts(w.accounts)]
            assert worlds[0].balances == worlds[1].balances
        assert events > 500
