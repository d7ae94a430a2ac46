"""TigerBeetle's answer where the embedded engine, the sharded ledger or the cluster backend once answered
otherwise (each case: the real server's answer; every test runs on the embedded engine, a 4-shard ledger and,
when BLAZIL_TIGERBEETLE_BIN names the server, a real replica, so the expected answers are checked against it).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from blazil_ai import ledger as L
from blazil_ai.errors import DataError
from blazil_ai.ledger import AMOUNT_MAX
from blazil_ai.ledger import AccountFlags as AF
from blazil_ai.ledger import CreateAccountStatus as CA
from blazil_ai.ledger import CreateTransferStatus as CT
from blazil_ai.ledger import TransferFlags as TF
from blazil_ai.ledger.shards import shard_of

SHARDS = 4


class Backend:
    """A client and fresh ids: accounts and transfers of one test never meet another test's."""

    def __init__(self, kind: str, client: L.LedgerClient) -> None:
        self.kind = kind
        self.c = client
        self._ids = itertools.count((L.id() >> 32) << 32)
        self.ledger = 1 + (L.id() & 0x7FFF_FFFF)  # a ledger of its own, for queries on a shared cluster

    def new_id(self) -> int:
        return next(self._ids) + 1

    def accounts(self, n: int, *, same_shard: bool | None = None, flags: list[AF] | None = None) -> list[int]:
        """``n`` new accounts; ``same_shard`` True/False asks for one shard/different shards (sharded ledger)."""
        ids: list[int] = []
        while len(ids) < n:
            i = self.new_id()
            if self.kind == "sharded" and ids and same_shard is not None:
                if (shard_of(i, SHARDS) == shard_of(ids[0], SHARDS)) != same_shard:
                    continue
                if not same_shard and any(shard_of(i, SHARDS) == shard_of(j, SHARDS) for j in ids):
                    continue
            ids.append(i)
        res = self.c.create_accounts([L.Account(id=i, ledger=self.ledger, code=1,
                                                flags=(flags[k] if flags else AF.NONE)) for k, i in enumerate(ids)])
        assert [r.status for r in res] == [CA.CREATED] * n
        return ids

    def transfer(self, **kw) -> L.Transfer:
        base = dict(id=self.new_id(), amount=10, ledger=self.ledger, code=1)
        base.update(kw)
        return L.Transfer(**base)

    def statuses(self, *transfers: L.Transfer) -> list[CT]:
        return [r.status for r in self.c.create_transfers(list(transfers))]


@pytest.fixture(params=["embedded", "sharded", "tigerbeetle"])
def backend(request, tmp_path):
    if request.param == "tigerbeetle":
        replica = request.getfixturevalue("tigerbeetle")
        with L.connect(f"tigerbeetle://{replica.address}") as c:
            yield Backend("tigerbeetle", c)
        return
    shards = SHARDS if request.param == "sharded" else None
    with L.connect(tmp_path / "ledger", shards=shards, fsync=False, create=True) as c:
        yield Backend(request.param, c)


def _pending(b: Backend, dr: int, cr: int, amount: int = 10, **kw) -> L.Transfer:
    kw.setdefault("flags", TF.PENDING)
    p = b.transfer(debit_account_id=dr, credit_account_id=cr, amount=amount, **kw)
    assert b.statuses(p) == [CT.CREATED]
    return p


# 1
def test_void_with_amount_max_exceeds_the_pending_amount(backend):
    b = backend
    a, c = b.accounts(2)
    p = _pending(b, a, c)
    assert b.statuses(b.transfer(pending_id=p.id, amount=AMOUNT_MAX, ledger=0, code=0,
                                 flags=TF.VOID_PENDING_TRANSFER)) == [CT.EXCEEDS_PENDING_TRANSFER_AMOUNT]
    assert b.statuses(b.transfer(pending_id=p.id, amount=0, ledger=0, code=0,
                                 flags=TF.VOID_PENDING_TRANSFER)) == [CT.CREATED]
    assert b.statuses(b.transfer(pending_id=p.id, amount=AMOUNT_MAX, ledger=0, code=0,
                                 flags=TF.VOID_PENDING_TRANSFER)) == [CT.EXCEEDS_PENDING_TRANSFER_AMOUNT]


