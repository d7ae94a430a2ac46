"""A Disruptor-style ring buffer: preallocated power-of-two slots, sequence numbers, batch consumption.

Producers claim a sequence, fill the slot and publish it; the single consumer takes *everything*
published so far as one batch (``take``), which is how many small requests become one engine batch
and one fsync. A full ring blocks producers (back-pressure) instead of growing. Waiting uses
condition variables, so an idle ring costs no CPU.

>>> ring = RingBuffer(8)
>>> ring.publish("a"), ring.publish("b")
(0, 1)
>>> ring.take(timeout=0)
['a', 'b']
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class RingClosed(Exception):
    """The ring was closed while a producer or the consumer waited on it."""


class RingBuffer(Generic[T]):
    """Multi-producer, single-consumer ring of ``size`` (a power of two) preallocated slots."""

    def __init__(self, size: int = 1024) -> None:
        if size < 1 or size & (size - 1):
            raise ValueError(f"ring size must be a power of two, got {size}")
        self.size = size
        self._mask = size - 1
        self._slots: list[T | None] = [None] * size
        self._available = [-1] * size  # sequence last published in each slot
        self._claimed = -1  # highest sequence handed to a producer
        self._consumed = -1  # highest sequence the consumer has taken
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)
        self._closed = False

    @property
    def cursor(self) -> int:
        """Highest claimed sequence."""
        return self._claimed

    @property
    def consumed(self) -> int:
        """Highest sequence taken by the consumer."""
        return self._consumed

    def publish(self, item: T, timeout: float | None = None) -> int:
        """Claim the next sequence, store ``item`` and publish it; blocks while the ring is full."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            if self._closed:
                raise RingClosed("ring buffer is closed")
            seq = self._claimed + 1
            while seq - self._consumed > self.size:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError("ring buffer full")
                self._not_full.wait(left)
                if self._closed:
                    raise RingClosed("ring buffer is closed")
                seq = self._claimed + 1
            self._claimed = seq
            slot = seq & self._mask
            self._slots[slot] = item
            self._available[slot] = seq
            self._not_empty.notify()
        return seq

    def take(self, timeout: float | None = None, limit: int | None = None) -> list[T]:
        """Everything published since the last take (up to ``limit``), waiting up to ``timeout`` for one."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._available[(self._consumed + 1) & self._mask] != self._consumed + 1:
                if self._closed:
                    raise RingClosed("ring buffer is closed")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return []
                self._not_empty.wait(left)
            out: list[T] = []
            seq = self._consumed + 1
            while self._available[seq & self._mask] == seq and (limit is None or len(out) < limit):
                slot = seq & self._mask
                out.append(self._slots[slot])  # type: ignore[arg-type]
                self._slots[slot] = None
                seq += 1
            self._consumed = seq - 1
            self._not_full.notify_all()
        return out

    def poll(self, handler: Callable[[list[T]], None], limit: int | None = None) -> int:
        """Agent-style duty cycle: hand whatever is published to ``handler`` without waiting; returns how many."""
        batch = self.take(timeout=0, limit=limit)
        if batch:
            handler(batch)
        return len(batch)

    def close(self) -> None:
        """Wake every waiter; later publishes raise RingClosed (items already published can still be taken)."""
        with self._lock:
            self._closed = True
            self._not_empty.notify_all()
            self._not_full.notify_all()

    def __len__(self) -> int:
        return self._claimed - self._consumed
