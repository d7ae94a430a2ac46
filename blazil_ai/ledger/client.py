"""``connect(address)``: one client API over the embedded engine, our ledger server, or a TigerBeetle cluster.

* a directory path: the embedded, durable engine (sharded if it was created with ``shards=N``). The
  directory must hold a ledger: ``create=True`` (or ``blazil ledger format DIR``) makes one, so a mistyped
  path fails naming it instead of opening an empty ledger. ``read_only=True`` opens a ledger for reads
  only and writes nothing to its folder (a backup on a read-only mount can be inspected);
* ``tcp://host:port`` (or ``tcps://``): a ``blazil ledger serve`` process;
* ``tigerbeetle://host:port[,host:port...][?cluster_id=N]``: a TigerBeetle cluster; batches go as raw records to
  the native client library of the official ``tigerbeetle`` package (``?native=0``: through its Python
  ``ClientSync``, one dataclass per event).

Batch methods take dataclass lists (and return dataclass results, like the official client) or numpy
arrays in the 128-byte layout (and return a uint32 status array, 0 = created, for callers that need speed).
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import parse_qs, urlparse

from blazil_ai.errors import ConfigError
from blazil_ai.ledger.base import LedgerClient
from blazil_ai.ledger.embedded import EmbeddedClient, open_embedded

__all__ = ["EmbeddedClient", "LedgerClient", "connect", "open_embedded"]


def connect(address: str | os.PathLike[str], **options: Any) -> LedgerClient:
    """A ledger client for a directory, ``tcp://host:port`` (ledger server) or ``tigerbeetle://host:port``.

    For a directory: ``create=True`` creates the ledger when the folder is missing or empty (``shards=N``
    for a sharded one); ``read_only=True`` opens it for reads only, writing nothing there. On a sharded
    ledger a batch is applied shard by shard: each event is atomic, but a batch that was not acknowledged
    (the process died) may be partly applied; retrying it with the same ids is safe."""
    text = os.fspath(address)
    if text.startswith("tigerbeetle://"):
        from blazil_ai.ledger.tigerbeetle_backend import TigerBeetleClient
        u = urlparse(text)
        query = parse_qs(u.query)
        try:
            cluster = int(query.get("cluster_id", ["0"])[0])
        except ValueError:
            raise ConfigError(f"ledger address {text!r}: cluster_id must be an integer") from None
        native = query.get("native", ["1"])[0] not in ("0", "false", "no")
        return TigerBeetleClient(u.netloc, cluster_id=cluster, native=native, **options)
    if text.startswith(("tcp://", "tcps://", "aeron:")):
        from blazil_ai.ledger.server import RemoteClient
        return RemoteClient(text, **options)
    if "://" in text:
        raise ConfigError(f"ledger address {text!r}: use a directory, tcp://host:port or tigerbeetle://host:port")
    return EmbeddedClient(open_embedded(text, **options))
