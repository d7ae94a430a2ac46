"""The loader: batching, seeded shuffling, sharding, prefetch, resumable state, errors, torch adapter."""

from __future__ import annotations

import numpy as np
import pytest

from blazil_ai.datasets import Loader, make_samples, open_dataset
from blazil_ai.datasets.base import Dataset
from blazil_ai.errors import ConfigError, DataError


class Numbers(Dataset):
    """n samples whose value is their index: order and coverage are visible in the batches."""

    kind = "numbers"

    def __init__(self, n: int) -> None:
        self.path = None  # type: ignore[assignment]
        self.n = n

    def __len__(self) -> int:
        return self.n

    def get_batch(self, indices):
        return {"i": np.asarray(indices, dtype=np.int64), "sq": np.asarray(indices, dtype=np.float32) ** 2}


def _all(loader):
    return [b["i"].tolist() for b in loader]


@pytest.mark.parametrize("prefetch", [0, 3])
def test_batches_and_drop_last(prefetch):
    assert [len(b) for b in _all(Loader(Numbers(10), 4, prefetch=prefetch))] == [4, 4, 2]
    loader = Loader(Numbers(10), 4, drop_last=True, prefetch=prefetch)
    assert _all(loader) == [[0, 1, 2, 3], [4, 5, 6, 7]] and len(loader) == 2


def test_seeded_shuffle_same_seed_same_order_new_order_each_epoch():
    a, b, c = (Loader(Numbers(50), 8, shuffle=True, seed=s) for s in (7, 7, 8))
    ea, eb, ec = _all(a), _all(b), _all(c)
    assert ea == eb and ea != ec
    assert sorted(sum(ea, [])) == list(range(50))
    second = _all(a)  # the next epoch
    assert second != ea and sorted(sum(second, [])) == list(range(50))
    assert a.get_state()["epoch"] == 2


@pytest.mark.parametrize("drop_last", [False, True])
def test_sharding_splits_the_epoch_between_ranks(drop_last):
    ranks = [Loader(Numbers(23), 4, shuffle=True, seed=1, rank=r, world_size=3, drop_last=drop_last)
             for r in range(3)]
    parts = [r.indices() for r in ranks]
    assert len({len(p) for p in parts}) == 1  # every rank does the same number of steps
    seen = np.concatenate(parts)
    if drop_last:
        assert len(seen) == 21 and len(set(seen.tolist())) == 21
    else:
        assert len(seen) == 24 and set(seen.tolist()) == set(range(23))


def test_rank_and_world_size_from_torchrun_env(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    loader = Loader(Numbers(10), 5)
    assert (loader.rank, loader.world_size) == (1, 2)
    assert loader.indices().tolist() == [1, 3, 5, 7, 9]
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ConfigError, match="rank"):
        Loader(Numbers(10), 5)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_state_resumes_mid_epoch_at_exactly_the_next_batch(prefetch):
    ref = Loader(Numbers(40), 6, shuffle=True, seed=3, prefetch=prefetch)
    expected = _all(ref) + _all(ref)  # two epochs
    run = Loader(Numbers(40), 6, shuffle=True, seed=3, prefetch=prefetch)
    got = [run.next()["i"].tolist() for _ in range(4)]
    state = run.state_dict()
    assert state["batch"] == 4
    resumed = Loader(Numbers(40), 6, shuffle=True, seed=3, prefetch=prefetch)
    resumed.load_state_dict(state)
    got += _all(resumed) + _all(resumed)
    assert got == expected
    run.reset()
    assert _all(run) == expected[:7]


def test_state_from_other_settings_is_refused():
    state = Loader(Numbers(40), 6, seed=3).get_state()
    with pytest.raises(ConfigError, match="batch_size"):
        Loader(Numbers(40), 8, seed=3).reset(state)
    with pytest.raises(ConfigError, match="missing"):
        Loader(Numbers(40), 6, seed=3).reset({"epoch": 0})


def test_worker_errors_reach_the_caller_and_the_loader_stays_put(tmp_path):
    paths = make_samples(tmp_path, small=True)
    ds = open_dataset("audio", paths["audio"])
    victim = ds.files[5]
    with open(victim, "r+b") as f:  # cut the data chunk short after the scan
        f.truncate(100)
    ds.sizes[5] = 100
    loader = Loader(ds, 4, prefetch=2)
    loader.next()
    with pytest.raises(DataError, match=r"chirp_0005\.wav: truncated WAV"):
        loader.next()
    assert loader.get_state()["batch"] == 1
    with pytest.raises(DataError, match="truncated WAV"):  # a retry fails the same way, no hang
        loader.next()


def test_torch_adapter_yields_tensors():
    torch = pytest.importorskip("torch")
    loader = Loader(Numbers(10), 4)
    batches = list(loader.torch())
    assert len(batches) == 3 and isinstance(batches[0]["i"], torch.Tensor)
    assert batches[0]["sq"].dtype == torch.float32 and batches[2]["i"].tolist() == [8, 9]


def test_abandoned_loader_stops_its_thread():
    import gc

    loader = Loader(Numbers(1000), 2, prefetch=2)
    loader.next()
    worker = loader._worker
    assert worker is not None and worker.is_alive()
    del loader
    gc.collect()
    worker.join(timeout=5)
    assert not worker.is_alive()


def test_dataset_works_inside_torch_dataloader_workers(tmp_path):
    """Forked DataLoader workers get their own io_uring ring, not the parent's."""
    tud = pytest.importorskip("torch.utils.data")
    paths = make_samples(tmp_path, small=True)
    ds = open_dataset("audio", paths["audio"], duration=0.5)
    expected = ds.get_batch(np.arange(len(ds)))["audio"]  # the parent has used its ring already

    class Items(tud.Dataset):
        def __len__(self):
            return len(ds)

        def __getitem__(self, i):
            return ds[i]["audio"]

    got = np.concatenate([b.numpy() for b in tud.DataLoader(Items(), batch_size=8, num_workers=2, timeout=60)])
    assert np.array_equal(got, expected)
