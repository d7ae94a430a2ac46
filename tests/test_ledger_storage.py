"""Storage faults: torn writes against damaged acknowledged data, the MANIFEST, the shard layout, the decision
log, damaged checkpoints, read-only folders, a full disk, explicit creation, verify and repair."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from test_ledger_durability import accounts, batch

from blazil_ai import ledger as L
from blazil_ai.errors import BlazilError, ConfigError, DataError
from blazil_ai.ledger.store import LocalLedger
from blazil_ai.ledger.verify import verify
from blazil_ai.ledger.wal import WriteAheadLog, encode_entries, scan_segment, segments

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "blazil_ai", "ledger"]


def small_ledger(path: Path, batches: int = 2) -> None:
    with L.connect(path, create=True) as c:
        c.create_accounts(accounts())
        for k in range(batches):
            assert (c.create_transfers(batch(k * 10, 10)) == 0).all()


def snapshot(path: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(path)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"")
            for p in sorted(path.rglob("*"))}


def flip(path: Path, offset: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], cwd=REPO, capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------- found 6: torn tail against damage


def test_torn_tail_is_dropped_logged_and_cleared(tmp_path, caplog):
    small_ledger(tmp_path)
    seg = segments(tmp_path)[-1][1]
    end = scan_segment(seg).end
    with open(seg, "r+b") as f:  # a crash in the middle of writing the next entry
        f.seek(end)
        f.write(b"BLW2" + b"\x02" * 30)
    with caplog.at_level("WARNING"), L.connect(tmp_path) as c:
        assert len(c.lookup_transfers(list(range(1, 21)))) == 20
    assert f"{seg}: torn write at byte offset {end}" in caplog.text
    assert not any(seg.read_bytes()[end:])  # overwritten with zeros: the next write starts clean
    with L.connect(tmp_path) as c:
        assert (c.create_transfers(batch(20, 10)) == 0).all()
    with L.connect(tmp_path) as c:
        assert len(c.lookup_transfers(list(range(1, 31)))) == 30


def test_an_unsealed_write_is_a_torn_tail(tmp_path, caplog):
    """Entries written whose fsync never returned (never sealed, never acked) are dropped when damaged."""
    small_ledger(tmp_path, batches=1)
    seg = segments(tmp_path)[-1][1]
    sealed = scan_segment(seg).end
    w = WriteAheadLog(tmp_path)
    list(w.recover(0, [1]))
    w.open_segment()
    w.append(encode_entries([(2, 3, 10**18, batch(10, 10)), (2, 4, 10**18 + 10, batch(20, 10))])(w.synced))
    w.close()
    flip(seg, sealed + 100)  # the first unsealed entry; the second one is intact after it
    with caplog.at_level("WARNING"), L.connect(tmp_path) as c:
        assert len(c.lookup_transfers(list(range(1, 31)))) == 10
    assert "torn write" in caplog.text and "entries seq 4..4" in caplog.text


@pytest.mark.parametrize("field,offset", [("magic", 0), ("kind", 4), ("seq", 8), ("timestamp", 16), ("count", 24),
                                          ("payload_len", 28), ("durable", 32), ("payload_crc", 40),
                                          ("header_crc", 44), ("payload", 48 + 300)])
def test_damage_to_the_last_acknowledged_entry_is_refused(tmp_path, field, offset):
    """Found 6: one flipped bit in the newest acked entry (payload_len, say) dropped it silently, exit 0."""
    small_ledger(tmp_path)
    seg = segments(tmp_path)[-1][1]
    last = scan_segment(seg).entries
    entry_off = scan_segment(seg).end - 48 - 48 - 10 * 128  # the last batch, then its seal
    assert len(last) == 3
    flip(seg, entry_off + offset, bit=3)
    before = snapshot(tmp_path)
    with pytest.raises(DataError, match=rf"wal-0+1\.log: write-ahead log is damaged at byte offset {entry_off} "):
        L.connect(tmp_path)
    assert snapshot(tmp_path) == before  # nothing cut off
    out = cli("inspect", str(tmp_path))
    assert out.returncode == 1 and f"damaged at byte offset {entry_off}" in out.stderr and "Traceback" not in out.stderr
    out = cli("verify", str(tmp_path))
    assert out.returncode == 1 and f"byte offset {entry_off}" in out.stdout and "DAMAGED" in out.stdout
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("where", ["mid_entry", "entry_boundary", "end_of_data"])
def test_truncation_of_acknowledged_entries_is_refused(tmp_path, where):
    """A crash never shrinks a (preallocated) log file, so a cut file is damage, not a torn write."""
    small_ledger(tmp_path)
    seg = segments(tmp_path)[-1][1]
    s = scan_segment(seg)
    cut = {"mid_entry": s.end - 700, "entry_boundary": s.end - 48 - 48 - 10 * 128, "end_of_data": s.end}[where]
    with open(seg, "r+b") as f:
        f.truncate(cut)
    with pytest.raises(DataError, match=r"wal-0+1\.log: write-ahead log is damaged at byte offset \d+ .*cut short"):
        L.connect(tmp_path)
    # cutting only zeros after the entries loses nothing
    small_ledger(tmp_path / "b")
    seg = segments(tmp_path / "b")[-1][1]
    with open(seg, "r+b") as f:
        f.truncate(scan_segment(seg).end + 48)
    with L.connect(tmp_path / "b") as c:
        assert len(c.lookup_transfers(list(range(1, 21)))) == 20


def test_damage_in_an_earlier_entry_names_the_offset(tmp_path):
    small_ledger(tmp_path)
    seg = segments(tmp_path)[-1][1]
    flip(seg, 200)  # inside the first entry: the ones after it prove it was written
    with pytest.raises(DataError, match=r"wal-0+1\.log.*damaged at byte offset 0 \(payload checksum mismatch\)"):
        L.connect(tmp_path)


# ---------------------------------------------------------------- found 7: MANIFEST, checkpoints, segments


def checkpointed(path: Path) -> None:
    with L.connect(path, create=True) as c:
        c.create_accounts(accounts())
        c.create_transfers(batch(0, 10))
        c.checkpoint()
        c.create_transfers(batch(10, 10))


def test_a_deleted_checkpoint_is_refused(tmp_path):
    """Found 7: the ledger opened empty and replayed later entries against nothing."""
    checkpointed(tmp_path)
    next(tmp_path.glob("checkpoint-*.npz")).unlink()
    with pytest.raises(DataError, match=r"checkpoint-0+2\.npz: checkpoint at seq 2 named by the MANIFEST is missing"):
        L.connect(tmp_path)


def test_a_deleted_segment_is_refused(tmp_path):
    checkpointed(tmp_path)
    seg = segments(tmp_path)[-1][1]
    seg.unlink()
    with pytest.raises(DataError, match=rf"{seg.name}: log segment {seg.name} named by the MANIFEST is missing"):
        L.connect(tmp_path)


def test_a_segment_that_does_not_continue_the_checkpoint_is_refused(tmp_path):
    checkpointed(tmp_path)
    seg = segments(tmp_path)[-1][1]
    seg.rename(tmp_path / "wal-00000000000000000005.log")  # as if the segment holding seq 3 had gone
    with pytest.raises(DataError, match="MANIFEST is missing|continues at seq 3"):
        L.connect(tmp_path)


@pytest.mark.parametrize("damage", ["delete", "flip", "truncate", "garbage", "old_version"])
def test_manifest_damage_is_refused(tmp_path, damage):
    checkpointed(tmp_path)
    m = tmp_path / "MANIFEST"
    if damage == "delete":
        m.unlink()
    elif damage == "flip":
        text = m.read_text().replace('"seq": 2', '"seq": 3')
        m.write_text(text)
    elif damage == "truncate":
        m.write_bytes(m.read_bytes()[:40])
    elif damage == "garbage":
        m.write_bytes(os.urandom(200))
    else:
        body = json.loads(m.read_text())
        body["version"] = 1
        body.pop("crc32")
        body["crc32"] = zlib.crc32(json.dumps(body, sort_keys=True).encode())
        m.write_text(json.dumps(body))
    with pytest.raises(DataError, match=r"MANIFEST: MANIFEST is (missing|damaged)"):
        L.connect(tmp_path)


def test_checkpoint_damage_is_refused_by_name_never_a_traceback(tmp_path):
    """Found 10: 157 of 7,120 header flips raised EOFError, NotImplementedError or RuntimeError."""
    checkpointed(tmp_path)
    ck = next(tmp_path.glob("checkpoint-*.npz"))
    clean = ck.read_bytes()
    rng = np.random.default_rng(10)
    offsets = sorted({*range(0, 64), *rng.integers(0, len(clean), 40).tolist(), len(clean) - 22, len(clean) - 1})
    for off in offsets:
        data = bytearray(clean)
        data[off] ^= 1 << int(rng.integers(8))
        ck.write_bytes(bytes(data))
        with pytest.raises(DataError, match=rf"{ck.name}: checkpoint is damaged"):
            LocalLedger(tmp_path)
    ck.write_bytes(clean[:1000])
    with pytest.raises(DataError, match=rf"{ck.name}: checkpoint is damaged"):
        LocalLedger(tmp_path)
    ck.write_bytes(clean)
    with LocalLedger(tmp_path) as led:
        assert led.engine.n_transfers == 20


def test_a_checkpoint_interrupted_before_its_manifest_recovers(tmp_path):
    """Crash between the checkpoint's rename and the MANIFEST: the old checkpoint and log still hold everything."""
    checkpointed(tmp_path)
    with L.connect(tmp_path) as c:
        c.create_transfers(batch(20, 10))
    kept = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != "LOCK"}
    with L.connect(tmp_path) as c:
        c.checkpoint()
    for name, data in kept.items():  # the old MANIFEST, checkpoint and segment beside the new ones
        (tmp_path / name).write_bytes(data)
    assert len(list(tmp_path.glob("checkpoint-*"))) == 2 and len(segments(tmp_path)) == 2
    with L.connect(tmp_path) as c:
        assert len(c.lookup_transfers(list(range(1, 41)))) == 30
        assert (c.create_transfers(batch(30, 10)) == 0).all()
    assert len(list(tmp_path.glob("checkpoint-*"))) == 1
    with L.connect(tmp_path) as c:
        assert len(c.lookup_transfers(list(range(1, 41)))) == 40
    assert verify(tmp_path).healthy


