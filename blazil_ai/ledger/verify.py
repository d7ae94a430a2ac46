"""``blazil ledger verify`` and ``blazil ledger repair``: check a ledger (or a fraud service's data folder) without
writing to it, and, only when asked, drop damaged log entries, saying exactly what goes.

A folder may be a single-shard ledger, a sharded ledger, or the data folder of ``blazil serve`` (its
``decisions/decisions.log`` and ``ledger/``). Verification runs the same recovery an open runs, read-only,
so "healthy" means the next open succeeds with every acknowledged record; a torn, unacknowledged tail is
reported as a note (the next open drops it), not as damage.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blazil_ai.errors import ConfigError, DataError
from blazil_ai.ledger import journal
from blazil_ai.ledger import manifest as mf


@dataclass
class Report:
    """What verify found, or what repair did (or would do)."""

    directory: str
    problems: list[str] = field(default_factory=list)  # damage to acknowledged data, or a broken layout
    notes: list[str] = field(default_factory=list)  # torn tails the next open drops, and other remarks
    ledgers: list[dict[str, Any]] = field(default_factory=list)
    repairs: list[str] = field(default_factory=list)  # what repair drops
    unrepairable: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        """No damage found."""
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"directory": self.directory, "healthy": self.healthy, "problems": self.problems,
                "notes": self.notes, "ledgers": self.ledgers, "repairs": self.repairs,
                "unrepairable": self.unrepairable}


def _parts(root: Path) -> tuple[list[Path], Path | None]:
    """(ledger folders, decision log) inside ``root``."""
    if not root.is_dir():
        raise ConfigError(f"{root} is not a directory")
    decisions = root / "decisions" / "decisions.log"
    if decisions.exists() or (root / "ledger").is_dir():
        ledger = root / "ledger"
        return ([ledger] if ledger.exists() else []), (decisions if decisions.exists() else None)
    if (mf.is_ledger(root) or (root / mf.LAYOUT).exists() or any(root.glob("shard-*")) or any(root.glob("wal-*.log"))
            or any(root.glob("checkpoint-*.npz"))):
        return [root], None
    raise ConfigError(f"{root} holds neither a ledger (MANIFEST, shards.json) nor a fraud service's data "
                      "(decisions/decisions.log)")


def _journal_dirs(ledger: Path) -> list[Path]:
    """The folders of a ledger that hold a write-ahead log (each shard and the coordinator, or the ledger)."""
    from blazil_ai.ledger.shards import check_layout, shard_dir

    layout = check_layout(ledger)
    if layout is None:
        return [ledger]
    return [*(ledger / shard_dir(i) for i in range(layout[0])), ledger / "coordinator"]


def verify(directory: str | os.PathLike[str]) -> Report:
    """Check a ledger or a service's data folder read-only; problems name the file and offset."""
    from blazil_ai.ledger.client import open_embedded
    from blazil_ai.ledger.shards import ShardedLedger
    from blazil_ai.ledger.types import LocalOp

    root = Path(directory)
    rep = Report(str(root))
    ledgers, decisions = _parts(root)
    for led in ledgers:
        try:
            for d in _journal_dirs(led):
                _torn_notes(d, rep)
            backend = open_embedded(led, read_only=True)
        except DataError as e:
            rep.problems.append(str(e))
            continue
        try:
            locals_ = backend.shards if isinstance(backend, ShardedLedger) else [backend]
            tot = backend.call(LocalOp.TOTALS)
            balanced = tot["debits_posted"] == tot["credits_posted"] and tot["debits_pending"] == tot["credits_pending"]
            rep.ledgers.append({"directory": str(led), "shards": len(locals_),
                                "accounts": sum(s.engine.n_accounts for s in locals_),
                                "transfers": sum(s.engine.n_transfers for s in locals_), "balanced": balanced})
            if not balanced:
                rep.problems.append(f"{led}: balances do not add up: {tot}")
            if isinstance(backend, ShardedLedger) and backend.unfinished:
                rep.notes.append(f"{led}: {backend.unfinished} cross-shard transfers in flight at the last stop; "
                                 "the next open finishes them")
        finally:
            backend.close()
    if decisions is not None:
        from blazil_ai.fraud.store import scan_log
        try:
            frames, damage, _end = scan_log(decisions)
        except DataError as e:
            rep.problems.append(str(e))
        else:
            if damage is not None:
                (rep.notes if damage.torn else rep.problems).append(damage.describe(decisions))
            rep.ledgers.append({"decision_log": str(decisions), "frames": len(frames)})
    return rep