# 2
def test_posting_a_closing_transfer_of_a_closed_account_is_refused(backend):
    b = backend
    a, c = b.accounts(2, same_shard=True)
    p = _pending(b, a, c, flags=TF.PENDING | TF.CLOSING_DEBIT)
    assert b.c.lookup_accounts([a])[0].flags & AF.CLOSED
    post = b.transfer(pending_id=p.id, amount=AMOUNT_MAX, ledger=0, code=0, flags=TF.POST_PENDING_TRANSFER)
    assert b.statuses(post) == [CT.DEBIT_ACCOUNT_ALREADY_CLOSED]
    assert b.c.lookup_accounts([a])[0].debits_posted == 0  # no money left the closed account
    assert b.statuses(b.transfer(pending_id=p.id, ledger=0, code=0, amount=0,
                                 flags=TF.VOID_PENDING_TRANSFER)) == [CT.CREATED]
    assert not b.c.lookup_accounts([a])[0].flags & AF.CLOSED  # voiding reopens it


# 3
def test_last_linked_event_after_a_broken_chain_is_chain_open(backend):
    b = backend
    a, c = b.accounts(2, same_shard=True)
    t = [b.transfer(debit_account_id=a, credit_account_id=c, flags=TF.LINKED, code=0),
         b.transfer(debit_account_id=a, credit_account_id=c, flags=TF.LINKED)]
    assert b.statuses(*t) == [CT.CODE_MUST_NOT_BE_ZERO, CT.LINKED_EVENT_CHAIN_OPEN]
    t = [b.transfer(debit_account_id=a, credit_account_id=c, flags=TF.LINKED),
         b.transfer(debit_account_id=a, credit_account_id=c, flags=TF.LINKED, code=0),
         b.transfer(debit_account_id=a, credit_account_id=c, flags=TF.LINKED)]
    assert b.statuses(*t) == [CT.LINKED_EVENT_FAILED, CT.CODE_MUST_NOT_BE_ZERO, CT.LINKED_EVENT_CHAIN_OPEN]
    i, j = b.new_id(), b.new_id()
    if b.kind == "sharded":
        while shard_of(j, SHARDS) != shard_of(i, SHARDS):
            j = b.new_id()
    res = b.c.create_accounts([L.Account(id=i, ledger=b.ledger, code=0, flags=AF.LINKED),
                               L.Account(id=j, ledger=b.ledger, code=1, flags=AF.LINKED)])
    assert [r.status for r in res] == [CA.CODE_MUST_NOT_BE_ZERO, CA.LINKED_EVENT_CHAIN_OPEN]
    assert b.c.lookup_accounts([i, j]) == []


# 4
def test_post_of_zero_retried_with_amount_max_differs(backend):
    b = backend
    a, c = b.accounts(2)
    p = _pending(b, a, c)
    post = b.transfer(pending_id=p.id, amount=0, ledger=0, code=0, flags=TF.POST_PENDING_TRANSFER)
    assert b.statuses(post) == [CT.CREATED]
    assert b.c.lookup_transfers([post.id])[0].amount == 0
    again = L.Transfer(**{**{k: getattr(post, k) for k in post.__slots__}, "amount": AMOUNT_MAX})
    assert b.statuses(again) == [CT.EXISTS_WITH_DIFFERENT_AMOUNT]
    assert b.statuses(post) == [CT.EXISTS]


# 5
@pytest.mark.parametrize("field,status", [("user_data_64", CT.EXISTS_WITH_DIFFERENT_USER_DATA_64),
                                          ("user_data_32", CT.EXISTS_WITH_DIFFERENT_USER_DATA_32),
                                          ("user_data_128", CT.EXISTS_WITH_DIFFERENT_USER_DATA_128)])