# ---------------------------------------------------------------- found 8: the shard layout


def sharded(path: Path, n: int = 3) -> None:
    with L.connect(path, shards=n, create=True) as c:
        c.create_accounts(accounts())
        assert (c.create_transfers(batch(0, 40)) == 0).all()


def test_a_missing_shard_folder_is_refused(tmp_path):
    sharded(tmp_path)
    import shutil
    shutil.rmtree(tmp_path / "shard-001")
    with pytest.raises(DataError, match=r"shard-001: shard folder is missing \(the layout shards.json names 3"):
        L.connect(tmp_path)


def test_a_missing_layout_is_refused(tmp_path):
    sharded(tmp_path)
    (tmp_path / "shards.json").unlink()
    with pytest.raises(DataError, match=r"shards.json: the shard layout is missing but the folder holds shard-000"):
        L.connect(tmp_path)


@pytest.mark.parametrize("count", [2, 4])
def test_a_wrong_layout_is_refused(tmp_path, count):
    sharded(tmp_path)
    body = json.loads((tmp_path / "shards.json").read_text())
    body["shards"] = count
    body.pop("crc32")
    body["crc32"] = zlib.crc32(json.dumps(body, sort_keys=True).encode())
    (tmp_path / "shards.json").write_text(json.dumps(body))
    with pytest.raises(DataError, match="also holds shard-002|shard-003: shard folder is missing"):
        L.connect(tmp_path)
    (tmp_path / "shards.json").write_text('{"shards": 2}')
    with pytest.raises(DataError, match=r"shards.json: cannot read the shard layout"):
        L.connect(tmp_path)


