"""Checkpoints: the engine's whole state at a log sequence, so recovery replays only what came after.

A checkpoint is ``checkpoint-<seq>.npz`` (numpy's zip of arrays, each member CRC-checked on load),
written to a temporary name, fsynced, then renamed into place, so a crash leaves either the old or the
new checkpoint, never half of one; a failed write (a full disk) removes its temporary file. The ledger's
MANIFEST records the size and crc32 of the whole file, checked before it is read, so any damage is
refused by name (never a traceback from deep inside the zip reader).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from blazil_ai.errors import DataError
from blazil_ai.ledger.engine import Engine, key64_int
from blazil_ai.ledger.journal import write_atomic
from blazil_ai.ledger.types import ACCOUNT_DTYPE, TRANSFER_DTYPE, copy_records, u128_from_words, u128_to_words

_NAME = re.compile(r"^checkpoint-(\d{20})\.npz$")


def checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """(seq, path) of each checkpoint, oldest first."""
    out = []
    for p in directory.iterdir():
        m = _NAME.match(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def save(engine: Engine, directory: Path, seq: int) -> Path:
    """Write the engine's state as of log entry ``seq``; returns the checkpoint's path."""
    n, m = engine.n_accounts, engine.n_transfers
    hist_rows, hist_vals = [], []
    for arow, entries in engine.history.items():
        for trow, *bal in entries:
            hist_rows.append((arow, trow))
            hist_vals.extend(bal)
    meta = {"seq": seq, "last_timestamp": engine.last_timestamp, "format": 1}
    arrays = {
        "meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
        "accounts": engine.accounts[:n],
        "transfers": engine.transfers[:m],
        "pending_state": engine.pending_state[:m],
        "failed_ids": u128_to_words(sorted(engine.failed_ids)),
        "history_rows": np.array(hist_rows, dtype=np.int64).reshape(-1, 2),
        "history_values": u128_to_words(hist_vals).reshape(-1, 4, 2),
    }
    final = directory / checkpoint_name(seq)
    write_atomic(final, lambda f: np.savez(f, **arrays))  # type: ignore[arg-type]
    return final


def checkpoint_name(seq: int) -> str:
    """File name of the checkpoint at ``seq``."""
    return f"checkpoint-{seq:020d}.npz"


def load(engine: Engine, path: Path, seq: int, size: int, crc: int) -> int:
    """Load the checkpoint at ``path`` (as the MANIFEST describes it) into a fresh engine; returns its seq."""
    from blazil_ai.ledger.manifest import file_crc

    try:
        got = file_crc(path)
    except FileNotFoundError:
        raise DataError(f"checkpoint at seq {seq} named by the MANIFEST is missing; the ledger will not open "
                        "(its log before that seq is gone)", path=str(path)) from None
    if got != (size, crc):
        raise DataError(f"checkpoint is damaged ({got[0]} bytes with crc32 {got[1]:08x}, the MANIFEST recorded "
                        f"{size} bytes with crc32 {crc:08x}); the ledger will not open", path=str(path))
    try:
        with np.load(path) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            accounts, transfers = z["accounts"], z["transfers"]
            pending_state, failed = z["pending_state"], z["failed_ids"]
            hist_rows, hist_values = z["history_rows"], z["history_values"]
    except Exception as e:  # whatever the zip or npy reader raises on bytes it cannot read
        raise DataError(f"checkpoint cannot be read ({type(e).__name__}: {e}); the ledger will not open",
                        path=str(path)) from e
    if meta.get("seq") != seq:
        raise DataError(f"checkpoint says seq {meta.get('seq')}, its name says {seq}", path=str(path))
    for name, arr, want in (("accounts", accounts, ACCOUNT_DTYPE), ("transfers", transfers, TRANSFER_DTYPE)):
        if arr.dtype != want:
            raise DataError(f"checkpoint's {name} have the record layout {arr.dtype}, not this ledger's",
                            path=str(path))
    engine.last_timestamp = int(meta["last_timestamp"])
    engine.n_accounts = len(accounts)
    engine.accounts = np.zeros(max(1024, 2 * len(accounts)), dtype=ACCOUNT_DTYPE)
    copy_records(engine.accounts[: len(accounts)], accounts)
    engine.account_rows = dict(zip(u128_from_words(accounts["id"]), range(len(accounts))))
    engine._index_dirty = True
    engine.adopt_transfers(transfers, pending_state)
    engine.failed_ids = set(u128_from_words(failed))
    engine.failed_keys = {key64_int(i) for i in engine.failed_ids}
    vals = u128_from_words(hist_values.reshape(-1, 2)) if len(hist_values) else []
    engine.history = {}
    for i, (arow, trow) in enumerate(hist_rows.tolist()):
        engine.history.setdefault(arow, []).append((trow, *vals[4 * i: 4 * i + 4]))  # type: ignore[arg-type]
    engine.rebuild_expiry()
    return seq