def test_resolve_retried_with_zero_user_data_compares_with_the_pending_transfer(backend, field, status):
    b = backend
    a, c = b.accounts(2)
    p = _pending(b, a, c, **{field: 5})
    post = b.transfer(pending_id=p.id, amount=AMOUNT_MAX, ledger=0, code=0, flags=TF.POST_PENDING_TRANSFER,
                      **{field: 7})
    assert b.statuses(post) == [CT.CREATED]
    zero = L.Transfer(**{**{k: getattr(post, k) for k in post.__slots__}, field: 0})
    assert b.statuses(zero) == [status]  # 0 means "the pending transfer's" (5), the post stored 7
    assert b.statuses(post) == [CT.EXISTS]


# 6
def test_imported_transfers(backend):
    b = backend
    if b.kind == "sharded":
        with pytest.raises(DataError, match="imported"):
            b.c.create_transfers([b.transfer(debit_account_id=1, credit_account_id=2, flags=TF.IMPORTED,
                                             timestamp=1)])
        return
    a, c = b.accounts(2)
    latest = b.c.lookup_accounts([c])[0].timestamp
    ok = b.transfer(debit_account_id=a, credit_account_id=c, flags=TF.IMPORTED, timestamp=latest + 10)
    res = b.c.create_transfers([ok])
    assert [r.status for r in res] == [CT.CREATED] and res[0].timestamp == latest + 10
    assert b.c.lookup_transfers([ok.id])[0].timestamp == latest + 10
    assert b.c.create_transfers([ok])[0].status == CT.EXISTS  # idempotent before the timestamp checks
    cases = [
        ([dict(flags=TF.IMPORTED, timestamp=latest + 20), dict()],
         [CT.CREATED, CT.IMPORTED_EVENT_EXPECTED]),
        ([dict(), dict(flags=TF.IMPORTED, timestamp=latest + 30)],
         [CT.CREATED, CT.IMPORTED_EVENT_NOT_EXPECTED]),
        ([dict(flags=TF.IMPORTED, timestamp=0)], [CT.IMPORTED_EVENT_TIMESTAMP_OUT_OF_RANGE]),
        ([dict(flags=TF.IMPORTED, timestamp=1 << 63)], [CT.IMPORTED_EVENT_TIMESTAMP_OUT_OF_RANGE]),
        ([dict(flags=TF.IMPORTED, timestamp=(1 << 63) - 1)], [CT.IMPORTED_EVENT_TIMESTAMP_MUST_NOT_ADVANCE]),
        ([dict(flags=TF.IMPORTED, timestamp=latest + 10)], [CT.IMPORTED_EVENT_TIMESTAMP_MUST_NOT_REGRESS]),
        ([dict(flags=TF.IMPORTED, timestamp=latest)], [CT.IMPORTED_EVENT_TIMESTAMP_MUST_NOT_REGRESS]),  # an account's
        ([dict(flags=TF.IMPORTED | TF.PENDING, timeout=5, timestamp=(1 << 62))],
         [CT.IMPORTED_EVENT_TIMESTAMP_MUST_NOT_ADVANCE]),
    ]
    for kws, expected in cases:
        got = b.statuses(*[b.transfer(debit_account_id=a, credit_account_id=c, **kw) for kw in kws])
        assert got == expected, kws
    newest = max(t.timestamp for t in b.c.get_account_transfers(
        L.AccountFilter(a, 0, 0, 0, 0, 0, 0, 8000, L.AccountFilterFlags.DEBITS)))
    d = b.accounts(1)[0]  # created after every transfer so far
    later = b.transfer(debit_account_id=d, credit_account_id=c, flags=TF.IMPORTED, timestamp=newest + 1)
    assert b.statuses(later) == [CT.IMPORTED_EVENT_TIMESTAMP_MUST_POSTDATE_DEBIT_ACCOUNT]
    later = b.transfer(debit_account_id=c, credit_account_id=d, flags=TF.IMPORTED, timestamp=newest + 1)
    assert b.statuses(later) == [CT.IMPORTED_EVENT_TIMESTAMP_MUST_POSTDATE_CREDIT_ACCOUNT]
    d_ts = b.c.lookup_accounts([d])[0].timestamp
    pend = b.transfer(debit_account_id=a, credit_account_id=c, flags=TF.IMPORTED | TF.PENDING, timeout=5,
                      timestamp=d_ts + 1)
    assert b.statuses(pend) == [CT.IMPORTED_EVENT_TIMEOUT_MUST_BE_ZERO]