def test_swapped_or_foreign_shard_folders_are_refused(tmp_path):
    sharded(tmp_path / "a")
    sharded(tmp_path / "b")
    (tmp_path / "a" / "shard-000").rename(tmp_path / "x")
    (tmp_path / "a" / "shard-001").rename(tmp_path / "a" / "shard-000")
    (tmp_path / "x").rename(tmp_path / "a" / "shard-001")
    with pytest.raises(DataError, match=r"shard-000/MANIFEST: belongs to shard 1 of 3 of ledger [0-9a-f]{32}, not"):
        L.connect(tmp_path / "a")
    import shutil
    shutil.rmtree(tmp_path / "b" / "shard-002")
    shutil.copytree(tmp_path / "a" / "shard-002", tmp_path / "b" / "shard-002")
    with pytest.raises(DataError, match=r"shard-002/MANIFEST: belongs to shard 2 of 3 of ledger \w+, not to shard 2"):
        L.connect(tmp_path / "b")


def test_damage_in_a_shard_log_is_refused_and_verify_names_it(tmp_path):
    sharded(tmp_path)
    seg = segments(tmp_path / "shard-002")[-1][1]
    flip(seg, 60)
    with pytest.raises(DataError, match=r"shard-002/wal-0+1\.log: write-ahead log is damaged at byte offset 0"):
        L.connect(tmp_path)
    rep = verify(tmp_path)
    assert not rep.healthy and "shard-002" in rep.problems[0]


