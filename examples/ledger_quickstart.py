"""The embedded ledger in five steps: accounts, a transfer, a two-phase hold, history, the numpy path.

    python examples/ledger_quickstart.py [DIR]

DIR (default: a fresh temporary directory) holds the write-ahead log; run the script twice on the same
DIR and the second run finds the first run's accounts (their ids are reused, so creating them answers
EXISTS).
"""

from __future__ import annotations

import sys
import tempfile

import numpy as np

from blazil_ai import ledger as L

CUSTOMER, MERCHANT = 1001, 2001
F = L.AccountFilterFlags


def main(directory: str) -> None:
    with L.connect(directory, create=True) as client:  # creates the ledger on the first run
        # 1. Accounts: the customer may not spend more than was credited; the merchant keeps balance history.
        res = client.create_accounts([
            L.Account(id=CUSTOMER, ledger=840, code=1, flags=L.AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS),
            L.Account(id=MERCHANT, ledger=840, code=1, flags=L.AccountFlags.HISTORY),
            L.Account(id=1, ledger=840, code=9),  # the bank's funding account
        ])
        print("accounts:", [r.status.name for r in res])

        # 2. Fund the customer, then try to overspend: the second transfer is refused as a whole.
        res = client.create_transfers([
            L.Transfer(id=L.id(), debit_account_id=1, credit_account_id=CUSTOMER, amount=100_00, ledger=840, code=1),
            L.Transfer(id=L.id(), debit_account_id=CUSTOMER, credit_account_id=MERCHANT, amount=500_00, ledger=840,
                       code=1),
        ])
        print("fund, overspend:", [r.status.name for r in res])

        # 3. Two-phase: hold 30.00 for review (expires after 60 s unless posted), then post it in full.
        hold = L.id()
        res = client.create_transfers([L.Transfer(id=hold, debit_account_id=CUSTOMER, credit_account_id=MERCHANT,
                                                  amount=30_00, ledger=840, code=1, flags=L.TransferFlags.PENDING,
                                                  timeout=60)])
        c = client.lookup_accounts([CUSTOMER])[0]
        print("held:", res[0].status.name, "customer pending", c.debits_pending)
        res = client.create_transfers([L.Transfer(id=L.id(), pending_id=hold, amount=L.AMOUNT_MAX,
                                                  flags=L.TransferFlags.POST_PENDING_TRANSFER)])
        c = client.lookup_accounts([CUSTOMER])[0]
        print("posted:", res[0].status.name, "customer posted", c.debits_posted, "pending", c.debits_pending)

        # 4. Recent history of the merchant, newest first, and its balance after each transfer.
        f = L.AccountFilter(account_id=MERCHANT, user_data_128=0, user_data_64=0, user_data_32=0, code=0,
                            timestamp_min=0, timestamp_max=0, limit=5, flags=F.DEBITS | F.CREDITS | F.REVERSED)
        for t in client.get_account_transfers(f):
            print("  merchant transfer", t.id, t.amount, t.flags.name or "NONE")
        for b in client.get_account_balances(f):
            print("  merchant balance: pending", b.credits_pending, "posted", b.credits_posted)

        # 5. The numpy path: a batch of 8189 transfers as one array; the status array has 0 for created.
        batch = np.zeros(L.BATCH_MAX, dtype=L.TRANSFER_DTYPE)
        batch["id"][:, 0] = np.arange(L.BATCH_MAX) + 1
        batch["id"][:, 1] = L.id() >> 64  # high words from a fresh id keep reruns unique
        batch["debit_account_id"][:, 0] = 1
        batch["credit_account_id"][:, 0] = MERCHANT
        batch["amount"][:, 0] = 1
        batch["ledger"], batch["code"] = 840, 1
        status = client.create_transfers(batch)
        print("numpy batch:", int((status == L.STATUS_OK).sum()), "of", len(batch), "created")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(sys.argv[1])
    else:
        with tempfile.TemporaryDirectory(prefix="blazil-ledger-") as tmp:  # removed when the example ends
            main(tmp)
