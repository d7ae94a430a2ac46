"""Durability: the write-ahead log, recovery, checkpoints, kill -9 under load, a corrupted log."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from blazil_ai import ledger as L
from blazil_ai.errors import ConfigError, DataError
from blazil_ai.ledger.shards import ShardedLedger, shard_of
from blazil_ai.ledger.store import LocalLedger
from blazil_ai.ledger.wal import segments

REPO = Path(__file__).resolve().parent.parent


def batch(start: int, n: int, accounts: int = 50) -> np.ndarray:
    b = np.zeros(n, dtype=L.TRANSFER_DTYPE)
    b["id"][:, 0] = np.arange(start, start + n) + 1
    d = np.arange(start, start + n) % accounts
    b["debit_account_id"][:, 0] = d + 1
    b["credit_account_id"][:, 0] = (d + 1) % accounts + 1
    b["amount"][:, 0] = 7
    b["ledger"], b["code"] = 1, 1
    return b


def accounts(n: int = 50) -> list[L.Account]:
    return [L.Account(id=i, ledger=1, code=1) for i in range(1, n + 1)]


def test_reopen_replays_the_log(tmp_path):
    with L.connect(tmp_path, create=True) as c:
        c.create_accounts(accounts())
        for k in range(5):
            assert (c.create_transfers(batch(k * 100, 100)) == 0).all()
        before = c.lookup_accounts(list(range(1, 51)))
    with L.connect(tmp_path) as c:
        assert c.lookup_accounts(list(range(1, 51))) == before
        assert len(c.lookup_transfers([1, 250, 500])) == 3
        assert c.backend.replayed == 6


def test_checkpoint_bounds_replay(tmp_path):
    with L.connect(tmp_path, create=True) as c:
        c.create_accounts(accounts())
        c.create_transfers(batch(0, 100))
        c.checkpoint()
        c.create_transfers(batch(100, 100))
    assert len(segments(tmp_path)) == 1
    with L.connect(tmp_path) as c:
        assert c.backend.replayed == 1  # only the batch after the checkpoint
        assert c.backend.checkpoint_seq == 2
        assert len(c.lookup_transfers([1, 150])) == 2
        tot = c.backend.call("totals")
        assert tot["debits_posted"] == tot["credits_posted"] == 200 * 7


def test_automatic_checkpoint_by_log_size(tmp_path):
    with LocalLedger(tmp_path, create=True, checkpoint_bytes=64 * 1024) as led:
        led.create_accounts(L.accounts_to_array(accounts()))
        for k in range(8):
            led.create_transfers(batch(k * 200, 200))  # 25 KiB each
        assert led.checkpoint_seq > 0
    with LocalLedger(tmp_path) as led:
        assert led.replayed < 4 and led.engine.n_transfers == 1600


def test_corruption_before_the_end_stops_the_open(tmp_path):
    with L.connect(tmp_path, create=True) as c:
        c.create_accounts(accounts())
        c.create_transfers(batch(0, 10))
        c.create_transfers(batch(10, 10))
    seg = segments(tmp_path)[-1][1]
    data = bytearray(seg.read_bytes())
    data[200] ^= 0x01  # inside the first entry: not a torn tail
    seg.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"wal-0+1\.log.*damaged at byte offset 0 \(payload checksum mismatch\)"):
        L.connect(tmp_path)


def test_corrupt_checkpoint_stops_the_open(tmp_path):
    with L.connect(tmp_path, create=True) as c:
        c.create_accounts(accounts())
        c.checkpoint()
    ck = next(tmp_path.glob("checkpoint-*.npz"))
    ck.write_bytes(ck.read_bytes()[:100])
    with pytest.raises(DataError, match="checkpoint"):
        L.connect(tmp_path)


def test_directory_is_locked(tmp_path):
    with L.connect(tmp_path, create=True):
        with pytest.raises(ConfigError, match="already open"):
            L.connect(tmp_path)


def test_bad_inputs_name_the_fault(tmp_path):
    with L.connect(tmp_path, create=True) as c:
        with pytest.raises(DataError, match="transfer.amount.*event 0: -1"):
            c.create_transfers([L.Transfer(id=1, amount=-1)])
        with pytest.raises(DataError, match="user_data_32"):
            c.create_transfers([L.Transfer(id=1, user_data_32=1 << 32)])
        with pytest.raises(DataError, match="exceeds the limit of 8189"):
            c.create_transfers(np.zeros(8190, dtype=L.TRANSFER_DTYPE))
        with pytest.raises(DataError, match="expected TRANSFER_DTYPE"):
            c.create_transfers(np.zeros(3, dtype=np.int64))
    with pytest.raises(ConfigError, match="tcp://"):
        L.connect("http://example")


def _start_server(data: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "blazil_ai", "ledger", "serve", "--data", str(data),
                             "--create", "--listen", "tcp://127.0.0.1:0", "--json", "--metrics-port", "-1", *extra],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # type: ignore[union-attr]
    if not line:
        raise AssertionError(proc.stderr.read())  # type: ignore[union-attr]
    return proc, json.loads(line)["listen"]


def test_kill_9_under_load_keeps_every_acknowledged_transfer(tmp_path):
    data = tmp_path / "ledger"
    proc, uri = _start_server(data)
    acked: list[int] = []
    sent: list[int] = []
    stop = threading.Event()

    def load(worker: int) -> None:
        with L.connect(uri, timeout=5) as c:
            if worker == 0:
                c.create_accounts(accounts())
            k = 0
            while not stop.is_set():
                start = (worker * 10_000 + k) * 64
                sent.append(start)
                try:
                    st = c.create_transfers(batch(start, 64))
                except Exception:
                    return
                assert (st == 0).all()
                acked.append(start)
                k += 1
    t0 = threading.Thread(target=load, args=(0,))
    t0.start()
    time.sleep(0.5)
    workers = [threading.Thread(target=load, args=(w,)) for w in (1, 2)]
    for w in workers:
        w.start()
    time.sleep(1.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    stop.set()
    for w in [t0, *workers]:
        w.join(timeout=10)
    assert len(acked) > 5
    with LocalLedger(data) as led:
        eng = led.engine
        for start in sent:
            rows = [eng.transfer_row(start + i + 1) for i in range(64)]
            present = sum(r is not None for r in rows)
            if start in acked:
                assert present == 64, f"acknowledged batch {start} lost {64 - present} transfers"
            else:
                assert present in (0, 64), f"unacknowledged batch {start} is partly there ({present}/64)"
        tot = eng.totals()
        assert tot["debits_posted"] == tot["credits_posted"] == eng.n_transfers * 7


def _cross_pair(n: int) -> tuple[int, int]:
    for b in range(2, 50):
        if shard_of(1, n) != shard_of(b, n):
            return 1, b
    raise AssertionError


@pytest.mark.parametrize("point,committed", [("after_intent", False), ("after_prepare", False),
                                             ("after_decision", True), ("after_post", True)])
def test_crash_inside_a_cross_shard_transfer(tmp_path, point, committed):
    data = tmp_path / "sharded"
    a, b = _cross_pair(2)
    with L.connect(data, shards=2, create=True) as c:
        c.create_accounts(accounts())
    script = (f"from blazil_ai import ledger as L\n"
              f"c = L.connect({str(data)!r})\n"
              f"c.create_transfers([L.Transfer(id=777, debit_account_id={a}, credit_account_id={b}, amount=5, "
              f"ledger=1, code=1)])\n")
    env = dict(os.environ, BLAZIL_LEDGER_CRASH_AT=point)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    with ShardedLedger(data) as led:
        assert led.pending_legs() == 0  # both legs settled: posted, or voided
        c = L.client.EmbeddedClient(led)
        da, cb = c.lookup_accounts([a, b])
        assert (da.debits_posted, cb.credits_posted) == ((5, 5) if committed else (0, 0))
        assert (da.debits_pending, cb.credits_pending) == (0, 0)
        assert len(c.lookup_transfers([777])) == int(committed)
        tot = led.call("totals")
        assert tot["debits_posted"] == tot["credits_posted"]


class _Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000 * 10**9

    def __call__(self) -> int:
        return self.now


def test_cross_shard_pending_post_void_expire_and_reopen(tmp_path):
    a, b = _cross_pair(2)
    clock = _Clock()
    TF, CT = L.TransferFlags, L.CreateTransferStatus
    data = tmp_path / "sharded"

    def bal(c):
        x, y = c.lookup_accounts([a, b])
        return (x.debits_pending, x.debits_posted, y.credits_pending, y.credits_posted)

    with L.connect(data, shards=2, create=True, clock=clock) as c:
        c.create_accounts(accounts())
        res = c.create_transfers([
            L.Transfer(id=1, debit_account_id=a, credit_account_id=b, amount=50, ledger=1, code=1, flags=TF.PENDING),
            L.Transfer(id=2, pending_id=1, amount=20, flags=TF.POST_PENDING_TRANSFER),
            L.Transfer(id=3, pending_id=1, amount=0, flags=TF.VOID_PENDING_TRANSFER),
            L.Transfer(id=4, debit_account_id=a, credit_account_id=b, amount=30, ledger=1, code=1, flags=TF.PENDING),
            L.Transfer(id=5, debit_account_id=a, credit_account_id=b, amount=40, ledger=1, code=1, flags=TF.PENDING,
                       timeout=2),
        ])
        assert [r.status for r in res] == [CT.CREATED, CT.CREATED, CT.PENDING_TRANSFER_ALREADY_POSTED, CT.CREATED,
                                           CT.CREATED]
        assert bal(c) == (70, 20, 70, 20)
        assert [r.status for r in c.create_transfers([L.Transfer(id=6, pending_id=4, amount=0,
                                                                 flags=TF.VOID_PENDING_TRANSFER)])] == [CT.CREATED]
        assert bal(c) == (40, 20, 40, 20)
        clock.now += 3 * 10**9
        assert bal(c) == (0, 20, 0, 20)  # transfer 5 expired: both legs voided by the coordinator
        assert [r.status for r in c.create_transfers([L.Transfer(id=7, pending_id=5, amount=L.AMOUNT_MAX,
                                                                 flags=TF.POST_PENDING_TRANSFER)])] == \
            [CT.PENDING_TRANSFER_EXPIRED]
        post = c.lookup_transfers([2])[0]
        assert (post.debit_account_id, post.credit_account_id, post.amount, post.ledger) == (a, b, 20, 1)
        f = L.AccountFilter(a, 0, 0, 0, 0, 0, 0, 10, L.AccountFilterFlags.DEBITS)
        assert [t.id for t in c.get_account_transfers(f)] == [1, 2, 4, 5, 6]
        assert c.backend.pending_legs() == 0
    with L.connect(data, clock=clock) as c:
        assert bal(c) == (0, 20, 0, 20)
        assert c.backend.pending_legs() == 0
        assert [r.status for r in c.create_transfers([L.Transfer(id=2, pending_id=1, amount=20,
                                                                 flags=TF.POST_PENDING_TRANSFER)])] == [CT.EXISTS]


def test_crash_after_a_cross_shard_pending_is_decided(tmp_path):
    data = tmp_path / "sharded"
    a, b = _cross_pair(2)
    with L.connect(data, shards=2, create=True) as c:
        c.create_accounts(accounts())
    script = (f"from blazil_ai import ledger as L\n"
              f"c = L.connect({str(data)!r})\n"
              f"c.create_transfers([L.Transfer(id=9, debit_account_id={a}, credit_account_id={b}, amount=5, "
              f"ledger=1, code=1, flags=L.TransferFlags.PENDING)])\n")
    env = dict(os.environ, BLAZIL_LEDGER_CRASH_AT="after_decision")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    with L.connect(data) as c:
        assert c.backend.pending_legs() == 2  # decided: the hold stands on both shards
        assert c.lookup_accounts([a])[0].debits_pending == 5
        res = c.create_transfers([L.Transfer(id=10, pending_id=9, amount=L.AMOUNT_MAX,
                                             flags=L.TransferFlags.POST_PENDING_TRANSFER)])
        assert res[0].status == L.CreateTransferStatus.CREATED
        x, y = c.lookup_accounts([a, b])
        assert (x.debits_pending, x.debits_posted, y.credits_posted) == (0, 5, 5)
        assert c.backend.pending_legs() == 0
