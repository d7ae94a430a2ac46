"""A ledger server and a client over TCP, in one script (in production: `blazil ledger serve`).

    python examples/ledger_server.py

Starts a server on a free loopback port, connects with ``ledger.connect("tcp://...")``, sends requests
from four threads at once (they share group commits: one fsync covers many batches), and prints the
server's /metrics lines for the ledger.
"""

from __future__ import annotations

import tempfile
import threading
import urllib.request

from blazil_ai import ledger as L
from blazil_ai.ledger.server import LedgerServer


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="blazil-ledger-") as tmp:  # removed when the example ends
        serve_and_send(tmp)


def serve_and_send(directory: str) -> None:
    server = LedgerServer(directory, "tcp://127.0.0.1:0", metrics_port=0, create=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    print("serving on", server.uri)
    try:
        with L.connect(server.uri) as client:
            client.create_accounts([L.Account(id=i, ledger=1, code=1) for i in range(1, 11)])

            def worker(w: int) -> None:
                for k in range(25):
                    tid = w * 1000 + k + 1
                    res = client.create_transfers([L.Transfer(id=tid, debit_account_id=w + 1,
                                                              credit_account_id=(w + 1) % 10 + 1, amount=3, ledger=1,
                                                              code=1)])
                    assert res[0].status == L.CreateTransferStatus.CREATED
            workers = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
            for t in workers:
                t.start()
            for t in workers:
                t.join()
            for a in client.lookup_accounts([1, 2, 3, 4, 5]):
                print(f"account {a.id}: debits {a.debits_posted} credits {a.credits_posted}")
        assert server.metrics is not None
        text = urllib.request.urlopen(server.metrics.url, timeout=5).read().decode()
        for line in text.splitlines():
            if line.startswith(("blazil_ledger_events_total", "blazil_ledger_fsyncs_total")):
                print(line)
    finally:
        server.stop()
        thread.join()
        server.close()


if __name__ == "__main__":
    main()
