"""A payment-transaction simulator with labelled fraud patterns, for training and for live test streams.

Normal traffic: each account has a home country, a usual device, a typical spend (log-normal) and
daytime habits. Fraud is injected as incidents of four kinds, each leaving traces a model can learn:

* ``card_testing``: a burst of 6-15 tiny online purchases of digital goods within minutes
  (high ``tx_count_1h``, low amounts, short ``seconds_since_last``);
* ``account_takeover``: 1-3 large online purchases or transfers from a new device, mostly abroad and
  at night (``is_new_device``, ``is_foreign``, high ``amount_ratio``);
* ``high_value``: one purchase 15-40x the account's usual spend at a jeweller or electronics shop;
* ``mule_transfer``: round-sum transfers (500, 1000, 2000, 5000) to one of a few mule accounts.

Normal traffic has some travel abroad, new phones, night purchases and big tickets too, so no single
column gives the answer away. Velocity columns are computed from each account's own history only
(earlier transactions), as a live scorer would compute them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NUMERIC_FEATURES = ["amount", "hour", "is_foreign", "is_new_device", "tx_count_1h", "tx_count_24h",
                    "amount_sum_24h", "amount_ratio", "seconds_since_last"]
CATEGORICAL_FEATURES = ["merchant_category", "channel", "device", "country"]
LABEL = "is_fraud"
ID_COLUMNS = ["transaction_id", "timestamp", "account_id", "dest_account_id", "fraud_pattern"]
COLUMNS = ID_COLUMNS[:4] + NUMERIC_FEATURES + CATEGORICAL_FEATURES + ["fraud_pattern", LABEL]

MERCHANTS = np.array(["grocery", "restaurant", "fuel", "travel", "electronics", "jewelry", "digital_goods",
                      "utilities", "fashion", "pharmacy"])
_MERCHANT_P = np.array([0.25, 0.17, 0.1, 0.05, 0.06, 0.01, 0.08, 0.1, 0.1, 0.08])
CHANNELS = np.array(["pos", "online", "mobile", "atm", "transfer"])
_CHANNEL_P = np.array([0.45, 0.22, 0.18, 0.07, 0.08])
DEVICES = np.array(["ios", "android", "web", "pos_terminal"])
COUNTRIES = np.array(["US", "GB", "DE", "FR", "NL", "ES", "IT", "BR", "NG", "RU", "CN", "IN"])
_HOME_P = np.array([0.35, 0.15, 0.14, 0.12, 0.08, 0.08, 0.08, 0, 0, 0, 0, 0])
PATTERNS = ["card_testing", "account_takeover", "high_value", "mule_transfer"]
_PATTERN_P = np.array([0.35, 0.3, 0.15, 0.2])
_SPAN_S = 14 * 86400.0
START_TIME = 1_767_225_600.0  # 2026-01-01T00:00:00Z, fixed so a seed gives identical data on every host


def _daytime_hours(rng: np.random.Generator, n: int) -> np.ndarray:
    # People shop mostly 08-22; a few night purchases keep "night" from being a fraud giveaway.
    day = rng.uniform(8, 22, n)
    night = rng.uniform(0, 24, n)
    return np.where(rng.random(n) < 0.93, day, night)


@dataclass(frozen=True)
class _Accounts:
    """Each simulated account's habits: home country, usual device and log of its typical spend."""

    home: np.ndarray
    usual_device: np.ndarray
    spend_mu: np.ndarray

    @classmethod
    def draw(cls, rng: np.random.Generator, n: int) -> _Accounts:
        home = rng.choice(len(COUNTRIES), n, p=_HOME_P)
        usual_device = rng.choice(3, n, p=[0.45, 0.4, 0.15])
        spend_mu = rng.normal(3.4, 0.6, n)  # log of typical ticket, ~30 on average
        return cls(home, usual_device, spend_mu)


