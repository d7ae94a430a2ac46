"""The fraud hot path's array shortcuts give the same answers as their plain forms."""

from __future__ import annotations

import numpy as np

from blazil_ai.datasets.transactions import simulate_transactions
from blazil_ai.fraud.features import VelocityWindow, _row_counts
from blazil_ai.fraud.store import IdIndex

COLS = ("tx_count_1h", "tx_count_24h", "amount_sum_24h", "amount_ratio", "seconds_since_last")


def _stream_features(window: VelocityWindow, acc: np.ndarray, t: np.ndarray, am: np.ndarray,
                     shuffle: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out: dict[str, list[np.ndarray]] = {k: [] for k in COLS}
    for s in range(0, len(acc), 500):
        a, tt, m = acc[s:s + 500], t[s:s + 500], am[s:s + 500]
        perm = rng.permutation(len(a)) if shuffle else np.arange(len(a))
        rows = window.account_rows(a[perm])
        f = window.features(rows, tt[perm], m[perm])
        back = np.empty_like(perm)
        back[perm] = np.arange(len(perm))
        for k in COLS:
            out[k].append(f[k][back])
        window.add(rows, tt[perm], m[perm])
    return {k: np.concatenate(v) for k, v in out.items()}


def test_velocity_features_do_not_depend_on_arrival_order_or_account_count():
    cols = simulate_transactions(3000, seed=5, fraud_rate=0.05)
    acc = cols["account_id"].astype(np.uint64)
    t, am = cols["timestamp"], cols["amount"]
    in_order = _stream_features(VelocityWindow(16), acc, t, am, shuffle=False)  # radix-sorted plan
    shuffled = _stream_features(VelocityWindow(16), acc, t, am, shuffle=True)  # lexsort plan
    many = VelocityWindow(16)
    many.account_rows(np.arange(10**7, 10**7 + 70_000, dtype=np.uint64))  # > 2^16 rows: the wide-key plan
    wide = _stream_features(many, acc, t, am, shuffle=False)
    for k in COLS:  # sums over the batch may round differently when accounts get other rows (1e-12 relative)
        np.testing.assert_allclose(shuffled[k], in_order[k], rtol=1e-9, atol=1e-9, err_msg=k)
        np.testing.assert_allclose(wide[k], in_order[k], rtol=1e-9, atol=1e-9, err_msg=k)
    assert in_order["tx_count_24h"].max() > 1  # the stream has real history to count


def test_row_counts_equal_count_nonzero():
    rng = np.random.default_rng(1)
    for depth in (8, 16, 24, 5):
        m = rng.random((300, depth)) < 0.4
        np.testing.assert_array_equal(_row_counts(m), np.count_nonzero(m, axis=1))
    m = rng.random((300, 32)) < 0.5
    np.testing.assert_array_equal(_row_counts(m[:, ::2]), np.count_nonzero(m[:, ::2], axis=1))


def test_id_index_agrees_with_a_dict_through_inserts_repeats_and_removals():
    rng = np.random.default_rng(2)
    ix, ref = IdIndex(1 << 16), {}
    for step in range(30):
        keys = rng.integers(0, 20_000, int(rng.integers(1, 4000))).astype(np.uint64)  # repeats within and across
        vals = rng.integers(0, 1 << 40, len(keys))
        present = ix.insert(keys, vals)
        want = []
        for k, v in zip(keys.tolist(), vals.tolist()):
            want.append(k in ref)
            ref.setdefault(k, v)
        np.testing.assert_array_equal(present, want)
        if step % 4 == 0:
            for k in list(ref)[:100]:
                ix.remove(k)
                del ref[k]
        q = np.array([*ref, *rng.integers(20_000, 1 << 63, 50).tolist()], dtype=np.uint64)
        np.testing.assert_array_equal(ix.lookup(q), [ref.get(k, -1) for k in q.tolist()])