def _torn_notes(d: Path, rep: Report) -> None:
    from blazil_ai.ledger.wal import scan_segment, segments

    segs = segments(d) if d.is_dir() else []
    if segs:
        damage = scan_segment(segs[-1][1]).damage
        if damage is not None and damage.torn:
            rep.notes.append(damage.describe(segs[-1][1]) + " (the next open drops it)")


def repair(directory: str | os.PathLike[str], apply: bool = False) -> Report:
    """Plan (``apply=False``: nothing is written) or carry out the repair of damaged log entries."""
    root = Path(directory)
    rep = Report(str(root))
    ledgers, decisions = _parts(root)
    for led in ledgers:
        try:
            dirs = _journal_dirs(led)
        except DataError as e:
            rep.unrepairable.append(str(e))
            continue
        for d in dirs:
            _repair_wal(d, rep, apply)
    if decisions is not None:
        _repair_decisions(decisions, rep, apply)
    return rep


def _repair_wal(d: Path, rep: Report, apply: bool) -> None:
    from blazil_ai.ledger.wal import KIND_SEAL, MAGIC, scan_segment, segments

    try:
        m = mf.read(d)
    except DataError as e:
        rep.unrepairable.append(str(e))
        return
    if m.checkpoint:
        ck = d / m.checkpoint["name"]
        if not ck.exists() or mf.file_crc(ck) != (m.checkpoint["bytes"], m.checkpoint["crc32"]):
            state = "damaged" if ck.exists() else "missing"
            rep.unrepairable.append(f"{ck}: checkpoint named by the MANIFEST is {state}; restore the ledger from a "
                                    "backup")
            return
    on_disk = segments(d)
    gone = sorted(set(m.segments) - {first for first, _p in on_disk})
    if gone:
        rep.unrepairable.append(f"{d}: log segments named by the MANIFEST are missing ({', '.join(map(str, gone))}); "
                                "restore the ledger from a backup")
        return
    use = [(first, p) for first, p in on_disk if first >= m.segments[0]]
    for i, (_first, path) in enumerate(use):
        try:
            s = scan_segment(path)
        except DataError as e:
            rep.unrepairable.append(str(e))
            return
        if s.damage is None or (s.damage.torn and i == len(use) - 1):
            continue
        later = [e for e in s.damage.later_entries if e.kind != KIND_SEAL]
        after = use[i + 1:]
        what = (f"{path}: drop the damaged entry at byte offset {s.damage.offset} ({s.damage.problem}) and "
                f"everything after it: {len(later)} intact entries"
                + (f" (seq {later[0].seq}..{later[-1].seq}, {sum(e.count for e in later)} records)" if later else "")
                + (f", and the later segments {', '.join(p.name for _f, p in after)}" if after else ""))
        rep.problems.append(str(DataError(f"damaged at byte offset {s.damage.offset} ({s.damage.problem})",
                                          path=str(path))))
        rep.repairs.append(what)
        if apply:  # zero the damaged entries and everything after; seal what stays (whole and on disk)
            journal.clear_tail(path, s.damage.offset, MAGIC, s.damage.offset)
            for _f, p in after:
                p.unlink()
            journal.fsync_dir(d)
        return


def _repair_decisions(path: Path, rep: Report, apply: bool) -> None:
    from blazil_ai.fraud.store import FRAME_MAGIC, MAGIC, scan_log

    try:
        frames, damage, _end = scan_log(path)
    except DataError as e:
        rep.unrepairable.append(str(e))
        return
    if damage is None:
        return
    if damage.torn:
        rep.notes.append(damage.describe(path) + " (the next open drops it)")
        return
    from blazil_ai.ledger.journal import KIND_SEAL
    keep = [*frames, *(f for f in damage.later_entries if f.kind != KIND_SEAL)]
    rep.problems.append(damage.describe(path))
    rep.repairs.append(f"{path}: drop the damaged frame at byte offset {damage.offset} ({damage.problem}) and keep "
                       f"the {len(keep)} intact frames around it (the decisions in the damaged frame are lost; their "
                       "transfers stay in the ledger)")
    if apply:
        out = bytearray(MAGIC)
        for n, f in enumerate(keep, 1):
            out += journal.encode(FRAME_MAGIC, f.kind, n, f.timestamp, f.count, f.payload, 0) + f.payload
        out += journal.encode(FRAME_MAGIC, KIND_SEAL, 0, 0, 0, b"", len(out))
        out += bytes(-(-(len(out) + journal.HEADER.size) // journal.BLOCK) * journal.BLOCK - len(out))
        journal.write_atomic(path, bytes(out))


__all__ = ["Report", "repair", "verify"]
