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
from concurrent.futures import Future
from typing import Any

import numpy as np

from blazil_ai import metrics
from blazil_ai.errors import BlazilError, ConfigError

Item = Mapping[str, np.ndarray]
BatchFn = Callable[[dict[str, np.ndarray]], Sequence[np.ndarray]]

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class BatcherClosed(BlazilError):
    """The batcher was closed before this item ran."""


class DynamicBatcher:
    """Merge concurrent single-item calls into batches for ``fn`` (e.g. ``Session.run``).

    ``fn`` takes a dict of batched arrays (leading batch axis) and returns a sequence of arrays whose
    first axis is the batch; item ``i`` gets row ``i`` of each output.
    """

    def __init__(self, fn: BatchFn, *, max_batch: int = 64, max_delay: float = 0.002, name: str = "model",
                 max_queue: int = 65536) -> None:
        if max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
        if max_delay < 0:
            raise ConfigError(f"max_delay must be >= 0 seconds, got {max_delay}")
        self.fn = fn
        self.max_batch = max_batch
        self.max_delay = max_delay
        self.max_queue = max_queue
        self.name = name
        self._pending: deque[tuple[Item, Future, float]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._m_queue = metrics.gauge("models", "batcher_queue", "items", "Items waiting in a dynamic batcher",
                                      ["model"]).labels(name)
        self._m_batch = metrics.histogram("models", "batch_size", "items", "Items per batch run by a dynamic batcher",
                                          ["model"], buckets=_BATCH_BUCKETS).labels(name)
        self._m_wait = metrics.histogram("models", "batcher_wait", "seconds",
                                         "Time an item waits in a dynamic batcher before its batch runs",
                                         ["model"]).labels(name)
        self._m_run = metrics.histogram("models", "batch_run", "seconds", "Time to run one merged batch",
                                        ["model"]).labels(name)
        self._m_items = metrics.counter("models", "batcher_items", "total", "Items run by a dynamic batcher",
                                        ["model"]).labels(name)
        self._m_errors = metrics.counter("models", "batcher_errors", "total",
                                         "Items that ended with an error in a dynamic batcher", ["model"]).labels(name)
        self._worker = threading.Thread(target=self._loop, name=f"blazil-batcher-{name}", daemon=True)
        self._worker.start()

    def submit(self, item: Item) -> Future:
        """Queue one item (input name -> array without the batch axis); returns a Future of its outputs."""
        fut: Future = Future()
        with self._cond:
            if self._closed:
                raise BatcherClosed(f"batcher {self.name!r} is closed")
            if len(self._pending) >= self.max_queue:
                raise BlazilError(f"batcher {self.name!r} queue is full ({self.max_queue} items)")
            self._pending.append((item, fut, time.perf_counter()))
            self._m_queue.inc()
            if len(self._pending) == 1 or len(self._pending) >= self.max_batch:
                self._cond.notify()
        return fut

    def infer(self, item: Item, timeout: float | None = None) -> list[np.ndarray]:
        """Submit one item and wait for its outputs (one array per model output, batch axis removed)."""
        return self.submit(item).result(timeout)

    def _take(self) -> list[tuple[Item, Future, float]] | None:
        with self._cond:
            while not self._pending:
                if self._closed:
                    return None
                self._cond.wait()
            deadline = self._pending[0][2] + self.max_delay
            while len(self._pending) < self.max_batch and not self._closed:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._cond.wait(left)
            n = min(self.max_batch, len(self._pending))
            batch = [self._pending.popleft() for _ in range(n)]
            self._m_queue.dec(n)
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            now = time.perf_counter()
            for _, _, t in batch:
                self._m_wait.observe(now - t)
            live = [(item, fut) for item, fut, _ in batch if fut.set_running_or_notify_cancel()]
            # Items whose arrays differ in shape (e.g. texts of other lengths) cannot stack: run per shape.
            groups: dict[tuple, list[tuple[Item, Future]]] = {}
            for item, fut in live:
                try:
                    key = tuple((k, v.shape, v.dtype.str) for k, v in item.items())
                except AttributeError as e:
                    self._fail(fut, BlazilError(f"an item must map input names to numpy arrays ({e})"))
                    continue
                groups.setdefault(key, []).append((item, fut))
            for group in groups.values():
                self._run_group(group)

    def _run_group(self, group: list[tuple[Item, Future]]) -> None:
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
            fut.set_result([o[i] for o in outs])

    def _fail(self, fut: Future, e: BaseException) -> None:
        self._m_errors.inc()
        fut.set_exception(e)

    def close(self, timeout: float | None = 10.0) -> None:
        """Run what is queued, then stop the worker; later submits raise :class:`BatcherClosed`."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._worker.join(timeout)

    def __enter__(self) -> DynamicBatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def session_batcher(session: Any, **kw: Any) -> DynamicBatcher:
    """A :class:`DynamicBatcher` over a :class:`~blazil_ai.models.session.Session`, named after its file."""
    kw.setdefault("name", session.path.stem)
    return DynamicBatcher(session.run, **kw)