def test_imported_accounts(backend):
    b = backend
    if b.kind == "sharded":
        with pytest.raises(DataError, match="imported"):
            b.c.create_accounts([L.Account(id=b.new_id(), ledger=1, code=1, flags=AF.IMPORTED, timestamp=5)])
        return
    (a,) = b.accounts(1)
    latest = b.c.lookup_accounts([a])[0].timestamp
    i, j = b.new_id(), b.new_id()
    res = b.c.create_accounts([L.Account(id=i, ledger=b.ledger, code=1, flags=AF.IMPORTED, timestamp=latest + 5),
                               L.Account(id=j, ledger=b.ledger, code=1, flags=AF.IMPORTED, timestamp=latest + 5)])
    assert [r.status for r in res] == [CA.CREATED, CA.IMPORTED_EVENT_TIMESTAMP_MUST_NOT_REGRESS]
    assert res[0].timestamp == latest + 5 == b.c.lookup_accounts([i])[0].timestamp
    res = b.c.create_accounts([L.Account(id=b.new_id(), ledger=b.ledger, code=1),
                               L.Account(id=b.new_id(), ledger=b.ledger, code=1, flags=AF.IMPORTED, timestamp=9)])
    assert [r.status for r in res] == [CA.CREATED, CA.IMPORTED_EVENT_NOT_EXPECTED]


# 7
def test_failed_events_carry_their_own_timestamp(backend):
    b = backend
    a, c = b.accounts(2, same_shard=True)
    res = b.c.create_transfers([b.transfer(debit_account_id=a, credit_account_id=c),
                                b.transfer(debit_account_id=a, credit_account_id=c, code=0),
                                b.transfer(debit_account_id=a, credit_account_id=c)])
    assert [r.status for r in res] == [CT.CREATED, CT.CODE_MUST_NOT_BE_ZERO, CT.CREATED]
    assert res[0].timestamp < res[1].timestamp < res[2].timestamp
    if b.kind != "sharded":  # one clock: the event's timestamp is the batch's n consecutive ones
        assert res[1].timestamp == res[0].timestamp + 1
    acc = b.c.create_accounts([L.Account(id=b.new_id(), ledger=b.ledger, code=0)])
    assert acc[0].status == CA.CODE_MUST_NOT_BE_ZERO and acc[0].timestamp > 0


# 8
def test_failed_cross_shard_transfer_retried_fails_again(backend):
    b = backend
    a, c, d = b.accounts(3, same_shard=False)
    assert b.statuses(b.transfer(debit_account_id=a, credit_account_id=d, amount=AMOUNT_MAX - 5)) == [CT.CREATED]
    t = b.transfer(debit_account_id=a, credit_account_id=c, amount=10)
    assert b.statuses(t) == [CT.OVERFLOWS_DEBITS_POSTED]
    assert b.statuses(t) == [CT.OVERFLOWS_DEBITS_POSTED]  # not EXISTS: no such transfer exists
    assert b.c.lookup_transfers([t.id]) == []


# 9
def test_overflow_precedence_and_clearing_totals(backend):
    b = backend
    a, c, d, e = b.accounts(4, same_shard=False)
    half = (AMOUNT_MAX >> 1) + 1
    _pending(b, a, d, amount=half)
    # a's debits_pending + debits_posted would pass 2^128 (OVERFLOWS_DEBITS), a credits-side overflow too:
    assert b.statuses(b.transfer(debit_account_id=c, credit_account_id=d, amount=half)) == [CT.OVERFLOWS_CREDITS]
    assert b.statuses(b.transfer(debit_account_id=a, credit_account_id=c, amount=half)) == [CT.OVERFLOWS_DEBITS]
    # Two valid transfers whose sum passes 2^128 (the sharded ledger's clearing totals must not refuse them).
    assert b.statuses(b.transfer(debit_account_id=c, credit_account_id=e, amount=half)) == [CT.CREATED]
    assert b.statuses(b.transfer(debit_account_id=e, credit_account_id=c, amount=half)) == [CT.CREATED]