def simulate_transactions(n: int, seed: int = 0, *, fraud_rate: float = 0.02, n_accounts: int | None = None,
                          start_time: float = START_TIME) -> dict[str, np.ndarray]:
    """About ``n`` transactions (exactly ``n``) as a dict of numpy columns sorted by time; ``is_fraud`` labels them."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if not 0.0 <= fraud_rate < 0.5:
        raise ValueError(f"fraud_rate must be in [0, 0.5), got {fraud_rate}")
    rng = np.random.default_rng(seed)
    accounts = _Accounts.draw(rng, n_accounts or max(50, n // 40))
    parts = _fraud_incidents(rng, accounts, int(round(n * fraud_rate)))
    n_fraud = sum(len(p["t"]) for p in parts)
    parts.append(_honest_traffic(rng, accounts, n - n_fraud))
    cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    cols["t"] = np.clip(cols["t"], 0, _SPAN_S - 1)
    acc_all = cols["account_id"].astype(np.int64)
    cols["is_foreign"] = (cols["country"] != COUNTRIES[accounts.home[acc_all]]).astype(np.float64)
    cols.update(_history_features(acc_all, cols["t"], cols["amount"]))
    return _by_time(cols, n, start_time)


def _fraud_incidents(rng: np.random.Generator, accounts: _Accounts, n_target: int) -> list[dict[str, np.ndarray]]:
    """Fraud incidents of the four patterns until ``n_target`` fraudulent transactions exist."""
    parts: list[dict[str, np.ndarray]] = []
    n_fraud = 0
    mules = rng.integers(10_000_000, 10_000_100, 8)
    while n_fraud < n_target:
        kind = PATTERNS[rng.choice(4, p=_PATTERN_P)]
        acc = int(rng.integers(len(accounts.home)))
        t0 = rng.uniform(0, _SPAN_S - 3600)
        part = _incident(rng, kind, acc, t0, accounts, n_target - n_fraud, mules)
        parts.append(part)
        n_fraud += len(part["t"])
    return parts


def _incident(rng: np.random.Generator, kind: str, acc: int, t0: float, accounts: _Accounts, left: int,
              mules: np.ndarray) -> dict[str, np.ndarray]:
    """The transactions of one fraud incident of pattern ``kind`` on account ``acc`` (at most ``left``)."""
    home, usual = int(accounts.home[acc]), DEVICES[accounts.usual_device[acc]]
    typical = float(np.exp(accounts.spend_mu[acc]))
    if kind == "card_testing":
        k = min(int(rng.integers(6, 16)), left)
        t = t0 + np.sort(rng.uniform(0, rng.uniform(300, 1800), k))
        amt = np.round(rng.uniform(0.5, 5.0, k), 2)
        merch = np.full(k, "digital_goods")
        chan = np.full(k, "online")
        dev = np.where(rng.random(k) < 0.6, "web", usual)
        new_dev = (dev != usual).astype(np.float64)
        foreign = rng.random() < 0.5
        ctry = np.full(k, COUNTRIES[rng.integers(7, 12)] if foreign else COUNTRIES[home])
        dest = np.full(k, -1)
    elif kind == "account_takeover":
        k = min(int(rng.integers(1, 4)), left)
        night = rng.random() < 0.6
        day0 = np.floor(t0 / 86400) * 86400
        t0 = day0 + (rng.uniform(0, 5) if night else rng.uniform(8, 22)) * 3600
        t = t0 + np.sort(rng.uniform(0, 2400, k))
        amt = np.round(typical * np.exp(rng.normal(2.0, 0.5, k)), 2)
        chan = rng.choice(np.array(["online", "transfer"]), k)
        shops = rng.choice(np.array(["electronics", "jewelry", "travel"]), k)
        merch = np.where(chan == "transfer", "utilities", shops)
        dev = np.full(k, DEVICES[rng.choice([0, 1, 2])])
        new_dev = np.ones(k)
        ctry = np.full(k, COUNTRIES[rng.integers(7, 12)] if rng.random() < 0.8 else COUNTRIES[home])
        dest = np.where(chan == "transfer", rng.integers(10_000_000, 20_000_000, k), -1)
    elif kind == "high_value":
        k = 1
        t = np.array([np.floor(t0 / 86400) * 86400 + rng.uniform(9, 21) * 3600])
        amt = np.round(typical * rng.uniform(15, 40, 1), 2)
        merch = rng.choice(np.array(["jewelry", "electronics"]), 1)
        chan = np.array(["pos"])
        dev = np.array(["pos_terminal"])
        new_dev = np.zeros(1)
        ctry = np.array([COUNTRIES[home]])
        dest = np.array([-1])
    else:  # mule_transfer
        k = min(int(rng.integers(1, 3)), left)
        t = t0 + np.sort(rng.uniform(0, 3600 * 6, k))
        amt = rng.choice(np.array([500.0, 1000.0, 2000.0, 5000.0]), k)
        merch = np.full(k, "utilities")
        chan = np.full(k, "transfer")
        dev = np.full(k, usual)
        new_dev = (rng.random(k) < 0.3).astype(np.float64)
        ctry = np.full(k, COUNTRIES[home])
        dest = rng.choice(mules, k)
    return {"t": t, "account_id": np.full(k, acc), "amount": amt, "merchant_category": merch, "channel": chan,
            "device": dev, "is_new_device": new_dev, "country": ctry, "dest_account_id": dest,
            "fraud_pattern": np.full(k, kind), "is_fraud": np.ones(k)}


def _honest_traffic(rng: np.random.Generator, accounts: _Accounts, m: int) -> dict[str, np.ndarray]:
    """``m`` ordinary transactions that follow each account's habits, with some travel, new phones and big tickets."""
    accs = rng.integers(len(accounts.home), size=m)
    day = rng.integers(0, int(_SPAN_S // 86400), m) * 86400.0
    t = day + _daytime_hours(rng, m) * 3600 + rng.uniform(0, 60, m)
    amt = np.exp(accounts.spend_mu[accs] + rng.normal(0, 0.7, m))
    big = rng.random(m) < 0.01  # honest big tickets (a new TV, a flight)
    amt = np.where(big, amt * rng.uniform(3, 12, m), amt)
    chan = rng.choice(CHANNELS, m, p=_CHANNEL_P)
    merch = rng.choice(MERCHANTS, m, p=_MERCHANT_P)
    merch = np.where(chan == "atm", "cash", np.where(chan == "transfer", "utilities", merch))
    amt = np.where(chan == "atm", np.round(amt / 20 + 1) * 20, amt)
    new_dev = (rng.random(m) < 0.02).astype(np.float64)
    usual = accounts.usual_device[accs]
    dev_idx = np.where(new_dev > 0, (usual + rng.integers(1, 3, m)) % 3, usual)
    dev = np.where(chan == "pos", "pos_terminal", DEVICES[dev_idx])
    travel = rng.random(m) < 0.03
    ctry = np.where(travel, COUNTRIES[rng.integers(0, len(COUNTRIES), m)], COUNTRIES[accounts.home[accs]])
    dest = np.where(chan == "transfer", rng.integers(10_000_000, 20_000_000, m), -1)
    return {"t": t, "account_id": accs, "amount": np.round(amt, 2), "merchant_category": merch, "channel": chan,
            "device": dev, "is_new_device": new_dev, "country": ctry, "dest_account_id": dest,
            "fraud_pattern": np.full(m, "none"), "is_fraud": np.zeros(m)}


def _history_features(acc: np.ndarray, t: np.ndarray, amount: np.ndarray) -> dict[str, np.ndarray]:
    """Velocity columns of each transaction from its account's earlier ones only (as a live scorer sees them)."""
    # Sort by (account, time) so each account's past is a contiguous run.
    order = np.lexsort((t, acc))
    a, tt, am = acc[order], t[order], amount[order]
    key = a * 1e8 + tt  # accounts never overlap: the whole span is < 1e8 seconds
    idx = np.arange(len(key))
    first = np.searchsorted(a, a, side="left")
    count_1h = idx - np.searchsorted(key, key - 3600, side="left")
    left_24h = np.searchsorted(key, key - 86400, side="left")
    count_24h = idx - left_24h
    csum = np.concatenate([[0.0], np.cumsum(am)])
    sum_24h = csum[idx] - csum[left_24h]
    prev_n = idx - first
    prev_mean = np.where(prev_n > 0, (csum[idx] - csum[first]) / np.maximum(prev_n, 1), np.exp(3.4))
    since = np.where(prev_n > 0, tt - np.concatenate([[0.0], tt[:-1]]), 7 * 86400.0)
    derived = {"tx_count_1h": count_1h, "tx_count_24h": count_24h, "amount_sum_24h": sum_24h,
               "amount_ratio": am / prev_mean, "seconds_since_last": np.minimum(since, 7 * 86400.0)}
    out = {}
    for name, values in derived.items():
        full = np.empty(len(key), dtype=np.float64)
        full[order] = values
        out[name] = full
    return out


def _by_time(cols: dict[str, np.ndarray], n: int, start_time: float) -> dict[str, np.ndarray]:
    """The published columns (COLUMNS), sorted by time, with ids and the hour of day."""
    by_time = np.argsort(cols["t"], kind="stable")
    out: dict[str, np.ndarray] = {
        "transaction_id": np.arange(1, n + 1, dtype=np.int64),
        "timestamp": np.round(start_time + cols["t"][by_time], 3),
        "account_id": cols["account_id"][by_time].astype(np.int64) + 1000,
        "dest_account_id": cols["dest_account_id"][by_time].astype(np.int64),
        "hour": np.floor((cols["t"][by_time] % 86400) / 3600),
    }
    for name in NUMERIC_FEATURES:
        if name not in out:
            out[name] = np.asarray(cols[name][by_time], dtype=np.float64)
    for name in CATEGORICAL_FEATURES + ["fraud_pattern"]:
        out[name] = np.asarray(cols[name][by_time]).astype(str)
    out[LABEL] = cols["is_fraud"][by_time].astype(np.int64)
    return {k: out[k] for k in COLUMNS}
