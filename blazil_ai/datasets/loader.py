"""The loader: batches, seeded shuffling, sharding by rank, background prefetch and resumable state.

It is a resumable iterator in the torchdata manner: ``next()`` returns the next batch of the current
epoch (``StopIteration`` at its end, after which the next epoch begins), ``get_state()`` says where it
stands and ``reset(state)`` goes back there, so a restarted job continues with exactly the batch that
would have come next. ``state_dict`` / ``load_state_dict`` are the same two calls under PyTorch's names.

Order: epoch ``e`` shuffles with ``numpy.random.default_rng((seed, e))`` (same seed, same order; a new
order each epoch). With ``world_size`` > 1 (read from ``RANK`` / ``WORLD_SIZE`` as torchrun sets them
when not given), rank ``r`` takes every ``world_size``-th index of that order, padded by wrapping around
so all ranks get the same number of batches (like ``DistributedSampler``), or truncated with ``drop_last``.

A data set served block by block (``dataset.blocks``: index bounds of Parquet row groups, e.g.
``FeaturesDataset(memory_budget=...)``) is shuffled in two levels instead: the blocks in a seeded order, the
rows within each block; rank ``r`` takes the ``r``-th contiguous share of that order, so each rank decodes
about ``1/world_size`` of the row groups and only one or two blocks are needed per batch.

Batches are built in a background thread (``prefetch`` batches ahead) by one ``dataset.get_batch`` call
each, which is where file-backed types issue all their reads at once; an error there is raised by the
``next()`` that would have returned that batch, and the loader stays on that batch.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from blazil_ai import metrics
from blazil_ai.datasets.base import Batch, Dataset
from blazil_ai.errors import ConfigError

_SAMPLES = metrics.counter("datasets", "samples", "total", "Samples delivered by data loaders", ["type"])
_BATCH_SECONDS = metrics.histogram("datasets", "batch_load", "seconds", "Time to build one batch", ["type"])

_STATE_KEYS = ("epoch", "batch", "seed", "shuffle", "batch_size", "drop_last", "rank", "world_size", "samples")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def _load_batch(dataset: Dataset, indices: np.ndarray, kind: str) -> Batch:
    start = time.perf_counter()
    batch = dataset.get_batch(indices)
    _BATCH_SECONDS.labels(kind).observe(time.perf_counter() - start)
    return batch


def _prefetch(dataset: Dataset, order: np.ndarray, batch_size: int, epoch: int, first: int, end: int, kind: str,
              stop: threading.Event, out: queue.Queue) -> None:
    """Build batches first..end-1 of one epoch into ``out``; an exception is handed over as the item."""
    for b in range(first, end):
        if stop.is_set():
            return
        try:
            item: Any = _load_batch(dataset, order[b * batch_size:(b + 1) * batch_size], kind)
        except BaseException as e:  # handed to the caller; the worker never dies silently
            item = e
        while not stop.is_set():
            try:
                out.put((epoch, b, item), timeout=0.1)
                break
            except queue.Full:
                continue
        if isinstance(item, BaseException):
            return


class Loader:
    """Iterate a dataset in batches of numpy arrays; resumable mid-epoch, shardable, prefetching."""

    def __init__(self, dataset: Dataset, batch_size: int = 32, *, shuffle: bool = False, seed: int = 0,
                 drop_last: bool = False, rank: int | None = None, world_size: int | None = None,
                 prefetch: int = 2) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if prefetch < 0:
            raise ConfigError(f"prefetch must be >= 0, got {prefetch}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.world_size = world_size if world_size is not None else (_env_int("WORLD_SIZE") or 1)
        self.rank = rank if rank is not None else (_env_int("RANK") or 0)
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ConfigError(f"need 0 <= rank < world_size, got rank={self.rank} world_size={self.world_size}")
        self.prefetch = prefetch
        self.epoch = 0
        self.batch = 0  # batches of this epoch already handed out
        self._order: np.ndarray | None = None
        self._order_epoch = -1
        self._worker: threading.Thread | None = None
        self._queue: queue.Queue[tuple[int, int, Any]] = queue.Queue()
        self._stop = threading.Event()
        self._kind = getattr(dataset, "kind", "") or type(dataset).__name__

    # -- order ---------------------------------------------------------------------------------------
    def indices(self, epoch: int | None = None) -> np.ndarray:
        """This rank's sample indices for ``epoch`` (default: the current one), in delivery order."""
        epoch = self.epoch if epoch is None else epoch
        if epoch == self._order_epoch and self._order is not None:
            return self._order
        n = len(self.dataset)
        blocks = getattr(self.dataset, "blocks", None)
        if blocks is not None and len(blocks) > 2:
            order = self._block_order(epoch, np.asarray(blocks, dtype=np.int64))
        else:
            order = np.random.default_rng((self.seed, epoch)).permutation(n) if self.shuffle else np.arange(n)
        ws = self.world_size
        if ws > 1 and blocks is not None and len(blocks) > 2:
            # Contiguous shares of the block order: each rank reads about 1/world_size of the row groups.
            m = n // ws if self.drop_last else -(-n // ws)
            order = np.resize(order, m * ws)[self.rank * m:(self.rank + 1) * m]
        elif ws > 1:
            if self.drop_last:
                order = order[: (n // ws) * ws]
            elif n % ws:
                total = -(-n // ws) * ws
                order = np.concatenate([order, np.resize(order, total - n)])  # wrap around, as DistributedSampler
            order = order[self.rank::ws]
        self._order, self._order_epoch = order, epoch
        return order

    def _block_order(self, epoch: int, bounds: np.ndarray) -> np.ndarray:
        """A data set served block by block (Parquet row groups): blocks in a seeded random order, rows shuffled
        within each block, so a batch needs one or two decoded blocks and memory stays bounded."""
        nb = len(bounds) - 1
        if not self.shuffle:
            return np.arange(int(bounds[-1]), dtype=np.int32 if bounds[-1] < 2**31 else np.int64)
        rng = np.random.default_rng((self.seed, epoch))
        dtype = np.int32 if bounds[-1] < 2**31 else np.int64  # half the memory of the order for most tables
        return np.concatenate([(bounds[b] + rng.permutation(int(bounds[b + 1] - bounds[b]))).astype(dtype)
                               for b in rng.permutation(nb).tolist()])

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        m = len(self.indices())
        return m // self.batch_size if self.drop_last else -(-m // self.batch_size)

    def _batch_indices(self, epoch: int, b: int) -> np.ndarray:
        order = self.indices(epoch)
        return order[b * self.batch_size:(b + 1) * self.batch_size]

    def _load(self, epoch: int, b: int) -> Batch:
        return _load_batch(self.dataset, self._batch_indices(epoch, b), self._kind)

    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.prefetch)
        # The worker holds the dataset and this epoch's order, not the loader, so an abandoned loader
        # is collected and its __del__ stops the thread.
        self._worker = threading.Thread(
            target=_prefetch, name="blazil-loader", daemon=True,
            args=(self.dataset, self.indices(), self.batch_size, self.epoch, self.batch, len(self), self._kind,
                  self._stop, self._queue))
        self._worker.start()

    def _halt(self) -> None:
        if self._worker is not None:
            self._stop.set()
            self._worker.join()
            self._worker = None

    # -- the resumable-iterator interface ------------------------------------------------------------
    def next(self) -> Batch:
        """The next batch of the current epoch; StopIteration at its end (and the next epoch begins)."""
        if self.batch >= len(self):
            self._halt()
            self.epoch += 1
            self.batch = 0
            raise StopIteration
        if self.prefetch == 0:
            batch = self._load(self.epoch, self.batch)
        else:
            if self._worker is None:
                self._start()
            epoch, b, item = self._queue.get()
            assert (epoch, b) == (self.epoch, self.batch), "prefetch out of step"
            if isinstance(item, BaseException):
                self._worker = None  # it has stopped; a retry starts a fresh one at this same batch
                raise item
            batch = item
        self.batch += 1
        _SAMPLES.labels(self._kind).inc(len(next(iter(batch.values()))) if batch else 0)
        return batch

    __next__ = next

    def __iter__(self) -> Iterator[Batch]:
        """The rest of the current epoch (a whole epoch when it is at its start)."""
        while True:
            try:
                yield self.next()
            except StopIteration:
                return

    def get_state(self) -> dict[str, Any]:
        """Where the loader stands: resuming from this state yields exactly the next batch."""
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed, "shuffle": self.shuffle,
                "batch_size": self.batch_size, "drop_last": self.drop_last, "rank": self.rank,
                "world_size": self.world_size, "samples": len(self.dataset), "order": self._order_kind()}

    def _order_kind(self) -> str:
        blocks = getattr(self.dataset, "blocks", None)
        return f"row_groups:{len(blocks) - 1}" if blocks is not None and len(blocks) > 2 else "rows"

    def reset(self, state: dict[str, Any] | None = None) -> None:
        """Go back to the start of epoch 0, or to ``state`` (from ``get_state``) when given."""
        self._halt()
        if state is None:
            self.epoch, self.batch = 0, 0
            return
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ConfigError(f"loader state is missing {missing}")
        mine = self.get_state()
        keys = [*_STATE_KEYS[2:], *(["order"] if "order" in state else [])]  # states saved before "order" lack it
        differ = {k: (state[k], mine[k]) for k in keys if state[k] != mine[k]}
        if differ:
            # Resuming under other settings would silently give other batches; refuse instead.
            raise ConfigError("loader state was saved with other settings (saved, current): "
                              + ", ".join(f"{k}={a!r},{b!r}" for k, (a, b) in differ.items()))
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])

    def state_dict(self) -> dict[str, Any]:
        """PyTorch-style name for ``get_state``."""
        return self.get_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """PyTorch-style name for ``reset(state)``."""
        self.reset(state)

    def close(self) -> None:
        """Stop the prefetch thread."""
        self._halt()

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()

    def torch(self) -> TorchLoader:
        """An adapter yielding dicts of torch tensors (needs torch installed)."""
        return TorchLoader(self)


class TorchLoader:
    """Wraps a Loader so a torch training loop gets ``dict[str, torch.Tensor]`` batches (zero-copy)."""

    def __init__(self, loader: Loader) -> None:
        import torch

        self._torch = torch
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from_numpy = self._torch.from_numpy
        for batch in self.loader:
            yield {k: from_numpy(np.ascontiguousarray(v)) if v.dtype.kind in "biuf" else v for k, v in batch.items()}

    def state_dict(self) -> dict[str, Any]:
        """The wrapped loader's state."""
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the wrapped loader."""
        self.loader.load_state_dict(state)
