"""Dynamic batching: many callers submit single items; one worker runs them as batches.

A batch closes when it reaches ``max_batch`` items or when its first item has waited ``max_delay``
seconds. Each caller gets its own result row, or its own error: when a merged batch fails, its items
are re-run one by one so a single bad item fails alone.

>>> sess = Session("fraud.onnx")                                 # doctest: +SKIP
>>> with DynamicBatcher(sess.run, max_batch=64, max_delay=0.002) as batcher:   # doctest: +SKIP
...     (prob,) = batcher.infer({"features": row})                # row has no batch axis
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from blazil_ai import metrics
from blazil_ai.errors import BlazilError, ConfigError

Item = Mapping[str, np.ndarray]
BatchFn = Callable[[dict[str, np.ndarray]], Sequence[np.ndarray]]

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


Result = tuple[list[np.ndarray] | None, BaseException | None]
OnBatch = Callable[[int, float], None]


def run_batch(fn: BatchFn, items: Sequence[Item], on_batch: OnBatch | None = None) -> list[Result]:
    """Run ``items`` through ``fn`` as merged batches (one per input shape); ``(outputs, None)`` or ``(None, error)``.

    Items whose arrays differ in shape (e.g. texts of other lengths) cannot stack, so each shape runs as its own
    batch. When a merged batch fails, its items are re-run one by one so a single bad item fails alone.
    ``on_batch(size, seconds)`` is called after each successful run.
    """
    results: list[Result] = [(None, None)] * len(items)
    groups: dict[tuple, list[int]] = {}
    for i, item in enumerate(items):
        try:
            # Shape only: a wrong dtype or name makes the merged run fail, and the one-by-one fallback
            # then gives that item its own error.
            key = tuple([v.shape for v in item.values()])
        except AttributeError as e:
            results[i] = (None, BlazilError(f"an item must map input names to numpy arrays ({e})"))
            continue
        groups.setdefault(key, []).append(i)
    for idxs in groups.values():
        _run_group(fn, items, idxs, results, on_batch)
    return results


def _run_group(fn: BatchFn, items: Sequence[Item], idxs: list[int], results: list[Result],
               on_batch: OnBatch | None) -> None:
    t0 = time.perf_counter()
    try:
        feeds = {k: np.stack([items[i][k] for i in idxs]) for k in items[idxs[0]]}
        outs = fn(feeds)
    except Exception as e:
        if len(idxs) == 1:
            results[idxs[0]] = (None, e)
        else:
            for i in idxs:
                _run_group(fn, items, [i], results, on_batch)
        return
    if on_batch is not None:
        on_batch(len(idxs), time.perf_counter() - t0)
    for j, i in enumerate(idxs):
        results[i] = ([o[j] for o in outs], None)


def _check_settings(max_batch: int, max_delay: float) -> None:
    if max_batch < 1:
        raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
    if max_delay < 0:
        raise ConfigError(f"max_delay must be >= 0 seconds, got {max_delay}")


class _BatchMetrics:
    """The batcher metrics of one model name (shared by the thread and asyncio batchers)."""

    def __init__(self, name: str) -> None:
        self.queue = metrics.gauge("models", "batcher_queue", "items",
                                   "Items left waiting in a dynamic batcher when it last took a batch",
                                   ["model"]).labels(name)
        self.batch = metrics.histogram("models", "batch_size", "items", "Items per batch run by a dynamic batcher",
                                       ["model"], buckets=_BATCH_BUCKETS).labels(name)
        self.wait = metrics.histogram("models", "batch_wait", "seconds",
                                      "Time the oldest item of a batch waited before the batch ran",
                                      ["model"]).labels(name)
        self.run = metrics.histogram("models", "batch_run", "seconds", "Time to run one merged batch",
                                     ["model"]).labels(name)
        self.items = metrics.counter("models", "batcher_items", "total", "Items run by a dynamic batcher",
                                     ["model"]).labels(name)
        self.errors = metrics.counter("models", "batcher_errors", "total",
                                      "Items that ended with an error in a dynamic batcher", ["model"]).labels(name)

    def on_batch(self, size: int, seconds: float) -> None:
        self.run.observe(seconds)
        self.batch.observe(size)
        self.items.inc(size)


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
        _check_settings(max_batch, max_delay)
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
        self._m = _BatchMetrics(name)
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
                self._m.queue.set(len(self._pending))
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
            self._m.wait.observe(time.perf_counter() - batch[0][2])
            results = run_batch(self.fn, [item for item, _, _ in batch], self._m.on_batch)
            for (_, fut, _), (value, error) in zip(batch, results):
                if error is not None:
                    self._fail(fut, error)
                else:
                    fut._set(value)

    def _fail(self, fut: Pending, e: BaseException) -> None:
        self._m.errors.inc()
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


class AsyncBatcher:
    """The dynamic batcher for asyncio callers: coroutines submit single items, one batch runs for many.

    Items are collected on the event loop (no thread per caller, no lock per item); a batch runs in a
    worker thread (``offload=True``, the default, keeps the loop serving while the model runs) or on the
    loop itself (``offload=False``, for models of a few microseconds).

    >>> batcher = AsyncBatcher(sess.run, max_batch=64, max_delay=0.002)      # doctest: +SKIP
    >>> (prob,) = await batcher.infer({"features": row})                      # doctest: +SKIP
    """

    def __init__(self, fn: BatchFn, *, max_batch: int = 64, max_delay: float = 0.002, name: str = "model",
                 offload: bool = True) -> None:
        _check_settings(max_batch, max_delay)
        self.fn = fn
        self.max_batch = max_batch
        self.max_delay = max_delay
        self.name = name
        self._m = _BatchMetrics(name)
        self._items: list[Item] = []
        self._futures: list[asyncio.Future[list[np.ndarray]]] = []
        self._first_at = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"blazil-abatcher-{name}") if offload else None
        self._closed = False

    async def infer(self, item: Item) -> list[np.ndarray]:
        """The outputs of one item (input name -> array without the batch axis), batched with its neighbours."""
        if self._closed:
            raise BatcherClosed(f"batcher {self.name!r} is closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[np.ndarray]] = loop.create_future()
        if not self._items:
            self._first_at = time.perf_counter()
        self._items.append(item)
        self._futures.append(fut)
        if len(self._items) >= self.max_batch:
            self._flush(loop)
        elif self._timer is None:
            self._timer = loop.call_later(self.max_delay, self._flush, loop)
        return await fut

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        items, futures = self._items, self._futures
        if not items:
            return
        self._items, self._futures = [], []
        self._m.wait.observe(time.perf_counter() - self._first_at)
        if self._executor is None:
            self._deliver(futures, run_batch(self.fn, items, self._m.on_batch))
            return
        done = loop.run_in_executor(self._executor, run_batch, self.fn, items, self._m.on_batch)
        done.add_done_callback(lambda f: self._finished(futures, f))

    def _finished(self, futures: list[asyncio.Future[list[np.ndarray]]], done: asyncio.Future[list[Result]]) -> None:
        error = done.exception()
        self._deliver(futures, [(None, error)] * len(futures) if error is not None else done.result())

    def _deliver(self, futures: list[asyncio.Future[list[np.ndarray]]], results: list[Result]) -> None:
        for fut, (value, error) in zip(futures, results):
            if fut.done():  # the caller was cancelled
                continue
            if error is not None:
                self._m.errors.inc()
                fut.set_exception(error)
            else:
                fut.set_result(value)  # type: ignore[arg-type]

    async def aclose(self) -> None:
        """Run what is queued, then stop; later calls raise :class:`BatcherClosed`."""
        self._closed = True
        self._flush(asyncio.get_running_loop())
        if self._executor is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown, True)

    async def __aenter__(self) -> AsyncBatcher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
