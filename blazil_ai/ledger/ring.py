"""A bounded batch queue: one lock, a fixed number of preallocated slots, one consumer that takes batches.

Producers publish items (each gets a sequence number); the single consumer takes *everything* published so
far as one batch, which is how many small requests become one engine batch and one fsync. A full queue
blocks producers (back-pressure) instead of growing. Waiting uses condition variables, so an idle queue
costs no CPU and a consumer blocked in :meth:`RingBuffer.batches` wakes only for work or for ``close()``.

It is not a Disruptor: producers and the consumer share one lock, and slots are handed over under it.

>>> ring = RingBuffer(8)
>>> ring.publish("a"), ring.publish("b")
(0, 1)
>>> ring.take(timeout=0)
['a', 'b']
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class RingClosed(Exception):
    """The ring was closed while a producer or the consumer waited on it."""


class RingBuffer(Generic[T]):
    """Multi-producer, single-consumer bounded queue of ``size`` (a power of two) preallocated slots."""

    def __init__(self, size: int = 1024) -> None:
        if size < 1 or size & (size - 1):
            raise ValueError(f"ring size must be a power of two, got {size}")
        self.size = size
        self._mask = size - 1
        self._slots: list[T | None] = [None] * size
        self._claimed = -1  # highest sequence published (claimed and filled under the lock)
        self._consumed = -1  # highest sequence the consumer has taken
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)
        self._closed = False

    @property
    def cursor(self) -> int:
        """Highest published sequence."""
        return self._claimed

    @property
    def consumed(self) -> int:
        """Highest sequence taken by the consumer."""
        return self._consumed

    def publish(self, item: T, timeout: float | None = None) -> int:
        """Store ``item`` under the next sequence and return it; blocks while the ring is full."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            if self._closed:
                raise RingClosed("ring buffer is closed")
            while self._claimed + 1 - self._consumed > self.size:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError("ring buffer full")
                self._not_full.wait(left)
                if self._closed:
                    raise RingClosed("ring buffer is closed")
            seq = self._claimed = self._claimed + 1
            self._slots[seq & self._mask] = item
            self._not_empty.notify()
        return seq

    def take(self, timeout: float | None = None, limit: int | None = None) -> list[T]:
        """Everything published since the last take (up to ``limit``), waiting up to ``timeout`` for one.

        Raises RingClosed once the ring is closed and empty (items published before ``close()`` are still taken).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._claimed == self._consumed:
                if self._closed:
                    raise RingClosed("ring buffer is closed")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return []
                self._not_empty.wait(left)
            end = self._claimed if limit is None else min(self._claimed, self._consumed + limit)
            out: list[T] = []
            for seq in range(self._consumed + 1, end + 1):
                slot = seq & self._mask
                out.append(self._slots[slot])  # type: ignore[arg-type]
                self._slots[slot] = None
            self._consumed = end
            self._not_full.notify_all()
        return out

    def batches(self, limit: int | None = None) -> Iterator[list[T]]:
        """The consumer's loop: each batch as soon as there is one (blocking, no polling); ends once the ring
        is closed and everything published before ``close()`` has been taken."""
        while True:
            try:
                batch = self.take(limit=limit)
            except RingClosed:
                return
            yield batch

    def close(self) -> None:
        """Wake every waiter; later publishes raise RingClosed (items already published can still be taken)."""
        with self._lock:
            self._closed = True
            self._not_empty.notify_all()
            self._not_full.notify_all()

    def __len__(self) -> int:
        return self._claimed - self._consumed
