"""The embedded backend: the in-process durable engine (one shard or several) behind the client API."""

from __future__ import annotations

import os
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from blazil_ai.errors import ConfigError
from blazil_ai.ledger.base import LedgerClient
from blazil_ai.ledger.types import Operation


class EmbeddedClient(LedgerClient):
    """The in-process durable engine (one shard or several)."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    def _call(self, op: Operation, arg: Any) -> Any:
        return self.backend.call(op, arg)

    def submit(self, op: Operation | str, arg: Any) -> Future[Any]:
        """Queue a request on the engine's ring buffer; completes when durable."""
        return self.backend.submit(op, arg)  # type: ignore[no-any-return]

    def checkpoint(self) -> int:
        """Write a checkpoint now."""
        return self.backend.checkpoint()  # type: ignore[no-any-return]

    def close(self) -> None:
        """Finish queued requests and release the directory."""
        self.backend.close()


def open_embedded(path: str | os.PathLike[str], *, shards: int | None = None, create: bool = False,
                  read_only: bool = False, **options: Any) -> Any:
    """Open the ledger directory (``create=True``: create it if it holds no ledger yet): a LocalLedger, or a
    ShardedLedger if it has shards."""
    from blazil_ai.ledger.shards import ShardedLedger, read_layout
    from blazil_ai.ledger.store import LocalLedger

    p = Path(path)
    existing = read_layout(p)
    if existing is not None:
        if shards is not None and shards != existing:
            raise ConfigError(f"ledger {p} has {existing} shards; cannot open it with shards={shards}")
        return ShardedLedger(p, read_only=read_only, **options)
    if shards is not None and shards > 1:
        from blazil_ai.ledger.manifest import is_ledger
        if is_ledger(p):
            raise ConfigError(f"ledger {p} has 1 shard; cannot open it with shards={shards}")
        return ShardedLedger(p, shards=shards, create=create, read_only=read_only, **options)
    return LocalLedger(p, create=create, read_only=read_only, **options)
