"""Dynamic batching: many callers submit single items; one worker runs them as batches.

A batch closes when it reaches ``max_batch`` items or when its first item has waited ``max_delay``
seconds. Each caller gets its own result row, or its own error: when a merged batch fails, its items
are re-run one by one so a single bad item fails alone.

>>> sess = Session("fraud.onnx")                                 # doctest: +SKIP
>>> with DynamicBatcher(sess.run, max_batch=64, max_delay=0.002) as batcher:   # doctest: +SKIP
...     (prob,) = batcher.infer({"features": row})                # row has no batch axis
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from blazil_ai import metrics
from blazil_ai.errors import BlazilError, ConfigError

Item = Mapping[str, np.ndarray]
BatchFn = Callable[[dict[str, np.ndarray]], Sequence[np.ndarray]]

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class BatcherClosed(BlazilError):
    """The batcher was closed before this item ran."""


class Pending:
    """The future result of one submitted item (``result(timeout)`` blocks until it is set).

    A bare lock is CPython's cheapest wake-up: with 64 callers per batch, the lighter hand-off than
    ``concurrent.futures.Future`` (a Condition per item) is what lets small models gain from batching.
    """

    __slots__ = ("_lock", "_value", "_error")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self._value: list[np.ndarray] | None = None
        self._error: BaseException | None = None

    def _set(self, value: list[np.ndarray] | None, error: BaseException | None = None) -> None:
        self._value, self._error = value, error
        self._lock.release()

    def done(self) -> bool:
        """Whether the result (or error) is set."""
        return not self._lock.locked()

    def result(self, timeout: float | None = None) -> list[np.ndarray]:
        """The item's outputs; raises the item's own error, or TimeoutError after ``timeout`` seconds."""
        if not self._lock.acquire(timeout=-1 if timeout is None else timeout):
            raise TimeoutError(f"no result within {timeout} s")
        self._lock.release()  # later result() calls return at once
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The item's error, or None when it succeeded."""
        try:
            self.result(timeout)
        except TimeoutError:
            raise
        except BaseException as e:
            return e
        return None