# ---------------------------------------------------------------- found 10: read-only, full disk


def test_a_read_only_ledger_is_inspected_without_writing(tmp_path):
    checkpointed(tmp_path / "l")
    (tmp_path / "l" / "LOCK").unlink()
    before = snapshot(tmp_path / "l")
    with L.connect(tmp_path / "l", read_only=True) as c:
        assert len(c.lookup_transfers(list(range(1, 21)))) == 20
        with pytest.raises(BlazilError, match="read-only"):
            c.create_transfers(batch(20, 1))
    out = cli("inspect", str(tmp_path / "l"), "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["shard_details"][0]["transfers"] == 20
    assert snapshot(tmp_path / "l") == before  # no LOCK, no log, nothing changed
    if os.geteuid() != 0:  # root writes through permissions; elsewhere, a real read-only folder
        os.chmod(tmp_path / "l", 0o555)
        try:
            assert cli("inspect", str(tmp_path / "l")).returncode == 0
            with pytest.raises(ConfigError, match="cannot be opened for writing.*read-only"):
                L.connect(tmp_path / "l")
        finally:
            os.chmod(tmp_path / "l", 0o755)


FULL_DISK = """
import resource, signal, sys
sys.path.insert(0, {tests!r})
from test_ledger_storage import batch
from blazil_ai import ledger as L
from blazil_ai.ledger.store import LedgerClosed
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # no file may grow past 1 MiB: a full disk
c = L.connect({path!r})
assert (c.create_transfers(batch(9000, 10)) == 0).all()
try:
    c.checkpoint()
except Exception as e:
    print("checkpoint refused:", type(e).__name__, e)
acked = 0
try:
    for k in range(20):
        assert (c.create_transfers(batch(10000 + k * 2000, 2000)) == 0).all()
        acked += 1
except LedgerClosed as e:
    print("write refused:", e)
try:
    c.create_transfers(batch(90000, 1))
except LedgerClosed as e:
    print("later write refused:", e)
c.close()
print("acked", acked)
"""


def test_a_full_disk_leaves_no_traceback_and_no_temporary_files(tmp_path):
    """Found 10: the engine thread died with a traceback and left temporary checkpoint files."""
    with L.connect(tmp_path, create=True) as c:
        for k in range(0, 9000, 3000):
            c.create_accounts([L.Account(id=i, ledger=1, code=1) for i in range(k + 1, k + 3001)])
        for k in range(0, 9000, 1000):
            c.create_transfers(batch(k, 1000, accounts=9000))
        c.checkpoint()  # the log starts afresh; the next checkpoint (> 1 MiB) cannot be written
    proc = subprocess.run([sys.executable, "-c", FULL_DISK.format(tests=str(REPO / "tests"), path=str(tmp_path))],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "checkpoint refused: OSError" in proc.stdout and "File too large" in proc.stdout
    assert "write refused: write-ahead log failed" in proc.stdout and "later write refused" in proc.stdout
    acked = int(proc.stdout.split("acked ")[1])
    assert 0 < acked < 20
    assert not list(tmp_path.glob(".*tmp")) and len(list(tmp_path.glob("checkpoint-*"))) == 1
    with L.connect(tmp_path) as c:  # everything acknowledged is there, nothing else
        assert [t.id for t in c.lookup_transfers([9001, 9010])] == [9001, 9010]
        assert c.backend.engine.n_transfers == 9010 + 2000 * acked
        tot = c.backend.call("totals")
        assert tot["debits_posted"] == tot["credits_posted"] == 7 * c.backend.engine.n_transfers


# ---------------------------------------------------------------- issue 16 item 5: creating is explicit


def test_connect_never_creates_a_ledger(tmp_path):
    with pytest.raises(ConfigError, match=r"typo-dir does not exist; create a ledger with 'blazil ledger format"):
        L.connect(tmp_path / "typo-dir")
    assert not (tmp_path / "typo-dir").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"empty is not a ledger \(no MANIFEST\)"):
        L.connect(tmp_path / "empty")
    with pytest.raises(ConfigError, match="not a sharded ledger"):
        L.connect(tmp_path / "empty", shards=2)
    assert list((tmp_path / "empty").iterdir()) == []
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        L.connect(tmp_path / "other", create=True)
    assert [p.name for p in (tmp_path / "other").iterdir()] == ["notes.txt"]


def test_a_ledger_of_the_earlier_format_is_named(tmp_path):
    (tmp_path / "wal-00000000000000000001.log").write_bytes(b"BLW1" + bytes(60))
    with pytest.raises(DataError, match="earlier version"):
        L.connect(tmp_path)


def test_inspect_and_verify_write_nothing_in_a_folder_that_is_no_ledger(tmp_path):
    (tmp_path / "f").mkdir()
    for cmd in ("inspect", "verify"):
        out = cli(cmd, str(tmp_path / "f"))
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
        assert out.stderr.startswith(f"blazil ledger {cmd}: error: ") and str(tmp_path / "f") in out.stderr
        assert list((tmp_path / "f").iterdir()) == []
    out = cli("inspect", str(tmp_path / "missing"))
    assert out.returncode == 1 and "missing" in out.stderr and not (tmp_path / "missing").exists()


def test_format_then_serve(tmp_path):
    out = cli("format", str(tmp_path / "l"), "--shards", "2")
    assert out.returncode == 0 and "2 shards" in out.stdout
    assert cli("format", str(tmp_path / "l")).returncode == 1  # never over an existing folder's contents
    with L.connect(tmp_path / "l") as c:
        assert c.backend.n == 2
    out = cli("serve", "--data", str(tmp_path / "nope"), "--listen", "tcp://127.0.0.1:0", "--metrics-port", "-1")
    assert out.returncode == 1 and "nope does not exist" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "nope").exists()
    out = cli("serve", "--data", str(tmp_path / "x"), "--shards", "2")
    assert out.returncode == 1 and "--create" in out.stderr