# 10
def test_balances_of_a_cross_shard_transfer_are_one_row(backend):
    b = backend
    a, c = b.accounts(2, same_shard=False, flags=[AF.HISTORY, AF.HISTORY])
    t = b.transfer(debit_account_id=a, credit_account_id=c, amount=7)
    p = b.transfer(debit_account_id=c, credit_account_id=a, amount=3, flags=TF.PENDING)
    assert b.statuses(t, p) == [CT.CREATED, CT.CREATED]
    post = b.transfer(pending_id=p.id, amount=AMOUNT_MAX, ledger=0, code=0, flags=TF.POST_PENDING_TRANSFER)
    assert b.statuses(post) == [CT.CREATED]
    both = L.AccountFilterFlags.DEBITS | L.AccountFilterFlags.CREDITS
    rows = b.c.get_account_balances(L.AccountFilter(a, 0, 0, 0, 0, 0, 0, 100, both))
    stamps = [x.timestamp for x in b.c.get_account_transfers(L.AccountFilter(a, 0, 0, 0, 0, 0, 0, 100, both))]
    assert [(r.debits_pending, r.debits_posted, r.credits_pending, r.credits_posted) for r in rows] == \
        [(0, 7, 0, 0), (0, 7, 3, 0), (0, 7, 0, 3)]
    assert [r.timestamp for r in rows] == stamps
    rev = b.c.get_account_balances(L.AccountFilter(a, 0, 0, 0, 0, 0, 0, 2, both | L.AccountFilterFlags.REVERSED))
    assert rev == rows[::-1][:2]


# 11
def test_query_accounts_in_creation_order(backend):
    b = backend
    ids = [b.new_id() for _ in range(24)]
    res = b.c.create_accounts([L.Account(id=i, ledger=b.ledger, code=1, user_data_32=77) for i in ids])
    assert all(r.status == CA.CREATED for r in res)
    q = b.c.query_accounts(L.QueryFilter(0, 0, 77, b.ledger, 0, 0, 0, 100, L.QueryFilterFlags.NONE))
    assert [x.id for x in q] == ids
    q = b.c.query_accounts(L.QueryFilter(0, 0, 77, b.ledger, 0, 0, 0, 5, L.QueryFilterFlags.REVERSED))
    assert [x.id for x in q] == ids[::-1][:5]


# 12
def test_numpy_account_with_reserved_field_is_refused(backend):
    b = backend
    arr = L.accounts_to_array([L.Account(id=b.new_id(), ledger=b.ledger, code=1)])
    arr["reserved"] = 1
    assert b.c.create_accounts(arr).tolist() == [int(CA.RESERVED_FIELD)]
    arr["reserved"] = 0
    assert b.c.create_accounts(arr).tolist() == [0]
    assert np.array_equal(b.c.create_accounts(arr), [int(CA.EXISTS)])


def test_sharded_timestamps_follow_the_request_and_survive_a_restart(tmp_path):
    # Events of one request are stamped by their place in it on whichever shard they land (the write-ahead log
    # keeps each event's offset), so queries list them in request order, before and after reopening.
    ids = list(range(1, 41))
    with L.connect(tmp_path / "s", shards=SHARDS, create=True) as c:
        c.create_accounts([L.Account(id=i, ledger=1, code=1) for i in ids])
        res = c.create_transfers([L.Transfer(id=100 + i, debit_account_id=i, credit_account_id=i % 40 + 1, amount=1,
                                             ledger=1, code=1) for i in ids])
        stamps = [r.timestamp for r in res]
        assert stamps == sorted(stamps) and stamps[-1] - stamps[0] == len(ids) - 1
        q = L.QueryFilter(0, 0, 0, 1, 0, 0, 0, 100, L.QueryFilterFlags.NONE)
        before = (c.query_accounts(q), c.query_transfers(q))
    assert [a.id for a in before[0]] == ids and [t.id for t in before[1]] == [100 + i for i in ids]
    with L.connect(tmp_path / "s") as c:
        assert (c.query_accounts(q), c.query_transfers(q)) == before