class DynamicBatcher:
    """Merge concurrent single-item calls into batches for ``fn`` (e.g. ``Session.run``).

    ``fn`` takes a dict of batched arrays (leading batch axis) and returns a sequence of arrays whose
    first axis is the batch; item ``i`` gets row ``i`` of each output.
    """

    def __init__(self, fn: BatchFn, *, max_batch: int = 64, max_delay: float = 0.002, name: str = "model",
                 max_queue: int = 65536, workers: int = 1) -> None:
        if max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
        if max_delay < 0:
            raise ConfigError(f"max_delay must be >= 0 seconds, got {max_delay}")
        if workers < 1:
            raise ConfigError(f"workers must be >= 1, got {workers}")
        self.fn = fn
        self.max_batch = max_batch
        self.max_delay = max_delay
        self.max_queue = max_queue
        self.name = name
        self._pending: deque[tuple[Item, Pending, float]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._m_queue = metrics.gauge("models", "batcher_queue", "items",
                                      "Items left waiting in a dynamic batcher when it last took a batch",
                                      ["model"]).labels(name)
        self._m_batch = metrics.histogram("models", "batch_size", "items", "Items per batch run by a dynamic batcher",
                                          ["model"], buckets=_BATCH_BUCKETS).labels(name)
        self._m_wait = metrics.histogram("models", "batch_wait", "seconds",
                                         "Time the oldest item of a batch waited before the batch ran",
                                         ["model"]).labels(name)
        self._m_run = metrics.histogram("models", "batch_run", "seconds", "Time to run one merged batch",
                                        ["model"]).labels(name)
        self._m_items = metrics.counter("models", "batcher_items", "total", "Items run by a dynamic batcher",
                                        ["model"]).labels(name)
        self._m_errors = metrics.counter("models", "batcher_errors", "total",
                                         "Items that ended with an error in a dynamic batcher", ["model"]).labels(name)
        # More than one worker keeps several batches in flight: with onnxruntime at one intra-op thread,
        # that is how a batcher uses more than one core (a tract session runs one batch at a time anyway).
        self._workers = [threading.Thread(target=self._loop, name=f"blazil-batcher-{name}-{i}", daemon=True)
                         for i in range(workers)]
        for w in self._workers:
            w.start()

    def submit(self, item: Item) -> Pending:
        """Queue one item (input name -> array without the batch axis); returns a Pending of its outputs."""
        fut = Pending()
        with self._cond:
            if self._closed:
                raise BatcherClosed(f"batcher {self.name!r} is closed")
            if len(self._pending) >= self.max_queue:
                raise BlazilError(f"batcher {self.name!r} queue is full ({self.max_queue} items)")
            self._pending.append((item, fut, time.perf_counter()))
            if len(self._pending) == 1 or len(self._pending) >= self.max_batch:
                self._cond.notify()
        return fut

    def infer(self, item: Item, timeout: float | None = None) -> list[np.ndarray]:
        """Submit one item and wait for its outputs (one array per model output, batch axis removed)."""
        return self.submit(item).result(timeout)

    def _take(self) -> list[tuple[Item, Pending, float]] | None:
        with self._cond:
            while True:
                while not self._pending:
                    if self._closed:
                        return None
                    self._cond.wait()
                deadline = self._pending[0][2] + self.max_delay
                while self._pending and len(self._pending) < self.max_batch and not self._closed:
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if not self._pending:  # another worker took them while this one waited
                    continue
                n = min(self.max_batch, len(self._pending))
                batch = [self._pending.popleft() for _ in range(n)]
                self._m_queue.set(len(self._pending))
                if self._pending:
                    self._cond.notify()  # more work: wake another worker
                return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            # One observation per batch (its oldest item): per-item observations would cost more than a
            # small model's run.
            self._m_wait.observe(time.perf_counter() - batch[0][2])
            live = [(item, fut) for item, fut, _ in batch]
            # Items whose arrays differ in shape (e.g. texts of other lengths) cannot stack: run per shape.
            groups: dict[tuple, list[tuple[Item, Pending]]] = {}
            for item, fut in live:
                try:
                    # Shape only: a wrong dtype or name makes the merged run fail, and the fallback in
                    # _run_group then gives that item its own error.
                    key = tuple([v.shape for v in item.values()])
                except AttributeError as e:
                    self._fail(fut, BlazilError(f"an item must map input names to numpy arrays ({e})"))
                    continue
                groups.setdefault(key, []).append((item, fut))
            for group in groups.values():
                self._run_group(group)

    def _run_group(self, group: list[tuple[Item, Pending]]) -> None:
        t0 = time.perf_counter()
        try:
            feeds = {k: np.stack([item[k] for item, _ in group]) for k in group[0][0]}
            outs = self.fn(feeds)
        except Exception as e:
            if len(group) == 1:
                self._fail(group[0][1], e)
            else:
                # One bad item must not fail its neighbours: find it by running each alone.
                for one in group:
                    self._run_group([one])
            return
        self._m_run.observe(time.perf_counter() - t0)
        self._m_batch.observe(len(group))
        self._m_items.inc(len(group))
        for i, (_, fut) in enumerate(group):
            fut._set([o[i] for o in outs])

    def _fail(self, fut: Pending, e: BaseException) -> None:
        self._m_errors.inc()
        fut._set(None, e)

    def close(self, timeout: float | None = 10.0) -> None:
        """Run what is queued, then stop the worker; later submits raise :class:`BatcherClosed`."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for w in self._workers:
            w.join(timeout)

    def __enter__(self) -> DynamicBatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def session_batcher(session: Any, **kw: Any) -> DynamicBatcher:
    """A :class:`DynamicBatcher` over a :class:`~blazil_ai.models.session.Session`, named after its file."""
    kw.setdefault("name", session.path.stem)
    return DynamicBatcher(session.run, **kw)