# ---------------------------------------------------------------- verify and repair


def test_verify_is_read_only_and_its_status_says_healthy_or_damaged(tmp_path):
    checkpointed(tmp_path)
    before = snapshot(tmp_path)
    out = cli("verify", str(tmp_path), "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["healthy"] is True
    seg = segments(tmp_path)[-1][1]
    end = scan_segment(seg).end
    with open(seg, "r+b") as f:
        f.seek(end)
        f.write(b"\x01" * 10)  # a torn tail: healthy, with a note
    before = snapshot(tmp_path)
    out = cli("verify", str(tmp_path))
    assert out.returncode == 0 and "note:" in out.stdout and f"torn write at byte offset {end}" in out.stdout
    assert snapshot(tmp_path) == before


def test_repair_says_what_it_drops_and_runs_only_when_asked(tmp_path):
    small_ledger(tmp_path, batches=4)
    seg = segments(tmp_path)[-1][1]
    entries = scan_segment(seg).entries
    third = (48 + 50 * 128) + 48 + (48 + 10 * 128) + 48  # accounts, batch 1 (each followed by a seal), then batch 2
    flip(seg, third + 48 + 5)
    before = snapshot(tmp_path)
    out = cli("repair", str(tmp_path))
    assert out.returncode == 1 and "would drop" in out.stdout
    assert "2 intact entries (seq 4..5, 20 records)" in out.stdout
    assert "--yes" in out.stdout and snapshot(tmp_path) == before
    out = cli("repair", str(tmp_path), "--yes")
    assert out.returncode == 0 and "dropped:" in out.stdout
    assert cli("verify", str(tmp_path)).returncode == 0
    with L.connect(tmp_path) as c:
        assert len(c.lookup_transfers(list(range(1, 41)))) == 10
        assert c.backend.seq == len(entries) - 3


def test_what_cannot_be_repaired_is_said(tmp_path):
    checkpointed(tmp_path)
    next(tmp_path.glob("checkpoint-*.npz")).unlink()
    before = snapshot(tmp_path)
    out = cli("repair", str(tmp_path), "--yes")
    assert out.returncode == 1 and "cannot repair:" in out.stdout
    assert "checkpoint-00000000000000000002.npz: checkpoint named by the MANIFEST is missing" in out.stdout
    assert snapshot(tmp_path) == before
    assert cli("verify", str(tmp_path)).returncode == 1


# ---------------------------------------------------------------- found 11: paging is linear


def test_paging_through_the_transfers_reads_each_row_a_bounded_number_of_times(tmp_path, monkeypatch):
    """Found 11: each page of query_transfers sorted and masked the whole table (quadratic restart)."""
    from blazil_ai.ledger import engine as E

    seen = [0]
    real = E._common_mask

    def counting(t, *a):
        seen[0] += len(t)
        return real(t, *a)
    monkeypatch.setattr(E, "_common_mask", counting)
    monkeypatch.setattr(E, "_SCAN_BLOCK", 4096)
    eng = E.Engine()
    eng.create_accounts(L.accounts_to_array(accounts()), eng.next_timestamps(50))
    n = 60_000
    for k in range(0, n, 8000):
        b = batch(k, min(8000, n - k))
        eng.create_transfers(b, eng.next_timestamps(len(b)))
    cursor, total = 0, 0
    while True:
        page = eng.query_transfers(L.QueryFilter(0, 0, 0, 0, 0, cursor, 0, L.BATCH_MAX, L.QueryFilterFlags.NONE))
        total += len(page)
        if len(page) < L.BATCH_MAX:
            break
        cursor = int(page["timestamp"][-1]) + 1
    assert total == n
    assert seen[0] <= 2 * n  # each page reads its own rows and at most one block more



def test_a_checkpoint_whose_manifest_cannot_be_written_is_rolled_back(tmp_path, monkeypatch):
    """A full disk at the MANIFEST: the new checkpoint and segment go, the ledger keeps its log and serves on."""
    from blazil_ai.ledger import manifest as mf

    small_ledger(tmp_path)
    real = mf.write

    def full(directory: Path, m: mf.Manifest) -> None:
        raise OSError(28, "No space left on device")
    with L.connect(tmp_path) as c:
        monkeypatch.setattr(mf, "write", full)
        with pytest.raises(OSError, match="No space"):
            c.checkpoint()
        monkeypatch.setattr(mf, "write", real)
        assert (c.create_transfers(batch(20, 10)) == 0).all()
        assert list(tmp_path.glob("checkpoint-*")) == [] and len(segments(tmp_path)) == 1
    with L.connect(tmp_path) as c:
        assert len(c.lookup_transfers(list(range(1, 31)))) == 30
    assert verify(tmp_path).healthy


@pytest.mark.parametrize("capacity", [0, -5, 2.5, "many", True, 10**12])
def test_a_capacity_that_cannot_be_allocated_is_refused_by_name_before_anything_is_written(tmp_path, capacity):
    from blazil_ai import ledger
    from blazil_ai.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^capacity "):
        ledger.connect(tmp_path / "l", create=True, capacity=capacity)
    assert not (tmp_path / "l").exists()


def test_storage_for_the_capacity_is_allocated_at_open(tmp_path):
    from blazil_ai import ledger

    with ledger.connect(tmp_path / "l", create=True, capacity=100_000) as c:
        assert len(c.backend.engine.transfers) == 100_000
        assert 2 * 100_000 <= len(c.backend.engine.transfer_keys.table)


def test_a_checkpoint_with_another_record_layout_is_refused_by_name(tmp_path):
    from blazil_ai.errors import DataError
    from blazil_ai.ledger import checkpoint as ckpt
    from blazil_ai.ledger.engine import Engine
    from blazil_ai.ledger.manifest import file_crc

    eng = Engine()
    path = ckpt.save(eng, tmp_path, 7)
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["transfers"] = np.zeros(3, dtype=[("id", "<u8", (2,)), ("rest", "V112")])  # 128 bytes, other fields
    path.unlink()
    np.savez(path, **arrays)
    size, crc = file_crc(path)
    with pytest.raises(DataError, match=r"transfers have the record layout .* not this ledger's") as e:
        ckpt.load(Engine(), path, 7, size, crc)
    assert path.name in str(e.value)
